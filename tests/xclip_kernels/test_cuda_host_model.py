"""The CUDA host model itself (csrc/cuda/host_model/simt.h and warp_mma.cuh's host side): a tiny
tensor-core kernel against float64, the fragment layouts against the PTX ISA's tables, the 16-bit
conversions against torch's, and the kernel bugs the model must report.

Entry points: csrc/cuda/host_model/selftest_model.cpp.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
from collections.abc import Callable

import pytest
import torch

from cuda_host_model import HostModelError, call, host_model

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
ENTRY = "selftest_model.cpp"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The 16-bit tensor's storage as int16 (what the entry points take), contiguous."""
    return t.contiguous().view(torch.int16)


def _mma(dtype: torch.dtype, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, a_trans: bool,
         b_trans: bool, defines: tuple[str, ...] = ()) -> torch.Tensor:
    """The selftest kernel's D = A B + C for (batch, 16, 16) operands, staged as the flags say."""
    lib = host_model(ENTRY, defines)
    a_in = _bits(a.transpose(1, 2) if a_trans else a)
    b_in = _bits(b if b_trans else b.transpose(1, 2))
    d = torch.full_like(c, float("nan"))
    call(lib, "xk_selftest_mma", ctypes.c_int(dtype == torch.bfloat16), ctypes.c_int(a_trans), ctypes.c_int(b_trans),
         ctypes.c_int(a.shape[0]), a_in, b_in, c.contiguous(), d)
    return d


