"""scripts/gpu_static.py: reading ptxas and cuobjdump output, occupancy, the failure rules, the
CUDA shared-memory layouts, and the launch tracing that feeds the Triton compiles."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gs():
    spec = importlib.util.spec_from_file_location("gpu_static", REPO_ROOT / "scripts" / "gpu_static.py")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses look their module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


NVCC_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN9xclip_ext14ifa_fwd_kernelIffLi64ELi64ELi64EEEvv' for 'sm_80'
ptxas info    : Function properties for _ZN9xclip_ext14ifa_fwd_kernelIffLi64ELi64ELi64EEEvv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 380 bytes cmem[0]
ptxas info    : Compile time = 2527.783 ms
ptxas info    : Compiling entry function 'other' for 'sm_90a'
ptxas info    : Function properties for other
    13024 bytes stack frame, 12976 bytes spill stores, 13900 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]
"""

TRITON_LOG = """\
ptxas-blackwell info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized
ptxas-blackwell info    : 11 bytes gmem
ptxas-blackwell info    : Compiling entry function '_ifa_bwd_dq_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _ifa_bwd_dq_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 164 registers, used 1 barriers
"""


def test_parse_ptxas_log_nvcc(gs):
    first, second = gs.parse_ptxas_log(NVCC_LOG)
    assert (first.function, first.arch, first.registers, first.spill_stores, first.static_shared) == (
        "_ZN9xclip_ext14ifa_fwd_kernelIffLi64ELi64ELi64EEEvv", "sm_80", 96, 0, 0)
    assert (second.function, second.arch, second.registers) == ("other", "sm_90a", 255)
    assert (second.stack_frame, second.spill_stores, second.spill_loads, second.static_shared) == (13024, 12976, 13900,
                                                                                                   2048)


def test_parse_ptxas_log_triton_prefix(gs):
    (entry,) = gs.parse_ptxas_log(TRITON_LOG)
    assert (entry.function, entry.arch, entry.registers, entry.spill_stores) == ("_ifa_bwd_dq_kernel", "sm_90a", 164, 0)
    assert gs.parse_ptxas_log("ptxas info : 11 bytes gmem\n") == []


@pytest.mark.parametrize(
    "arch, registers, threads, shared, expected",
    [
        # 255 registers -> 8192 per warp -> 8 warps per SM -> 2 blocks of 4 warps; 57 KB + 1 KB reserved: 2 fit.
        ("sm_80", 255, 128, 58368, 2),
        ("sm_90a", 255, 128, 58368, 2),
        # Registers allow 16 blocks, threads 16; shared memory (40 KB + 1 KB) allows 4 on sm_80, 5 on sm_90a.
        ("sm_80", 32, 128, 40960, 4),
        ("sm_90a", 32, 128, 40960, 5),
        # 168 registers round up to 5376 per warp: 12 warps -> 3 blocks.
        ("sm_90a", 168, 128, 0, 3),
        # Tiny blocks: the 32-blocks-per-SM limit decides.
        ("sm_80", 16, 32, 0, 32),
        # Threads decide: 1024-thread blocks, 2 per SM.
        ("sm_90a", 32, 1024, 0, 2),
        # Over the per-block limits: nothing runs.
        ("sm_80", 64, 128, 163 * 1024 + 1, 0),
        ("sm_90a", 64, 128, 227 * 1024 + 1, 0),
        ("sm_90a", 256, 128, 0, 0),
    ],
)
def test_blocks_per_sm(gs, arch, registers, threads, shared, expected):
    assert gs.blocks_per_sm(arch, registers, threads, shared) == expected


def test_blocks_per_sm_rejects_bad_input(gs):
    with pytest.raises(ValueError, match="arch"):
        gs.blocks_per_sm("sm_75", 32, 128, 0)
    with pytest.raises(ValueError, match="threads"):
        gs.blocks_per_sm("sm_80", 32, 0, 0)


def _row(**overrides):
    row = dict(kernel="ifa_fwd_kernel", source="triton", arch="sm_90a", dtype="bfloat16", head_dim=64, frames=None,
               toolchain="triton 3.6.0", registers=128, spill_bytes=0, shared_bytes=57344, tensor_cores=True,
               threads=128, error=None)
    row.update(overrides)
    return row


