"""``python -m xclip_kernels``: print every backend, whether it runs here, and why not; and which
GEMM provider CPU inference takes here per dtype, with the measured rates (when run)."""

from __future__ import annotations

import sys

import torch

from . import _env, gemm
from .registry import BACKENDS, PRIORITY, backend_table, get_backend


def _settings_error() -> str | None:
    """What is wrong with the environment variables the library reads, or None."""
    forced = _env.forced_backend()
    if forced is not None and forced not in BACKENDS:
        return f"XCLIP_KERNELS_BACKEND: expected one of {', '.join(BACKENDS)} or unset, got {forced!r}"
    for read in (_env.cpu_isa, _env.gemm_provider):
        try:
            read()
        except ValueError as exc:
            return str(exc)
    return None


def _gemm_lines() -> list[str]:
    """Which provider CPU inference GEMMs take here, per dtype, and what decided it."""
    forced = _env.gemm_provider()
    if forced == "float32":
        return ["CPU inference GEMMs: bfloat16 and float16 widened to float32, float32 on its measured provider "
                "(XCLIP_KERNELS_GEMM=float32)"]
    if forced is not None:
        return [f"CPU inference GEMMs: {forced} for every dtype (XCLIP_KERNELS_GEMM={forced})"]
    lines = []
    if not gemm.onednn_available():
        lines.append("CPU inference GEMMs: no oneDNN provider (this torch has no oneDNN linear op)")
    for dtype in gemm.MEASURED_DTYPES:
        if len(gemm.candidates(dtype)) == 1:
            continue
        found = gemm.measure(dtype)
        rates = [f"matmul {found.matmul_gflops:.0f}"]
        if found.onednn_gflops is not None:
            rates.append(f"oneDNN prepacked {found.onednn_gflops:.0f}")
        if found.float32_gflops is not None:
            rates.append(f"widened to float32 (on {gemm.float32_engine()}, conversions included) "
                         f"{found.float32_gflops:.0f}")
        lines.append(
            f"CPU inference GEMMs in {str(dtype).removeprefix('torch.')}: {found.chosen} (measured now on "
            f"{'x'.join(map(str, gemm.CALIBRATION_SHAPE))}: {', '.join(rates)} GFLOP/s; a provider other than "
            f"matmul needs {gemm.MARGIN:.2f}x the best it replaces; XCLIP_KERNELS_GEMM fixes it)"
        )
    return lines


def main() -> int:
    error = _settings_error()
    if error is not None:  # every op call would raise it: say so here too, in one line
        print(f"python -m xclip_kernels: error: {error}", file=sys.stderr)
        return 2
    rows = backend_table()
    print(f"xclip_kernels backends (torch {torch.__version__}, CUDA available: {torch.cuda.is_available()})")
    print(f"{'backend':<10} {'available':<9} {'devices':<10} {'dtypes':<33} {'backward':<8} ops")
    for row in rows:
        print(
            f"{row['name']:<10} {'yes' if row['available'] else 'no':<9} {','.join(row['devices']):<10} "
            f"{','.join(row['dtypes']):<33} {'yes' if row['backward'] else 'no':<8} {','.join(row['ops'])}"
        )
        for reason in row["reasons"]:
            print(f"{'':<10} why not: {reason}")
        if not row["reasons"]:
            backend = get_backend(row["name"])
            for device in row["devices"]:
                why = backend.device_reasons(device)
                status = "runs here" if not why else "not here: " + "; ".join(why)
                print(f"{'':<10} on {device}: {status}")
            for note in row["notes"]:
                print(f"{'':<10} note: {note}")
    for device, names in PRIORITY.items():
        print(f"automatic choice on {device}: {' > '.join(names)}")
    forced = _env.forced_backend()
    if forced is not None:
        print(f"XCLIP_KERNELS_BACKEND={forced}: calls with backend=None use {forced}")
    for line in _gemm_lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
