"""benchmarks.gpu_model: the work counts, the roofline, the occupancy discount, reading gpu-static rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_model as gm
from xclip_kernels.flop_formulas import frame_attention_flops

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_shapes_of_the_issue():
    b16 = gm.shape_of("xclip-b16")
    assert (b16.frames, b16.tokens, b16.heads, b16.head_dim, b16.width, b16.videos, b16.t) == (256, 197, 12, 64, 768,
                                                                                                 32, 8)
    l14 = gm.shape_of("xclip-l14")
    assert (l14.frames, l14.tokens, l14.heads, l14.head_dim, l14.width) == (256, 257, 16, 64, 1024)
    with pytest.raises(ValueError, match="variant"):
        gm.shape_of("xclip-b99")


def test_kernel_work():
    s = gm.shape_of("xclip-b16")
    flops, moved, blocks = gm.kernel_work("ifa_fwd_kernel", s, (64, 64))
    assert flops == frame_attention_flops((256, 197, 12, 64))  # the repository's IFA count
    assert moved == 2 * (4 * 256 * 197 * 12 * 64 + 2 * 256 * 12 * 64) + 4 * 256 * 12 * 197
    assert blocks == 4 * 256 * 12  # ceil(197 / 64) query tiles per frame-head
    # The two backward kernels recompute the scores: 14 N²D products per frame-head, 3.5x the forward's 4.
    dkdv = gm.kernel_work("ifa_bwd_dkdv_kernel", s, (64, 32))
    dq = gm.kernel_work("ifa_bwd_dq_kernel", s, (64, 32))
    assert dkdv[0] == 8 * 256 * 12 * 197 * 197 * 64 and dkdv[2] == 7 * 256 * 12
    assert dq[0] - 8 * 256 * 12 * 197 * 64 == 6 * 256 * 12 * 197 * 197 * 64
    cfa = gm.kernel_work("cfa_fwd_kernel", s, (16, 16))
    assert cfa[0] == 2 * 256 * 768 * 3 * 768 + 4 * 256 * 8 * 768 and cfa[2] == 32 * 12
    # The CUDA tensor-core kernels do the work of their FMA counterparts.
    assert gm.kernel_work("ifa_mma_fwd_kernel", s, (64, 64)) == (flops, moved, blocks)
    assert gm.kernel_work("ifa_mma_bwd_dkdv_kernel", s, (64, 32)) == dkdv
    assert gm.kernel_work("ifa_mma_bwd_dq_kernel", s, (64, 32)) == dq
    # ... and the tensor-core message kernel the message kernel's.
    assert gm.kernel_work("cfa_mma_fwd_kernel", s, (1, 1)) == cfa
    with pytest.raises(ValueError, match="kernel"):
        gm.kernel_work("gemm", s, (64, 64))


def test_roofline_and_waves():
    h100 = gm.GPUS["H100"]
    t, bound = gm.roofline_seconds(790e12, 1, h100, tensor_cores=True)
    assert bound == "compute" and t == pytest.approx(1.0)
    t, bound = gm.roofline_seconds(67e12, 1, h100, tensor_cores=False)  # CUDA cores: 67 TFLOP/s
    assert bound == "compute" and t == pytest.approx(1.0)
    t, bound = gm.roofline_seconds(1, 3.35e12, h100, tensor_cores=True)
    assert bound == "memory" and t == pytest.approx(1.0)
    assert gm.wave_efficiency(264, 132, 2) == 1.0  # exactly one full wave
    assert gm.wave_efficiency(265, 132, 2) == pytest.approx((265 / 264) / 2)  # one block spills into a second wave
    assert gm.wave_efficiency(66, 132, 1) == 0.5
    with pytest.raises(ValueError, match="blocks_per_sm"):
        gm.wave_efficiency(10, 132, 0)


def _static_row(kernel, source, blocks_per_sm, **extra):
    row = dict(kernel=kernel, source=source, arch="sm_90a", dtype="bfloat16", head_dim=64, frames=None,
               toolchain="triton 3.6.0" if source == "triton" else "nvcc 13.0", registers=128, spill_bytes=0,
               shared_bytes=1024, tensor_cores=source == "triton", blocks_per_sm=blocks_per_sm, error=None,
               config={"BLOCK_M": 64, "BLOCK_N": 64} if source == "triton" else {"template": "<c10::BFloat16, float, 64, 64, 64>"})
    row.update(extra)
    return row


def test_estimates_use_the_static_rows():
    static = [
        _static_row("ifa_fwd_kernel", "triton", 2),
        _static_row("ifa_fwd_kernel", "triton", 1, toolchain="triton 3.9.0"),  # the GPU image's 3.6 is preferred
        _static_row("ifa_fwd_kernel", "cuda", 0, head_dim=64),  # does not fit: no estimate
        _static_row("ifa_fwd_kernel", "cuda", 3, head_dim=96),  # D = 64 runs the DP = 64 instantiation, not this
        _static_row("cfa_fwd_kernel", "triton", 4, frames=16),  # not T = 8
        _static_row("cfa_fwd_kernel", "cuda", 3, frames=8, config={"template": "<c10::BFloat16, float, 64>"}),
    ]
    rows = gm.estimates(static, variants=("xclip-b16",))
    triton = [r for r in rows if r["source"] == "triton"]
    assert {r["kernel"] for r in triton} == {"ifa_fwd_kernel"} and {r["gpu"] for r in triton} == {"H100", "H200"}
    for r in triton:
        assert r["toolchain"] == "triton 3.6.0" and r["blocks_per_sm"] == 2
        assert r["bound"] == "memory"  # IFA at B/16 on tensor cores: about 15 FLOP/B, far below the ridge
        eff = gm.wave_efficiency(4 * 256 * 12, 132, 2)
        assert r["estimate_us"] == pytest.approx(r["roofline_us"] / eff)
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["estimate_us"] * 1e-6) / 1e9)
    h100, h200 = sorted(triton, key=lambda r: r["gpu"])
    assert h200["roofline_us"] == pytest.approx(h100["roofline_us"] * 3.35 / 4.8)
    cuda_ifa = [r for r in rows if r["source"] == "cuda" and r["kernel"] == "ifa_fwd_kernel"]
    assert len(cuda_ifa) == 2 and cuda_ifa[0]["estimate_us"] is None and cuda_ifa[0]["bound"] == "compute"  # CUDA cores
    cuda_cfa = [r for r in rows if r["source"] == "cuda" and r["kernel"] == "cfa_fwd_kernel"]
    assert len(cuda_cfa) == 2 and all(r["blocks"] == 32 * 12 and r["estimate_us"] > 0 for r in cuda_cfa)
    assert "does not fit" in gm.format_table(rows)


def test_estimates_of_the_cuda_tensor_core_forward():
    """Its tiles come from the row's config["tiles"] (its template has DP only); it is priced at
    the tensor-core rate; the bf16 estimate takes it, the fp32 one the FMA kernel."""
    static = [
        _static_row("ifa_mma_fwd_kernel", "cuda", 3, tensor_cores=True,
                    config={"template": "<xclip_ext::warp_mma::BF16, 64>", "tiles": [64, 32]}),
        _static_row("ifa_fwd_kernel", "cuda", 2, dtype="float32"),
    ]
    (h100, h200) = sorted(gm.estimates(static, variants=("xclip-b16",)), key=lambda r: r["gpu"])
    assert h100["kernel"] == "ifa_mma_fwd_kernel" and h100["blocks"] == 4 * 256 * 12 and h100["bound"] == "memory"
    assert h100["estimate_us"] == pytest.approx(h100["roofline_us"] / gm.wave_efficiency(4 * 256 * 12, 132, 3))
    assert h200["roofline_us"] < h100["roofline_us"]
    (fp32, _) = gm.estimates(static, variants=("xclip-b16",), dtype="float32")
    assert fp32["kernel"] == "ifa_fwd_kernel" and fp32["bound"] == "compute"


def test_estimates_of_the_cuda_tensor_core_message_kernel():
    """The bf16 message path takes cfa_mma_fwd_kernel at T = 8, one block per (video, head), at
    the tensor-core rate; the fp32 one the FMA cfa_fwd_kernel on CUDA cores."""
    static = [
        _static_row("cfa_mma_fwd_kernel", "cuda", 5, tensor_cores=True, frames=8,
                    config={"template": "<xclip_ext::warp_mma::BF16, 64>", "tiles": [1, 1]}),
        _static_row("cfa_mma_fwd_kernel", "cuda", 1, tensor_cores=True, frames=64,
                    config={"template": "<xclip_ext::warp_mma::BF16, 64>", "tiles": [1, 1]}),
        _static_row("cfa_fwd_kernel", "cuda", 3, dtype="float32", frames=8,
                    config={"template": "<float, float, 64>", "tiles": [1, 1]}),
    ]
    (h100, _) = sorted(gm.estimates(static, variants=("xclip-b16",)), key=lambda r: r["gpu"])
    assert h100["kernel"] == "cfa_mma_fwd_kernel" and h100["blocks"] == 32 * 12 and h100["blocks_per_sm"] == 5
    flops, moved, _ = gm.kernel_work("cfa_fwd_kernel", gm.shape_of("xclip-b16"), (1, 1))
    roof = max(flops / gm.GPUS["H100"].tensor_flops, moved / gm.GPUS["H100"].bandwidth)
    assert h100["roofline_us"] == pytest.approx(roof * 1e6)
    (fp32, _) = gm.estimates(static, variants=("xclip-b16",), dtype="float32")
    assert fp32["kernel"] == "cfa_fwd_kernel" and fp32["roofline_us"] > h100["roofline_us"]


def test_cli_reads_the_static_json(tmp_path):
    static = tmp_path / "gpu-static.json"
    static.write_text(json.dumps([_static_row("ifa_fwd_kernel", "triton", 2)]))
    out = tmp_path / "model.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_model", "--static", str(static), "--json", str(out),
                             "--markdown"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.startswith("MODEL, not measured")
    assert "| xclip-b16 | triton | ifa_fwd_kernel | H100 |" in result.stdout
    assert len(json.loads(out.read_text())) == 4  # two variants x two GPUs
    missing = subprocess.run([sys.executable, "-m", "benchmarks.gpu_model", "--static", str(tmp_path / "none.json")],
                             cwd=REPO_ROOT, capture_output=True, text=True)
    assert missing.returncode == 2 and "make gpu-static" in missing.stderr