@pytest.mark.parametrize("b_trans", [False, True], ids=["b", "b_trans"])
@pytest.mark.parametrize("a_trans", [False, True], ids=["a", "a_trans"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mma_tile_matches_float64(dtype: torch.dtype, a_trans: bool, b_trans: bool) -> None:
    """cp_async_16 -> ldmatrix (.trans) -> mma over 3 blocks of 2 warps: float64 truth within the
    fp32 accumulation bound, and bit-exact with the documented order (c, then k = 0..15)."""
    batch = 3
    a = torch.randn(batch, 16, 16).to(dtype)
    b = torch.randn(batch, 16, 16).to(dtype)
    c = torch.randn(batch, 16, 16)
    d = _mma(dtype, a, b, c, a_trans, b_trans)

    truth = a.double() @ b.double() + c.double()
    # 16 fp32 additions of exact products: at most 16 u sum|terms| (u = 2^-24), plus change.
    bound = 17 * 2.0**-24 * (a.double().abs() @ b.double().abs() + c.double().abs())
    error = (d.double() - truth).abs()
    assert (error <= bound).all(), f"max error {error.max().item():.3g}, bound there {bound.flatten()[error.argmax()]:.3g}"

    expected = c.clone()
    for k in range(16):
        expected = expected + a[:, :, k : k + 1].float() * b[:, k : k + 1, :].float()
    assert torch.equal(d, expected)


# ---- bugs the model must report (bug_kernel in selftest_model.cpp; two warps of 32) -------------

BUGS = [
    pytest.param(1, r"warp 0: lanes wait at different warp collectives: lanes 0-15 wait at shfl_xor \(.*selftest_model"
                    r"\.cpp:\d+\); lanes 16-31 wait at sync_warp", id="divergent-collectives"),
    pytest.param(2, r"warp 0: lanes wait at different warp collectives: lanes 0-15 wait at ldmatrix_x4 \(.*:(\d+)\); "
                    r"lanes 16-31 wait at ldmatrix_x4 \(.*:(?!\1)\d+\)", id="divergent-call-sites"),
    pytest.param(3, r"warp 0: a warp collective not reached by every lane: lanes 0-15 wait at shfl_xor .*; "
                    r"lanes 16-31 have exited", id="lanes-exited"),
    pytest.param(4, r"sync_block at .* not reached by every thread: threads 0-4, 6-63 wait, threads 5 have exited",
                 id="barrier-skipped"),
    pytest.param(5, r"warp 0: a warp collective not reached by every lane: lanes 0-2, 4-31 wait at sync_warp .*; "
                    r"lanes 3 wait at sync_block", id="barrier-vs-warp"),
    pytest.param(6, r"ldmatrix_x4 at .*lane 5 of warp 0\): row address \(shared offset 168\) is not 16-byte aligned",
                 id="ldmatrix-misaligned"),
    pytest.param(7, r"ldmatrix_x4 at .*lane 7 of warp 0\): row address is outside the block's 1024 bytes",
                 id="ldmatrix-outside"),
    pytest.param(8, r"thread 9: cp_async_16 at .*: shared destination offset 8 is not 16-byte aligned",
                 id="cp-async-dst-misaligned"),
    pytest.param(9, r"thread 9: cp_async_16 at .*: shared destination is outside the block's 1024 bytes",
                 id="cp-async-dst-outside"),
    pytest.param(10, r"thread 9: cp_async_16 at .*: global source address is not 16-byte aligned",
                 id="cp-async-src-misaligned"),
    pytest.param(11, r"thread 9: cp_async_16 at .*: global source is outside every buffer given to "
                     r"xk_sim::register_global", id="cp-async-src-unregistered"),
    pytest.param(12, r"ldmatrix_x4 at .*lane 0 of warp 0\): reads shared offset 0 while a cp_async_16 into it "
                     r"\(thread 0, warp 0, at .*selftest_model\.cpp:\d+\) is still in flight", id="read-before-wait"),
    pytest.param(13, r"ldmatrix_x4 at .*: reads shared offset 0 while a cp_async_16 into it \(thread 0, warp 0, at "
                     r".*\) is still in flight", id="wait-without-commit"),
    pytest.param(14, r"ldmatrix_x4 at .*selftest_model\.cpp:\d+ \(block \(0, 0, 0\), lane 0 of warp 0\): reads shared "
                     r"offset 512 while a cp_async_16 into it \(thread 0, warp 0, at .*\) is still in flight",
                 id="newer-group-pending"),
    pytest.param(15, r"ldmatrix_x4 at .*lane 0 of warp 1\): reads shared offset 0, which thread 0's cp_async_16 landed "
                     r"at its cp_async_wait with no sync_block since \(a read-after-write race on the device; the "
                     r"copy: warp 0, .*selftest_model\.cpp:\d+\)", id="wait-after-barrier"),
    pytest.param(16, r"warp 1: sync_warp at .* needs 32 lanes, the warp has 16", id="partial-warp"),
    pytest.param(17, r"200000 bytes of dynamic shared memory, sm_80 allows 166912", id="shared-too-large"),
    pytest.param(18, r"warp 0: a warp collective not reached by every lane: lanes 0-30 wait at sync_warp .*; "
                     r"lanes 31 wait at sync_block", id="barrier-vs-warp-last-lane"),
]


def _run_bug(which: int, defines: tuple[str, ...] = ()) -> torch.Tensor:
    lib = host_model(ENTRY, defines)
    g = torch.arange(1024, dtype=torch.int16)
    out = torch.zeros(64, 4, dtype=torch.int32)
    call(lib, "xk_selftest_bug", ctypes.c_int(which), g, out)
    return out


@pytest.mark.parametrize(("which", "message"), BUGS)
def test_kernel_bug_is_reported(which: int, message: str) -> None:
    """Each bug kernel gets an error naming the instruction, the place and the lanes, and the
    process lives on (the next launch on this thread works)."""
    with pytest.raises(HostModelError, match=message):
        _run_bug(which)
    out = _run_bug(0)
    # The same kernel without the bug: lane 0 holds tile 0's elements (0, 1) of row 0.
    assert out[0, 0].item() == 0 | (1 << 16)


def test_registrations_end_with_a_failed_launch() -> None:
    """register_global's ranges belong to one launch even when it fails its checks: a later
    launch without registrations may read any source."""
    with pytest.raises(HostModelError, match="sm_80 allows"):
        _run_bug(17)
    lib = host_model(ENTRY)
    out = torch.zeros(32, 4, dtype=torch.int32)
    call(lib, "xk_selftest_ldmatrix", ctypes.c_int(0), torch.zeros(512, dtype=torch.int16),
         torch.arange(32, dtype=torch.int32) * 8, out)


def test_portable_fiber_switch() -> None:
    """The ucontext fallback (-DXK_SIM_UCONTEXT, used off x86-64) runs the same kernels: the mma
    tile equals the default build's bit for bit, and a bug is reported the same way."""
    a = torch.randn(2, 16, 16).to(torch.bfloat16)
    b = torch.randn(2, 16, 16).to(torch.bfloat16)
    c = torch.randn(2, 16, 16)
    portable = _mma(torch.bfloat16, a, b, c, True, False, defines=("XK_SIM_UCONTEXT",))
    assert torch.equal(portable, _mma(torch.bfloat16, a, b, c, True, False))
    with pytest.raises(HostModelError, match="lanes 16-31 have exited"):
        _run_bug(3, defines=("XK_SIM_UCONTEXT",))


def test_launches_on_two_threads_at_once() -> None:
    """The scheduler's state is per OS thread: concurrent launches (ctypes drops the GIL) give each
    thread its own results, equal to a launch alone."""
    a = torch.randn(4, 16, 16).to(torch.float16)
    b = torch.randn(4, 16, 16).to(torch.float16)
    c = torch.randn(4, 16, 16)
    alone = _mma(torch.float16, a, b, c, False, True)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: _mma(torch.float16, a, b, c, False, True), range(6)))
    for result in results:
        assert torch.equal(result, alone)


