"""What the ``triton`` launchers hand to a launch, checked without a GPU and without launching.

The kernels are replaced by recorders and the inputs are ``meta`` tensors (shapes, no data), so
the launchers' real code computes its grids, configurations and device context at sizes no
CPU test could run: F * H = 70000 frame-heads must land on grid axis 0 (limit 2^31 - 1), not
on axis 1 (65535); every launch must happen inside ``torch.cuda.device(<the tensors'
device>)``, because Triton launches on the current device, not on the tensors'.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton")

from xclip_kernels.backends.triton import _common  # noqa: E402
from xclip_kernels.backends.triton import frame_attention as fa  # noqa: E402
from xclip_kernels.backends.triton import message_attention as ma  # noqa: E402

AXIS_LIMITS = (2**31 - 1, 65535, 65535)
LARGE_FH = 70000  # > 65535: L/14 (H = 16) with b * T = 4375 frames


class _DeviceContexts:
    """Stands in for ``torch.cuda.device``: records which device is current."""

    def __init__(self) -> None:
        self.current: list[torch.device] = []

    def __call__(self, device: torch.device) -> contextlib.AbstractContextManager:
        @contextlib.contextmanager
        def entered():
            self.current.append(torch.device(device))
            try:
                yield
            finally:
                self.current.pop()

        return entered()


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the
    grid, the keyword arguments and the device current at launch, and launches nothing."""

    def __init__(self, name: str, launches: list[dict], devices: _DeviceContexts) -> None:
        self.name, self.launches, self.devices = name, launches, devices

    def __getitem__(self, grid: tuple[int, ...]):  # noqa: ANN204
        def launch(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
            current = self.devices.current[-1] if self.devices.current else None
            self.launches.append({"kernel": self.name, "grid": grid, "kwargs": kwargs, "device": current})

        return launch


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    launches: list[dict] = []
    devices = _DeviceContexts()
    monkeypatch.setattr(torch.cuda, "device", devices)
    for module, name in ((fa, "_ifa_fwd_kernel"), (fa, "_ifa_bwd_dkdv_kernel"), (fa, "_ifa_bwd_dq_kernel"),
                         (ma, "_cfa_fwd_kernel")):
        monkeypatch.setattr(module, name, _Recorder(name, launches, devices))
    return launches


def _frame_tensors(frames: int, tokens: int, heads: int, head_dim: int, dtype: torch.dtype) -> list[torch.Tensor]:
    big = [torch.empty(frames, tokens, heads, head_dim, dtype=dtype, device="meta") for _ in range(3)]
    return [*big, *(torch.empty(frames, heads, head_dim, dtype=dtype, device="meta") for _ in range(2))]


def _assert_within_limits(grid: tuple[int, ...]) -> None:
    assert len(grid) <= 3
    for axis, size in enumerate(grid):
        assert 1 <= size <= AXIS_LIMITS[axis], f"grid {grid}: axis {axis} is {size}, CUDA allows {AXIS_LIMITS[axis]}"


@pytest.mark.parametrize("kernel", fa.IFA_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 257, 577])
def test_ifa_grid_puts_frame_heads_on_axis_0(kernel, dtype, tokens):
    config = fa.ifa_launch_config(kernel, dtype, 64)
    block = config.block_n if kernel == "backward_dkdv" else config.block_m
    grid = fa.ifa_grid(LARGE_FH // 16, 16, tokens, block)
    assert grid == (LARGE_FH, -(-tokens // block))
    _assert_within_limits(grid)


def test_ifa_grid_refuses_an_axis_past_its_limit():
    with pytest.raises(ValueError, match=r"grid axis 1 \(tiles of 16 of N = 1048577\) would be 65537"):
        fa.ifa_grid(1, 1, 16 * 65536 + 1, 16)
    with pytest.raises(ValueError, match=r"grid axis 0 \(F \* H frame-heads\) would be 2147483648"):
        fa.ifa_grid(2**27, 16, 1, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_ifa_launchers_put_large_frame_heads_on_axis_0(recorded, dtype):
    # L/14 at b * T = 4375 frames: F * H = 70000 frame-heads, over axis 1's 65535.
    q, k, v, msg_k, msg_v = _frame_tensors(LARGE_FH // 16, 257, 16, 64, dtype)
    out, lse = fa._ifa_forward(q, k, v, msg_k, msg_v, 0.125)
    fa._ifa_backward(torch.empty_like(out), q, k, v, msg_k, msg_v, out, lse, 0.125)
    assert [launch["kernel"] for launch in recorded] == ["_ifa_fwd_kernel", "_ifa_bwd_dkdv_kernel",
                                                         "_ifa_bwd_dq_kernel"]
    for launch, kernel in zip(recorded, fa.IFA_KERNELS):
        config = fa.ifa_launch_config(kernel, dtype, 64)
        block = config.block_n if kernel == "backward_dkdv" else config.block_m
        assert launch["grid"] == (LARGE_FH, -(-257 // block)), launch["kernel"]
        _assert_within_limits(launch["grid"])
        # The launch compiles what ifa_launch_config says (the static check reads the same).
        assert launch["kwargs"]["BLOCK_M"] == config.block_m and launch["kwargs"]["BLOCK_N"] == config.block_n
        assert launch["kwargs"]["num_warps"] == config.num_warps
        assert launch["kwargs"]["PRECISION"] == config.precision


def test_cfa_launcher_puts_videos_on_axis_0(recorded):
    videos, num_frames, width, heads = LARGE_FH, 8, 64, 2
    messages = torch.empty(videos * num_frames, width, device="meta")
    weights = [torch.empty(width, device="meta"), torch.empty(width, device="meta"),
               torch.empty(3 * width, width, device="meta"), torch.empty(3 * width, device="meta"),
               torch.empty(width, width, device="meta"), torch.empty(width, device="meta")]
    ma._cfa_forward(messages, *weights, num_frames, heads, 1e-5)
    (launch,) = recorded
    assert launch["grid"] == (videos, heads)
    _assert_within_limits(launch["grid"])
    with pytest.raises(ValueError, match=r"grid axis 1 \(heads\) would be 65536"):
        ma.cfa_grid(8, 8, 65536)


def test_launches_happen_on_the_tensors_device(recorded, monkeypatch):
    # "meta" stands in for a CUDA device other than the current one (cuda:1 while cuda:0 is
    # current): the launcher must make the tensors' device current around every launch.
    monkeypatch.setattr(_common, "_is_cuda", lambda device: device.type == "meta")
    q, k, v, msg_k, msg_v = _frame_tensors(3, 17, 2, 32, torch.bfloat16)
    out, lse = fa._ifa_forward(q, k, v, msg_k, msg_v, 0.125)
    fa._ifa_backward(torch.empty_like(out), q, k, v, msg_k, msg_v, out, lse, 0.125)
    messages = torch.empty(16, 64, device="meta")
    weights = [torch.empty(64, device="meta"), torch.empty(64, device="meta"), torch.empty(192, 64, device="meta"),
               torch.empty(192, device="meta"), torch.empty(64, 64, device="meta"), torch.empty(64, device="meta")]
    ma._cfa_forward(messages, *weights, 8, 2, 1e-5)
    assert len(recorded) == 4
    for launch in recorded:
        assert launch["device"] == q.device, f"{launch['kernel']} launched with current device {launch['device']}"


def test_cpu_and_meta_tensors_launch_without_a_cuda_context():
    # The interpreter's CPU tensors, and meta tensors of tools that record launches: no
    # torch.cuda.device (it would fail without CUDA).
    assert isinstance(_common.launch_device(torch.empty(1)), contextlib.nullcontext)
    assert isinstance(_common.launch_device(torch.empty(1, device="meta")), contextlib.nullcontext)


def test_launch_config_names_a_bad_kernel():
    with pytest.raises(ValueError, match=r"kernel: expected one of .*'forward'.*, got 'fwd'"):
        fa.ifa_launch_config("fwd", torch.float32, 64)
