#!/usr/bin/env bash
# The device check; scripts/device_check.py does the work, docs/testing.md#the-device-check
# describes it.
#
#   scripts/device_check.sh quick OUT     # GPU, meant to take < 5 min on an H100/H200: build for
#                                         # sm_90a only, parity fp32/fp16/bf16 forward and
#                                         # backward (triton, cuda, sdpa), benchmarks.kernels
#   scripts/device_check.sh full OUT      # GPU, meant to take < 8 min: torch.compile/Inductor, the
#                                         # patched Hugging Face model (triton, cuda),
#                                         # benchmarks.vs_hf, benchmarks.run --preset gpu (8 frames)
#   scripts/device_check.sh rehearse OUT  # CPU, about 45 s of CPU: the same steps with CPU
#                                         # stand-ins (tests/scripts/test_device_check.py, make test)
#   scripts/device_check.sh report OUT    # the numbers in OUT as Markdown tables for BENCHMARKS.md
#
# OUT defaults to $OUT. The interpreter is $PYTHON, default python3: the GPU image has no venv,
# and its python3 (3.12) holds torch 2.11+cu130, triton 3.6, nvcc 13, transformers,
# pytest-xdist and pytest-timeout. Every step runs under its own timeout (per phase the budgets
# sum to 540 s; a step may use what earlier steps left, up to twice its budget; nothing runs
# past 580 s) and a failed step does not stop the next;
# OUT/summary.json and OUT/summary.txt are always written; the exit status is 1 when any step
# did not pass, 2 for a usage error. DEVICE_CHECK_FAIL_STEP=<step> makes that step fail on
# purpose (to check the above).
#
# With the device tool (one GPU machine lent now and then: 15 min of device time in all, its
# start of a minute or two included; at most 600 s per command; no network; the command runs in
# a copy of the repository root; $OUT is emptied before each command and at most 8 files come
# back from it, 16 MiB each; the machine stays warm 30 s after a command, then goes back bare):
#   1. here, once: `make device-wheels` (the wheels the GPU image lacks, into .whl/, which git
#      ignores and the tool's `carry` takes).
#   2. run `scripts/device_check.sh quick $OUT`, carry [".whl"], timeout_s 600. Back come
#      summary.txt, summary.json, check.log, parity.xml, kernels.json, the built extension
#      (_C.cpython-312-x86_64-linux-gnu.so) and device-check-ext.json (7 files).
#   3. at once, while the machine is warm and keeps the build: `scripts/device_check.sh full
#      $OUT`, carry [".whl"] (7 files back). If it went cold, copy the .so into xclip_kernels/
#      and device-check-ext.json into build/ here and add both paths to carry: the build step
#      sees an extension built from the same sources and does not compile again.
#   4. read OUT/summary.txt; rerun only a phase that failed, then give the machine back.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/device_check.py "$@"