def test_cp_async_lands_at_its_wait() -> None:
    """A plain load of a cp_async_16 destination sees 0xFFFF (NaN in fp16/bf16) until the wait that
    covers the copy's group, the data after it; full=false writes zeros."""
    lib = host_model(ENTRY)
    g = torch.arange(256, dtype=torch.int16)
    out = torch.zeros(32, 4, dtype=torch.int16)
    call(lib, "xk_selftest_cp_async_visibility", g, out)
    lanes = torch.arange(32, dtype=torch.int16)
    expected = torch.stack([torch.full_like(lanes, -1), torch.full_like(lanes, -1), lanes * 8, torch.zeros_like(lanes)], 1)
    assert torch.equal(out, expected)


TILES = 4
COPIERS = {"own-rows": -1, "warp0-copies": 0, "warp1-copies": 1, "both-copy": 2}


def _double_buffer(copier: int, landed: bool, done: bool) -> torch.Tensor:
    """selftest_model.cpp's double_buffer_kernel over TILES tiles (32 x 16) of g = 0, 1, 2, ...
    with `copier` as the kernel defines it; out (2, TILES, 32): each reading warp's register 0."""
    lib = host_model(ENTRY)
    g = torch.arange(TILES * 512, dtype=torch.int16)
    out = torch.zeros(2, TILES, 32, dtype=torch.int32)
    call(lib, "xk_selftest_double_buffer", ctypes.c_int(TILES), ctypes.c_int(copier), ctypes.c_int(landed),
         ctypes.c_int(done), g, out)
    return out


