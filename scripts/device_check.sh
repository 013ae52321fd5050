#!/usr/bin/env bash
# The device check (scripts/device_check.py does the work; its docstring has the details).
#
#   scripts/device_check.sh quick OUT     # GPU, < 5 min on an H100/H200: build the extension for
#                                         # sm_90a, parity fp32/fp16/bf16 forward and backward
#                                         # (triton, cuda, sdpa), benchmarks.kernels
#   scripts/device_check.sh full OUT      # GPU, < 8 min: torch.compile/Inductor and the patched
#                                         # Hugging Face model (triton, cuda), benchmarks.vs_hf,
#                                         # benchmarks.run --preset gpu (8 frames)
#   scripts/device_check.sh rehearse OUT  # CPU, seconds: the same steps with CPU stand-ins
#                                         # (tests/scripts/test_device_check.py; make test)
#   scripts/device_check.sh report OUT    # the numbers in OUT as Markdown tables for BENCHMARKS.md
#
# OUT defaults to $OUT. The interpreter is $PYTHON, default python3 (the GPU image has no venv:
# its python3 holds torch 2.11+cu130, triton 3.6, transformers, pytest-xdist, pytest-timeout).
# Every step runs under its own timeout (per phase they sum to 540 s, under the 600 s a device
# command may run) and a failed step does not stop the next; OUT/summary.json and
# OUT/summary.txt are always written; the exit status is 1 when any step did not pass.
# DEVICE_CHECK_FAIL_STEP=<step> makes that step fail on purpose.
#
# On the device machine (the `device` tool; 15 min of device time in all, start included):
#   1. here, once: `make device-wheels` (the wheels the GPU image lacks, into .whl/).
#   2. run: `scripts/device_check.sh quick $OUT` with carry [".whl"] and timeout_s 600.
#      OUT comes back with summary.txt, summary.json, check.log, parity.xml, kernels.json, the
#      built extension (_C.cpython-312-x86_64-linux-gnu.so) and device-check-ext.json.
#   3. at once (the machine stays warm 30 s, and keeps the build): `scripts/device_check.sh full
#      $OUT`, carry [".whl"]. If it went cold, copy the .so back into xclip_kernels/ and
#      device-check-ext.json into build/ here and carry those two paths as well: the build step
#      then finds the extension built from these sources and skips nvcc (about 2 minutes).
#   4. a step that failed or timed out: fix, and rerun that phase; give_back when done.
# At most 8 files come back from OUT; each phase writes at most 7.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/device_check.py "$@"
