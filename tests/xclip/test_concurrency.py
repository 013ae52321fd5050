"""One model shared by several threads, in mixed grad modes, from the very first call of a fresh
process (the compiled extension and the GEMM provider are first used from the threads at once):
every result is bit-identical to the same call made serially afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from xclip_kernels import gemm

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys, threading, torch
import xclip
config = xclip.XCLIPConfig(
    image_size=32, patch_size=8, vision_width=128, vision_layers=2, vision_heads=2, embed_dim=64,
    text_width=64, text_layers=2, text_heads=1, num_frames=3, mit_heads=1, prompt_heads=1,
)
torch.manual_seed(0)
# The class itself, not build_model: build_model preloads the automatic backend (for tracing and
# FLOP counting), and here the threads must be the extension's first users.
model = xclip.XCLIP(config).eval()
loaded_early = sorted(m for m in sys.modules if m.startswith("xclip_kernels._C"))
assert not loaded_early, loaded_early  # the threads below are the extension's first users
generator = torch.Generator().manual_seed(1)
videos = [torch.randn(2, 3, 3, 32, 32, generator=generator) for _ in range(3)]
text = xclip.tokenize(["archery", "a dog"])
modes = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}
barrier = threading.Barrier(6)
results, errors = {}, []

def work(index):
    try:
        names = list(modes)
        barrier.wait()
        for step, video in enumerate(videos):
            mode = names[(index + step) % len(names)]
            with modes[mode]():
                results[(index, step)] = (mode, model(video, text).detach().clone())
    except BaseException as exc:
        errors.append(repr(exc))

threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
assert len(results) == 18
for (index, step), (mode, got) in sorted(results.items()):
    with modes[mode]():
        expected = model(videos[step], text).detach()
    assert torch.equal(got, expected), (index, step, mode, (got - expected).abs().max().item())
print("ok", sorted({mode for mode, _ in results.values()}))
"""


@pytest.mark.parametrize("gemm_provider", ["matmul", "onednn"])
def test_threads_share_one_model_from_first_use_bit_identical_to_serial(gemm_provider):
    if gemm_provider == "onednn" and not gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN linear op")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCLIP_KERNELS_")}
    env["XCLIP_KERNELS_GEMM"] = gemm_provider  # each provider's path: scratch buffers, packed weights
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok ['grad', 'inference_mode', 'no_grad']"