def _first_register(tile: int, row0: int) -> torch.Tensor:
    """ldmatrix_x4's register 0 per lane for rows row0 .. row0 + 15 of tile `tile` of g: row
    row0 + l // 4, columns 2 (l % 4) and 2 (l % 4) + 1 (low, high half)."""
    lanes = torch.arange(32, dtype=torch.int32)
    low = tile * 512 + (row0 + lanes // 4) * 16 + 2 * (lanes % 4)
    return low | ((low + 1) << 16)


@pytest.mark.parametrize("copier", COPIERS.values(), ids=COPIERS.keys())
def test_double_buffer_with_its_barriers_is_not_a_race(copier: int) -> None:
    """A double buffer with a barrier after each tile's wait and one ending each tile runs clean
    and every reading warp sees each tile. A warp streaming through rows only it copies needs
    only sync_warp (its ldmatrix, executed by all its lanes, precedes its lanes' next copies)."""
    out = _double_buffer(copier, landed=copier >= 0, done=copier >= 0)
    readers = [1 - copier] if copier in (0, 1) else [0, 1]
    for warp in readers:
        row0 = 16 * warp if copier < 0 else 16 * (1 - warp)
        for tile in range(TILES):
            assert torch.equal(out[warp, tile], _first_register(tile, row0)), (warp, tile)


@pytest.mark.parametrize(("copier", "message"), [
    # Both warps run the same program in lockstep, as the real kernels' warps: the refill of tile 0's
    # buffer by warp 0 finds warp 1's read of it in the same barrier epoch. Before the model kept
    # the reads per epoch this ran clean.
    pytest.param(2, r"thread 0: cp_async_16 at .*selftest_model\.cpp:\d+ \(thread 0, warp 0\) writes shared offset 0, "
                    r"which ldmatrix_x4 at .*selftest_model\.cpp:\d+ \(warp 1, row address of thread 32\) read with no "
                    r"sync_block since: a write-after-read race", id="both-copy"),
    # The reader runs first: the refill's issue finds the read.
    pytest.param(1, r"thread 32: cp_async_16 at .* \(thread 32, warp 1\) writes shared offset 512, which ldmatrix_x4 at "
                    r".* \(warp 0, row address of thread 0\) read with no sync_block since", id="reader-first"),
    # The copier runs first: the read finds the refill in flight.
    pytest.param(0, r"ldmatrix_x4 at .*\(block \(0, 0, 0\), lane 0 of warp 1\): reads shared offset 0 while a "
                    r"cp_async_16 into it \(thread 0, warp 0, at .*\) is still in flight", id="copier-first"),
])
def test_double_buffer_without_the_barrier_ending_each_tile_is_a_race(copier: int, message: str) -> None:
    """Dropping the barrier that ends each tile lets the copy of tile t + 2 into the buffer of tile t
    land while another warp may still read tile t (write after read). The model reports it in
    whichever order it runs the two warps."""
    with pytest.raises(HostModelError, match=message):
        _double_buffer(copier, landed=True, done=False)


@pytest.mark.parametrize(("copier", "message"), [
    # The copier runs first: its copy lands at its wait, the other warp reads it with no barrier since.
    pytest.param(0, r"ldmatrix_x4 at .*lane 0 of warp 1\): reads shared offset 0, which thread 0's cp_async_16 landed at "
                    r"its cp_async_wait with no sync_block since \(a read-after-write race on the device; the copy: "
                    r"warp 0, .*selftest_model\.cpp:\d+\)", id="copier-first"),
    # The reader runs first, before the copy is even issued: the issue finds the read.
    pytest.param(1, r"cp_async_16 at .* \(thread 32, warp 1\) writes shared offset 512, which ldmatrix_x4 at .* "
                    r"\(warp 0, row address of thread 0\) read with no sync_block since", id="reader-first"),
])
def test_double_buffer_without_the_barrier_after_the_wait_is_a_race(copier: int, message: str) -> None:
    """Dropping the barrier between the copier's cp_async_wait and the other warp's ldmatrix (read
    after write) is reported in whichever order the model runs the two warps."""
    with pytest.raises(HostModelError, match=message):
        _double_buffer(copier, landed=False, done=True)


def test_shfl_xor_exchanges_within_each_warp() -> None:
    """Lane l of each warp gets the value of lane l ^ mask of the same warp (its own past lane 31)."""
    lib = host_model(ENTRY)
    values = torch.arange(64, dtype=torch.float32) * 1.5
    masks = torch.randint(0, 40, (64,), dtype=torch.int32)
    out = torch.full((64,), float("nan"))
    call(lib, "xk_selftest_shfl", ctypes.c_int(64), values, masks, out)
    for t in range(64):
        source = (t % 32) ^ int(masks[t])
        assert out[t].item() == (values[t - t % 32 + source] if source < 32 else values[t]).item(), t


def test_thread_and_block_coordinates_and_order() -> None:
    """threadIdx/blockIdx/blockDim/gridDim of a 3-d launch, and the deterministic order: blocks
    x-fastest, threads of a block in linear order (x fastest) between collectives."""
    lib = host_model(ENTRY)
    grid, block = (3, 2, 2), (8, 2, 3)
    threads, blocks = 8 * 2 * 3, 3 * 2 * 2
    out = torch.zeros(blocks, threads, 13, dtype=torch.int32)
    call(lib, "xk_selftest_indices", torch.tensor(grid, dtype=torch.int32),
         torch.tensor(block, dtype=torch.int32), out)
    for b in range(blocks):
        bx, by, bz = b % 3, (b // 3) % 2, b // 6
        for t in range(threads):
            tx, ty, tz = t % 8, (t // 8) % 2, t // 16
            assert out[b, t].tolist() == [tx, ty, tz, bx, by, bz, *block, *grid, b * threads + t], (b, t)


# ---- fragment layouts, from the PTX ISA's tables (written element -> holder, unlike the model) ----


@pytest.mark.parametrize("variant", [0, 1, 2, 3], ids=["x4", "x4_trans", "x2", "x2_trans"])
def test_ldmatrix_layout_matches_ptx_table(variant: int) -> None:
    """Matrix j's row r comes from the address of lane 8j + r (rows scattered over shared memory);
    per the PTX ISA, row i of an 8 x 8 matrix is held by lanes 4i .. 4i + 3, two consecutive
    elements each (low half = lower column), in register j; .trans delivers the transpose.
    Addresses of lanes 16..31 are ignored by .x2 (they are misaligned here)."""
    lib = host_model(ENTRY)
    matrices = 4 if variant < 2 else 2
    trans = variant in (1, 3)
    image = torch.arange(512, dtype=torch.int32).to(torch.int16)  # element e holds e: its own coordinate
    slots = torch.randperm(64)[:32]
    offsets = (slots * 8).to(torch.int32)
    if matrices == 2:
        offsets[16:] = 3
    out = torch.zeros(32, 4, dtype=torch.int32)
    call(lib, "xk_selftest_ldmatrix", ctypes.c_int(variant), image, offsets, out)
    regs = out.numpy().view("uint32")

    for j in range(matrices):
        for row in range(8):
            for column in range(8):
                value = int(offsets[8 * j + row]) + column  # M_j[row][column]
                # Without .trans lane 4 row + column // 2 holds M_j[row][column]; with it, the element
                # at (row, column) of the transpose, i.e. M_j[column][row].
                held_row, held_column = (column, row) if trans else (row, column)
                lane = 4 * held_row + held_column // 2
                half = (int(regs[lane, j]) >> (16 * (held_column % 2))) & 0xFFFF
                assert half == value, (j, row, column, lane)
    if matrices == 2:
        assert (regs[:, 2:] == 0).all()


def _fragments(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each lane's registers for mma.m16n8k16 from the PTX ISA's formulas (groupID g = lane >> 2,
    threadID_in_group t = lane % 4): a_i (i < 8) at row g + 8 ((i >> 1) & 1), column 2t + (i & 1)
    + 8 (i >= 4); b_i (i < 4) at row 2t + (i & 1) + 8 (i >= 2), column g; c_i at row g + 8 (i >= 2),
    column 2t + (i & 1). 16-bit element 2k is the low half of register k, 2k + 1 the high half."""
    a_bits = a.view(torch.int16).to(torch.int64) & 0xFFFF
    b_bits = b.view(torch.int16).to(torch.int64) & 0xFFFF
    a_regs = torch.zeros(32, 4, dtype=torch.int64)
    b_regs = torch.zeros(32, 2, dtype=torch.int64)
    c_regs = torch.zeros(32, 4)
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for i in range(8):
            a_regs[lane, i // 2] |= a_bits[g + 8 * ((i >> 1) & 1), 2 * t + (i & 1) + 8 * (i >= 4)] << (16 * (i % 2))
        for i in range(4):
            b_regs[lane, i // 2] |= b_bits[2 * t + (i & 1) + 8 * (i >= 2), g] << (16 * (i % 2))
        for i in range(4):
            c_regs[lane, i] = c[g + 8 * (i >= 2), 2 * t + (i & 1)]
    return a_regs.to(torch.int32), b_regs.to(torch.int32), c_regs


@pytest.mark.parametrize("dtype", DTYPES)
def test_mma_layout_matches_ptx_table(dtype: torch.dtype) -> None:
    """Registers built from the PTX ISA's fragment formulas give D = A B + C laid out by the C/D
    formula: bit-exact with fp32 accumulation in the documented order (c, then k = 0..15)."""
    lib = host_model(ENTRY)
    a = torch.randn(16, 16).to(dtype)
    b = torch.randn(16, 8).to(dtype)
    c = torch.randn(16, 8)
    a_regs, b_regs, c_regs = _fragments(a, b, c)
    d_regs = torch.full((32, 4), float("nan"))
    call(lib, "xk_selftest_mma_fragments", ctypes.c_int(dtype == torch.bfloat16), a_regs, b_regs, c_regs, d_regs)
    d = torch.full((16, 8), float("nan"))
    for lane in range(32):
        for i in range(4):
            d[lane // 4 + 8 * (i >= 2), 2 * (lane % 4) + (i & 1)] = d_regs[lane, i]
    expected = c.clone()
    for k in range(16):
        expected = expected + a[:, k : k + 1].float() * b[k : k + 1, :].float()
    assert torch.equal(d, expected)
    # and a sanity check that this is the product at all
    torch.testing.assert_close(d.double(), a.double() @ b.double() + c.double(), atol=1e-5, rtol=1e-5)


# ---- 16-bit conversions: bit-exact against torch -------------------------------------------------

def _special_floats() -> torch.Tensor:
    """Zeros, infinities, NaNs, extremes and every kind of rounding tie for fp16 and bf16."""
    values = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), -float("nan"), 65504.0, 65519.996, 65520.0,
              -65520.0, 65536.0, 2.0**-14, 2.0**-24, 2.0**-25, 3 * 2.0**-25, 2.0**-25 * 1.0000001, 2.0**-26,
              1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 3.3895314e38,
              3.4028235e38, 1e-45, 1.17549435e-38, 2.0**-133, 2.0**-134]
    special = torch.tensor(values, dtype=torch.float32)
    # Quiet and signalling NaNs with payloads.
    nans = torch.tensor([0x7FC00000, 0x7F800001, 0xFFC00001 - 2**32, 0x7FBFFFFF, 0x7FFFE000], dtype=torch.int32)
    # Every exponent, with mantissas at and around the fp16 (13 dropped bits) and bf16 (16) ties.
    exponents = torch.arange(0, 255, dtype=torch.int32) << 23
    low = torch.tensor([0, 1, 0x0FFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0x10000, 0x18000,
                        0x7FFFFF, 0x7FE000, 0x7FF000], dtype=torch.int32)
    ties = (exponents[:, None] | low[None, :]).flatten()
    ties = torch.cat([ties, ties | torch.tensor(-(2**31), dtype=torch.int32)])
    return torch.cat([special, nans.view(torch.float32), ties.view(torch.float32)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_from_float_rounds_like_torch(dtype: torch.dtype) -> None:
    """from_float is round-to-nearest-even, bit for bit torch's conversion (NaN stays NaN) over
    the special values, every tie and 2^20 random bit patterns (subnormals included)."""
    lib = host_model(ENTRY)
    generator = torch.Generator().manual_seed(1)
    random = torch.randint(-(2**31), 2**31, (1 << 20,), dtype=torch.int64, generator=generator).to(torch.int32)
    x = torch.cat([_special_floats(), random.view(torch.float32)])
    out = torch.zeros(x.numel(), dtype=torch.int16)
    call(lib, "xk_selftest_from_float", ctypes.c_int(dtype == torch.bfloat16), x, out, ctypes.c_long(x.numel()))
    expected = x.to(dtype)
    nan = torch.isnan(x)
    assert torch.isnan(out.view(dtype)[nan]).all()
    mismatch = (out != expected.view(torch.int16)) & ~nan
    assert not mismatch.any(), [(float(v), int(o), int(e)) for v, o, e in
                                zip(x[mismatch][:5], out[mismatch][:5], expected.view(torch.int16)[mismatch][:5])]


@pytest.mark.parametrize("dtype", DTYPES)
def test_to_float_is_exact_for_every_pattern(dtype: torch.dtype) -> None:
    """to_float of all 65536 bit patterns equals torch's widening bit for bit (NaN stays NaN)."""
    lib = host_model(ENTRY)
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    out = torch.zeros(bits.numel(), dtype=torch.float32)
    call(lib, "xk_selftest_to_float", ctypes.c_int(dtype == torch.bfloat16), bits, out, ctypes.c_long(bits.numel()))
    expected = bits.view(dtype).float()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int32), expected[~nan].view(torch.int32))


# ---- the real kernels' double buffers without the barrier ending each tile ------------------------

def _contiguous_strides(t: torch.Tensor) -> ctypes.Array:
    return (ctypes.c_int64 * t.dim())(*t.stride())


def _run_ifa_forward(defines: tuple[str, ...], tokens: int, dim: int) -> None:
    """ifa_forward_model.cpp's xk_ifa_forward on one fp16 (1, tokens, 1, dim) problem of random
    values (the launcher's grid, shared memory and staging); raises HostModelError on a kernel bug."""
    lib = host_model("ifa_forward_model.cpp", defines)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, tokens, 1, dim, generator=gen).half() for _ in range(3))
    msg_k, msg_v = (torch.randn(1, 1, dim, generator=gen).half() for _ in range(2))
    out = torch.zeros(1, tokens, 1, dim, dtype=torch.int16)
    lse = torch.zeros(1, 1, tokens)
    staging = (ctypes.c_int * 2)(-1, -1)
    call(lib, "xk_ifa_forward", ctypes.c_int(0), ctypes.c_int(1), ctypes.c_int(tokens), ctypes.c_int(1),
         ctypes.c_int(dim), ctypes.c_double(dim**-0.5),
         *(arg for t in (q, k, v, msg_k, msg_v) for arg in (t.view(torch.int16), _contiguous_strides(t))),
         out, lse, staging)
    assert tuple(staging) == (1, 1), "expected the cp.async staging path (the one with a double buffer)"


