"""Analytic multiply-accumulate count of X-CLIP in the paper's convention.

The paper's "GFLOPs" are multiply-accumulates (MACs) of the official model for one video
and one label, text encoder included, counting matmuls, linears, the patch convolution and
the attention products (``docs/benchmarking.md#macs-and-flops``). This module counts them
for any :class:`XCLIPConfig`, following the official computation literally (L+1 query rows
in IFA, every frame's patches projected, 77 text tokens), so it is the number to compare
with the paper. FLOPs = 2 x MACs.

``python -m benchmarks.flops --json`` prints ``{"<variant>-<T>f": GMACs}`` for the paper's rows.
"""

from __future__ import annotations

import argparse
import json

from xclip.config import VARIANTS, XCLIPConfig, resolve_config


def _transformer_layer_macs(tokens: int, width: int, mlp_dim: int, keys: int | None = None) -> int:
    """One pre-LN layer over ``tokens`` rows: q/k/v, scores, mix, out-proj, MLP."""
    keys = tokens if keys is None else keys
    return 3 * tokens * width * width + 2 * tokens * keys * width + tokens * width * width + 2 * tokens * width * mlp_dim


def xclip_macs(
    config: XCLIPConfig, labels: int = 1, *, executed: bool = False, text_tokens: int | None = None
) -> dict[str, int]:
    """MACs of X-CLIP for one video of ``config.num_frames`` frames and ``labels`` labels.

    By default the official computation (the paper's convention). ``executed=True`` counts
    what ``xclip.XCLIP`` runs instead: IFA queries only the L frame tokens (the message token
    adds one key and value, projected on its own), the patch features are averaged over time
    before their projection, and the text tower stops at ``text_tokens`` (the last end token
    + 1; default the full context).

    Returns the parts ("stem", "cct", "heads", "mit", "prompts", "text", "logits") and "total".
    """
    c = config
    t, w, e = c.num_frames, c.vision_width, c.embed_dim
    patches = c.grid_size**2
    tokens = patches + 1
    vision_mlp = c.mlp_dim("vision")
    stem = t * patches * w * 3 * c.patch_size**2
    if executed:
        ifa = t * (3 * w * w * tokens + 2 * w * w + 2 * tokens * (tokens + 1) * w + w * w * tokens)
    else:  # as the official code runs it: L+1 rows (message token appended) as queries and keys
        ifa = t * (tokens + 1) * (3 * w * w + 2 * (tokens + 1) * w + w * w)
    per_layer = (
        t * w * w  # message_fc
        + t * 3 * w * w + 2 * t * t * w + t * w * w  # CFA over the T messages
        + ifa
        + 2 * tokens * w * vision_mlp * t  # MLP on the L frame tokens
    )
    cct = c.vision_layers * per_layer
    # ln_post @ proj per frame, and the patches @ prompts_visual_proj: every frame's officially,
    # once per video (after the temporal mean) as executed.
    heads = t * w * e + (1 if executed else t) * patches * w * e
    mit = c.mit_layers * _transformer_layer_macs(t, e, c.mlp_dim("mit"))
    prompt_layer = (
        labels * e * e  # q_proj
        + 2 * patches * e * e  # k_proj, v_proj over the N patch features
        + 2 * labels * patches * e  # scores and mix
        + labels * e * e  # proj
        + 2 * labels * e * 4 * e  # mlp
    )
    prompts = c.prompt_layers * prompt_layer
    length = c.context_length if text_tokens is None else text_tokens
    text_layer = _transformer_layer_macs(length, c.text_width, c.mlp_dim("text"))
    text = labels * (c.text_layers * text_layer + c.text_width * e)
    logits = labels * e if executed else 0  # the paper's count leaves out the final product
    parts = {"stem": stem, "cct": cct, "heads": heads, "mit": mit, "prompts": prompts, "text": text, "logits": logits}
    parts["total"] = sum(parts.values())
    return parts


def xclip_gmacs(name_or_config: str | XCLIPConfig, num_frames: int | None = None, labels: int = 1) -> float:
    """GMACs per clip (paper convention) of a variant or config at ``num_frames``."""
    return xclip_macs(resolve_config(name_or_config, num_frames), labels)["total"] / 1e9


PAPER_ROWS: dict[str, float] = {
    "xclip-b32-8f": 39,
    "xclip-b32-16f": 75,
    "xclip-b16-8f": 145,
    "xclip-b16-16f": 287,
    "xclip-b16-32f": 571,
    "xclip-l14-8f": 658,
    "xclip-l14-336-16f": 3086,
}
"""The paper's GFLOPs (= GMACs) per view, keyed ``<variant>-<T>f``."""


def paper_table() -> dict[str, float]:
    """Our count for each of the paper's rows, in GMACs."""
    out = {}
    for key in PAPER_ROWS:
        variant, frames = key.rsplit("-", 1)
        out[key] = round(xclip_gmacs(VARIANTS[variant], int(frames.removesuffix("f"))), 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object {row: GMACs}")
    args = parser.parse_args(argv)
    table = paper_table()
    if args.json:
        print(json.dumps(table))
        return 0
    print(f"{'row':<20} {'GMACs (ours)':>12} {'paper':>8} {'diff':>7}   (FLOPs = 2 x MACs)")
    for key, ours in table.items():
        paper = PAPER_ROWS[key]
        print(f"{key:<20} {ours:>12.2f} {paper:>8} {100 * (ours - paper) / paper:>6.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