def test_failures(gs):
    assert gs.failures(gs.finish_row(_row())) == []
    assert gs.failures(_row(error="PTXASError: boom", blocks_per_sm=0)) == ["compile error: PTXASError: boom"]
    # Spills fail in fp16/bf16, are reported but pass in fp32.
    assert any("spills 8 B" in f for f in gs.failures(gs.finish_row(_row(dtype="float16", spill_bytes=8))))
    assert gs.failures(gs.finish_row(_row(dtype="float32", spill_bytes=13000, tensor_cores=False))) == []
    # Tensor cores are required of fp16/bf16 kernels: Triton (PTX or SASS) and CUDA (HMMA in the
    # SASS; a CUDA row whose SASS could not be read has tensor_cores None and fails too).
    assert any("tensor-core" in f for f in gs.failures(gs.finish_row(_row(tensor_cores=False))))
    cuda = dict(source="cuda", toolchain="nvcc 13.0")
    assert any("no HMMA in the SASS of a bfloat16 CUDA kernel" in f
               for f in gs.failures(gs.finish_row(_row(**cuda, tensor_cores=False))))
    assert any("no HMMA in the SASS of a float16 CUDA kernel" in f
               for f in gs.failures(gs.finish_row(_row(**cuda, dtype="float16", tensor_cores=False))))
    assert any("SASS not read" in f for f in gs.failures(gs.finish_row(_row(**cuda, tensor_cores=None))))
    assert gs.failures(gs.finish_row(_row(**cuda, tensor_cores=True))) == []
    assert gs.failures(gs.finish_row(_row(**cuda, dtype="float32", tensor_cores=False))) == []
    # The per-block shared-memory limit is the architecture's: 200 KB fits sm_90a's 227 KB, not sm_80's 163 KB.
    assert gs.failures(gs.finish_row(_row(arch="sm_90a", shared_bytes=200 * 1024))) == []
    assert any("shared memory" in f for f in gs.failures(gs.finish_row(_row(arch="sm_80", shared_bytes=200 * 1024))))
    assert any("shared memory" in f for f in gs.failures(gs.finish_row(_row(shared_bytes=228 * 1024))))


def test_tensor_core_detection(gs):
    assert gs.has_tensor_core_instructions(ptx="\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, ...;")
    assert gs.has_tensor_core_instructions(ptx="\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 ...;")
    assert gs.has_tensor_core_instructions(sass="        /*0a30*/  HMMA.16816.F32.BF16 R4, R8, R12, R4 ;")
    assert gs.has_tensor_core_instructions(sass="        /*0a30*/  HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4] ;")
    assert not gs.has_tensor_core_instructions(ptx="\tfma.rn.f32 %f1, %f2, %f3, %f4;\n// mma in a comment",
                                               sass="  FFMA R1, R2, R3, R4 ;")


def test_split_sass(gs):
    sass = "\n\tcode for sm_80\n\t\tFunction : a\n\tHMMA.16816 R0\n\t\tFunction : b\n\tFFMA R0\n"
    parts = gs.split_sass(sass)
    assert set(parts) == {"a", "b"}
    assert gs.has_tensor_core_instructions(sass=parts["a"]) and not gs.has_tensor_core_instructions(sass=parts["b"])


def test_cuda_kernel_config(gs):
    name = ("void xclip_ext::(anonymous namespace)::ifa_bwd_dq_kernel<c10::BFloat16, float, 128, 32, 32>"
            "(xclip_ext::(anonymous namespace)::Rows<c10::BFloat16>, int, float)")
    assert gs.cuda_kernel_config(name) == ("ifa_bwd_dq_kernel", "bfloat16", [128, 32, 32])
    assert gs.cuda_kernel_config("void ns::cfa_fwd_kernel<double, double, 32>(double const*, int)") == (
        "cfa_fwd_kernel", "float64", [32])
    # The tensor-core kernels: a warp_mma tag, then DP alone.
    mma = "void xclip_ext::ifa_mma::ifa_mma_fwd_kernel<xclip_ext::warp_mma::{}, {}>(xclip_ext::ifa_mma::FwdArgs)"
    assert gs.cuda_kernel_config(mma.format("BF16", 64)) == ("ifa_mma_fwd_kernel", "bfloat16", [64])
    assert gs.cuda_kernel_config(mma.format("F16", 96)) == ("ifa_mma_fwd_kernel", "float16", [96])
    cfa = "void xclip_ext::cfa_mma::cfa_mma_fwd_kernel<xclip_ext::warp_mma::BF16, 32>(xclip_ext::cfa_mma::CfaArgs)"
    assert gs.cuda_kernel_config(cfa) == ("cfa_mma_fwd_kernel", "bfloat16", [32])
    with pytest.raises(ValueError, match="demangled"):
        gs.cuda_kernel_config("void ns::plain(int)")