def _run_ifa_backward(defines: tuple[str, ...], tokens: int, dim: int) -> None:
    """ifa_backward_model.cpp's xk_ifa_backward (dK/dV kernel, then dQ kernel) on one fp16
    (1, tokens, 1, dim) problem of random values; raises HostModelError on a kernel bug."""
    lib = host_model("ifa_backward_model.cpp", defines)
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, tokens, 1, dim, generator=gen).half().view(torch.int16) for _ in range(4))
    msg_k, msg_v = (torch.randn(1, 1, dim, generator=gen).half().view(torch.int16) for _ in range(2))
    lse = torch.full((1, 1, tokens), 3.0)
    delta = torch.randn(1, 1, tokens, generator=gen)
    tiles = lib.xk_ifa_backward_q_tiles(ctypes.c_int(tokens))
    grads = [torch.zeros(1, tokens, 1, dim, dtype=torch.int16) for _ in range(3)]
    parts = [torch.zeros(1, 1, tiles, dim) for _ in range(2)]
    rows_strides = torch.tensor([s for t in (q, k, v, dout) for s in t.stride()[:3]], dtype=torch.int64)
    vecs_strides = torch.tensor([s for t in (msg_k, msg_v) for s in t.stride()[:2]], dtype=torch.int64)
    assert lib.xk_ifa_backward_vec_staging(*(ctypes.c_void_p(t.data_ptr()) for t in (q, k, v, dout)),
                                           ctypes.c_void_p(rows_strides.data_ptr()), ctypes.c_int(dim)) == 1
    call(lib, "xk_ifa_backward", ctypes.c_int(0), ctypes.c_int(1), ctypes.c_int(tokens), ctypes.c_int(1),
         ctypes.c_int(dim), ctypes.c_double(dim**-0.5), q, k, v, dout, rows_strides, msg_k, msg_v, vecs_strides,
         lse, delta, *grads, *parts)


