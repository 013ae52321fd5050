"""X-CLIP sizes: one dataclass for every size, and the released variants by name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from xclip_kernels import checks


@dataclass(frozen=True)
class XCLIPConfig:
    """Every size of an X-CLIP model.

    Defaults are X-CLIP-B/32 at 8 frames. Head counts are explicit because the Hugging Face
    conversion left MIT and prompt heads at 8 for the large models (officially E/64).
    ``*_mlp_dim`` default to four times the width, as in every released checkpoint.
    """

    # vision (cross-frame communication transformer)
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp_dim: int | None = None
    # shared embedding
    embed_dim: int = 512
    # text (CLIP)
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp_dim: int | None = None
    # video
    num_frames: int = 8
    mit_layers: int = 1
    mit_heads: int = 8
    mit_mlp_dim: int | None = None
    prompt_layers: int = 2
    prompt_heads: int = 8
    prompt_alpha: float = 0.1
    # training-only regularisation; 0 = identity, as in inference
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("prompt_alpha", "drop_path_rate", "layer_norm_eps"):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(f"XCLIPConfig.{f.name}: expected a float, got {value!r}")
                continue
            if value is None and f.name.endswith("_mlp_dim"):
                continue
            checks.integer(f"XCLIPConfig.{f.name}", value)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"XCLIPConfig.image_size: expected a multiple of patch_size={self.patch_size}, "
                f"got {self.image_size}"
            )
        for width, heads, what in (
            (self.vision_width, self.vision_heads, "vision"),
            (self.text_width, self.text_heads, "text"),
            (self.embed_dim, self.mit_heads, "mit"),
            (self.embed_dim, self.prompt_heads, "prompt"),
        ):
            if width % heads:
                raise ValueError(
                    f"XCLIPConfig.{what}_heads: expected a divisor of the width {width}, got {heads}"
                )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"XCLIPConfig.drop_path_rate: expected 0 <= rate < 1, got {self.drop_path_rate}")

    @property
    def grid_size(self) -> int:
        """Patches per side, ``image_size // patch_size``."""
        return self.image_size // self.patch_size

    @property
    def frame_tokens(self) -> int:
        """L = patches + class token."""
        return self.grid_size**2 + 1

    def mlp_dim(self, tower: str) -> int:
        """Hidden size of the MLP of ``tower`` in ("vision", "text", "mit")."""
        width = {"vision": self.vision_width, "text": self.text_width, "mit": self.embed_dim}[tower]
        explicit = getattr(self, f"{tower}_mlp_dim")
        return 4 * width if explicit is None else explicit

    def replace(self, **changes: object) -> "XCLIPConfig":
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-able dict; :meth:`from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> "XCLIPConfig":
        """Build from :meth:`to_dict` output; unknown keys raise naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"XCLIPConfig: unknown fields {unknown}")
        return cls(**values)  # type: ignore[arg-type]


_LARGE = dict(
    patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16, embed_dim=768,
    text_width=768, text_heads=12, mit_heads=12, prompt_heads=12,
)

VARIANTS: dict[str, XCLIPConfig] = {
    "xclip-b32": XCLIPConfig(),
    "xclip-b16": XCLIPConfig(patch_size=16),
    "xclip-l14": XCLIPConfig(**_LARGE),
    "xclip-l14-336": XCLIPConfig(image_size=336, **_LARGE),
}
"""The released sizes (``docs/xclip-math.md#variants``), at 8 frames; ``replace(num_frames=...)`` for others."""


def resolve_config(name_or_config: "str | XCLIPConfig", num_frames: int | None = None) -> XCLIPConfig:
    """A config from a variant name or a config, with ``num_frames`` applied if given."""
    if isinstance(name_or_config, XCLIPConfig):
        config = name_or_config
    elif isinstance(name_or_config, str) and name_or_config in VARIANTS:
        config = VARIANTS[name_or_config]
    else:
        raise ValueError(
            f"name_or_config: expected an XCLIPConfig or one of {', '.join(VARIANTS)}, got {name_or_config!r}"
        )
    if num_frames is not None and num_frames != config.num_frames:
        config = config.replace(num_frames=num_frames)
    return config