def test_cuda_shared_bytes_match_the_documented_layouts(gs):
    """The sizes csrc/cuda/frame_attention.cu's header states for its fp32 tiles (KiB, one
    decimal), so the mirrored layouts cannot silently drift from the ones documented there."""
    text = (REPO_ROOT / "csrc" / "cuda" / "frame_attention.cu").read_text()
    documented = {}
    for line in text.splitlines():
        m = re.match(r"//\s+(forward|dK/dV|dQ)\s.*DP=64: ([\d.]+) KiB, DP=128: ([\d.]+) KiB", line)
        if m:
            documented[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    assert set(documented) == {"forward", "dK/dV", "dQ"}
    tiles = {  # (kernel, DP): (BM, BN) as Tiles<DP> in frame_attention.cu chooses them
        ("ifa_fwd_kernel", 64): (64, 64), ("ifa_fwd_kernel", 128): (64, 32),
        ("ifa_bwd_dkdv_kernel", 64): (32, 64), ("ifa_bwd_dkdv_kernel", 128): (32, 32),
        ("ifa_bwd_dq_kernel", 64): (64, 32), ("ifa_bwd_dq_kernel", 128): (32, 32),
    }
    names = {"forward": "ifa_fwd_kernel", "dK/dV": "ifa_bwd_dkdv_kernel", "dQ": "ifa_bwd_dq_kernel"}
    for label, kib in documented.items():
        for dp, expected in zip((64, 128), kib):
            bm, bn = tiles[(names[label], dp)]
            got = gs.cuda_shared_bytes(names[label], "float32", [dp, bm, bn]) / 1024
            assert round(got, 1) == pytest.approx(expected, abs=0.051), (label, dp, got, expected)
    # Doubles take twice the bytes; the message kernel grows with T (rounded up to 8 rows).
    assert gs.cuda_shared_bytes("ifa_fwd_kernel", "float64", [64, 64, 64]) == 2 * gs.cuda_shared_bytes(
        "ifa_fwd_kernel", "bfloat16", [64, 64, 64])
    t8 = gs.cuda_shared_bytes("cfa_fwd_kernel", "float32", [64], frames=8)
    assert gs.cuda_shared_bytes("cfa_fwd_kernel", "float32", [64], frames=3) == t8
    assert gs.cuda_shared_bytes("cfa_fwd_kernel", "float32", [64], frames=64) > t8
    with pytest.raises(ValueError, match="frames"):
        gs.cuda_shared_bytes("cfa_fwd_kernel", "float32", [64])


def test_traced_launches_are_the_launchers_own(gs):
    """The Triton configurations come from calling the real launchers (on meta tensors): every
    kernel, dtype and head dim is there, with the constexprs and num_warps the launcher passes."""
    pytest.importorskip("triton")
    launches = gs._trace_triton_launches()
    seen = {(launch["fn"].__name__, launch["dtype"], launch["head_dim"], launch["frames"]) for launch in launches}
    for dtype in gs.TRITON_DTYPES:
        for d in gs.HEAD_DIMS:
            for kernel in ("_ifa_fwd_kernel", "_ifa_bwd_dkdv_kernel", "_ifa_bwd_dq_kernel"):
                assert (kernel, dtype, d, None) in seen
        for t in gs.CFA_FRAMES:
            assert ("_cfa_fwd_kernel", dtype, 64, t) in seen
    for launch in launches:
        assert "num_warps" in launch["kwargs"] and "BLOCK_D" in launch["kwargs"]
        assert launch["kwargs"]["HEAD_DIM"] == launch["head_dim"]
    # The kernels are restored afterwards: nothing is left patched.
    from triton.runtime.jit import JITFunction

    from xclip_kernels.backends.triton import frame_attention

    assert isinstance(frame_attention._ifa_fwd_kernel, JITFunction)


def test_compile_request_specialises_like_the_jit(gs):
    """Pointers aligned, 16-divisible strides marked divisible, N left unspecialised."""
    pytest.importorskip("triton")
    launch = next(x for x in gs._trace_triton_launches()
                  if x["fn"].__name__ == "_ifa_fwd_kernel" and x["dtype"] == "bfloat16" and x["head_dim"] == 64)
    request = gs._compile_request(launch, "sm_90a")
    names = [p.name for p in launch["fn"].params]
    assert request["signature"]["Q"] == "*bf16" and request["signature"]["N"] == "i32"
    assert request["options"].num_warps == launch["kwargs"]["num_warps"]
    divisible = {names[path[0]] for path, attr in request["attrs"].items() if ["tt.divisibility", 16] in attr}
    assert {"Q", "K", "V", "O", "s_qn"} <= divisible
    assert "N" not in divisible and "H" not in divisible  # N = 197 is never specialised, H = 12 is not 16-divisible


def test_cuda_tiles(gs):
    assert gs.cuda_tiles("ifa_bwd_dq_kernel", [128, 32, 16]) == (32, 16)  # FMA kernels: the template's
    assert gs.cuda_tiles("ifa_mma_fwd_kernel", [64]) == (64, 32)  # FwdTiles<DP>
    assert gs.cuda_tiles("ifa_mma_fwd_kernel", [128]) == (64, 32)
    assert gs.cuda_tiles("cfa_fwd_kernel", [64]) == (1, 1)
    assert gs.cuda_tiles("cfa_mma_fwd_kernel", [64]) == (1, 1)
    with pytest.raises(ValueError, match="no tiles known"):
        gs.cuda_tiles("other_kernel", [64])


def test_cuda_shared_bytes_of_the_tensor_core_forward(gs):
    """16-bit Q (64 rows) and two K and two V buffers of 32 key rows, rows DP + 8 elements long;
    the same for both tags (the host-model test checks the header agrees)."""
    assert gs.cuda_shared_bytes("ifa_mma_fwd_kernel", "bfloat16", [64]) == (64 + 4 * 32) * 72 * 2 == 27648
    assert gs.cuda_shared_bytes("ifa_mma_fwd_kernel", "float16", [128]) == (64 + 4 * 32) * 136 * 2 == 52224
    assert gs.cuda_shared_bytes("ifa_mma_fwd_kernel", "float16", [32]) == (64 + 4 * 32) * 40 * 2


def test_cuda_tiles_and_shared_bytes_of_the_tensor_core_backward(gs):
    """BwdTiles<DP>: dK/dV 64 keys with query tiles shrinking as DP grows, dQ 64 queries (the
    host-model test of the backward checks these against the header)."""
    assert [gs.cuda_tiles("ifa_mma_bwd_dkdv_kernel", [dp]) for dp in (32, 64, 96, 128)] == [
        (64, 64), (64, 64), (32, 64), (16, 64)]
    assert [gs.cuda_tiles("ifa_mma_bwd_dq_kernel", [dp]) for dp in (32, 64, 96, 128)] == [
        (64, 64), (64, 64), (64, 32), (64, 32)]
    # DP = 64: K, V (64 rows) and two Q, two dO buffers (64 rows) of 72 elements; lse/delta floats.
    assert gs.cuda_shared_bytes("ifa_mma_bwd_dkdv_kernel", "bfloat16", [64]) == (2 * 64 + 4 * 64) * 144 + 4 * 64 * 4
    assert gs.cuda_shared_bytes("ifa_mma_bwd_dq_kernel", "float16", [128]) == (
        (2 * 64 + 4 * 32) * 272 + 2 * 128 * 4 + 2 * 64 * 4)


def test_cuda_shared_bytes_of_the_tensor_core_message_kernel(gs):
    """CfaTiles (csrc/cuda/cfa_mma.cuh): 16-bit A (T rounded up to 16 rows) and B (3 DP weight
    rows at DP <= 64, DP in the three-pass DP 96 / 128) k-chunk double buffers of rows 32 + 8,
    the fp32 probabilities aliasing them, fp32 q, k, v (T rounded up to 8 rows of DP + 1), the
    statistics; the host-model test checks the header agrees."""
    staging = 2 * 16 * 40 * 2 + 2 * 192 * 40 * 2
    expected = staging + 3 * 8 * 65 * 4 + 2 * 8 * 4
    assert gs.cuda_shared_bytes("cfa_mma_fwd_kernel", "bfloat16", [64], frames=8) == expected == 39584
    # T = 64, DP = 128: one part per pass (128 B rows); q, k, v dominate.
    staging = 2 * 64 * 40 * 2 + 2 * 128 * 40 * 2
    expected = staging + 3 * 64 * 129 * 4 + 2 * 64 * 4
    assert gs.cuda_shared_bytes("cfa_mma_fwd_kernel", "float16", [128], frames=64) == expected == 130304
    with pytest.raises(ValueError, match="frames"):
        gs.cuda_shared_bytes("cfa_mma_fwd_kernel", "float16", [64])


def test_markdown_report(gs):
    rows = [gs.finish_row(_row()), gs.finish_row(_row(dtype="float16", spill_bytes=24, arch="sm_80")),
            gs.finish_row(_row(toolchain="triton 3.9.0", registers=77)),
            gs.finish_row(_row(source="cuda", toolchain="nvcc 13.0", dtype="float64", tensor_cores=False))]
    text = gs.markdown_report(rows)
    assert "| ifa_fwd_kernel | triton | triton 3.6.0 | bfloat16 | 64 |" in text
    assert "float64" not in text.split("Failing")[0]  # never run on a GPU: not in the table
    assert "| 77 |" not in text  # only the GPU image's Triton in the table
    assert "Failing (1 of 4 rows" in text and "sm_80, float16, D = 64): spills 24 B in a float16 kernel" in text