def _run_cfa_forward(defines: tuple[str, ...], tokens: int, dim: int) -> None:
    """cfa_forward_model.cpp's xk_cfa_forward on one fp16 video of ``tokens`` messages of width
    ``dim`` (two heads) with random values; raises HostModelError on a kernel bug."""
    lib = host_model("cfa_forward_model.cpp", defines)
    gen = torch.Generator().manual_seed(0)

    def bits(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).half().view(torch.int16)

    messages, w_in, b_in = bits(tokens, dim), bits(3 * dim, dim, scale=dim**-0.5), bits(3 * dim)
    ln_w, ln_b, b_out = bits(dim), bits(dim), bits(dim)
    mixed, residual = (torch.zeros(tokens, dim, dtype=torch.int16) for _ in range(2))
    staging = (ctypes.c_int * 1)(-1)
    call(lib, "xk_cfa_forward", ctypes.c_int(0), ctypes.c_int(1), ctypes.c_int(tokens), ctypes.c_int(dim),
         ctypes.c_int(2), ctypes.c_double(1e-5), messages, ln_w, ln_b, w_in, b_in, b_out, mixed, residual, staging)
    assert staging[0] == 1, "expected the cp.async staging path (the one with a double buffer)"


def _war_message(header: str) -> str:
    # The copy is issued where the kernel stages its tiles: its own header or mma_tiles.cuh.
    return (rf"cp_async_16 at .*(?:{header}|mma_tiles\.cuh):\d+ \(thread \d+, warp \d\) writes shared offset \d+, which ldmatrix_x[24]\w* "
            rf"at .*{header}:\d+ \(warp \d, row address of thread \d+\) read with no sync_block since: a "
            r"write-after-read race")


