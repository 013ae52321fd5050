"""``python -m xclip_kernels``: print every backend, whether it runs here, and why not."""

from __future__ import annotations

import sys

import torch

from .registry import PRIORITY, backend_table, get_backend


def main() -> int:
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