# (runner, N or T, D or W, the macro that drops the barrier, the kernel header). Shapes with three
# streamed tiles:
# the forward's key tiles are 32 rows; at D = 96 the dK/dV kernel's query tiles and the dQ
# kernel's key tiles are 32 rows too.
TILE_BARRIERS = [
    pytest.param(_run_ifa_forward, 65, 64, "XK_TEST_DROP_FWD_TILE_BARRIER", r"ifa_mma_forward\.cuh", id="forward"),
    pytest.param(_run_ifa_backward, 65, 96, "XK_TEST_DROP_DKDV_TILE_BARRIER", r"ifa_mma_backward\.cuh", id="backward-dkdv"),
    pytest.param(_run_ifa_backward, 65, 96, "XK_TEST_DROP_DQ_TILE_BARRIER", r"ifa_mma_backward\.cuh", id="backward-dq"),
    # The message path streams W in k-chunks of 32 columns: W = 96 is three (T = 8 messages).
    pytest.param(_run_cfa_forward, 8, 96, "XK_TEST_DROP_CFA_TILE_BARRIER", r"cfa_mma\.cuh", id="message-path"),
]


@pytest.mark.parametrize(("runner", "tokens", "dim", "macro", "header"), TILE_BARRIERS)
def test_kernel_without_its_tile_barrier_is_a_race(runner: Callable[..., None], tokens: int, dim: int, macro: str,
                                                   header: str) -> None:
    """The real kernel, built with the compile-time switch that drops the barrier ending each
    streamed tile, is reported as a write-after-read race on its double buffer (the warps run the
    same program in lockstep, so only the per-epoch read tracking sees it); with the barrier it
    runs clean on the same problem."""
    runner((), tokens=tokens, dim=dim)
    with pytest.raises(HostModelError, match=_war_message(header)):
        runner((macro,), tokens=tokens, dim=dim)
