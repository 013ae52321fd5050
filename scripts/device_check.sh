#!/usr/bin/env bash
# The GPU check: one command for a CUDA machine (H100 image: torch 2.11+cu130, triton 3.6,
# no network). Builds the CUDA extension in place (sm_90a), runs the CUDA parity tests
# (triton, cuda, sdpa, xformers; fp32/fp16/bf16; forward and backward), torch.compile with a
# dynamic batch and the patched Hugging Face model on triton/cuda, the kernel benchmark,
# the end-to-end comparison with Hugging Face and the GPU preset of benchmarks.run, and
# writes logs and JSON into the folder named by $OUT or the first argument. Every step has
# its own timeout; the whole should stay near 6 minutes on an H100.
#
#   make device-wheels                 # here, once: wheels the GPU image lacks -> .whl/
#   scripts/device_check.sh OUTDIR     # there (device tool: carry [".whl"]); PYTHON=python3 by default
#
# It fails loudly (non-zero exit, a line saying what is missing) rather than skipping:
# no CUDA, no triton, or a missing package is an error here, and so is any failed test.
set -euo pipefail

out_dir="${1:-${OUT:-}}"
if [ -z "$out_dir" ]; then
    echo "device_check: give the output folder as the first argument or in \$OUT" >&2
    exit 2
fi
mkdir -p "$out_dir"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)

# Packages the GPU image does not have travel as wheels in .whl/ (see `make device-wheels`).
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/xclip-site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/xclip-site"
fi

"$PY" - <<'EOF' 2>&1 | tee "$out_dir/environment.txt"
import importlib, sys
missing = [m for m in ("torch", "triton", "safetensors", "instant_clip_tokenizer", "transformers", "pytest")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"device_check: missing Python packages: {', '.join(missing)} (run `make device-wheels` here first)")
import torch, triton
if not torch.cuda.is_available():
    sys.exit(f"device_check: torch {torch.__version__} sees no CUDA device")
print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
      f"CUDA {torch.version.cuda}  python {sys.version.split()[0]}")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

echo "== building the CUDA extension in place (sm_90a)" | tee "$out_dir/build.log"
XCLIP_CUDA_ARCHS=90a MAX_JOBS=16 timeout 200 "$PY" setup.py --quiet build_ext --inplace 2>&1 | tail -20 | tee -a "$out_dir/build.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "device_check: building the extension failed" >&2; exit 1; }

"$PY" -m xclip_kernels | tee "$out_dir/backends.txt"

echo "== CUDA parity tests" | tee "$out_dir/pytest.log"
set +e
timeout 180 "$PY" -m pytest -q -m "not triton_interpreter" \
    tests/xclip_kernels/backends/test_triton_cuda.py tests/xclip/test_checkpoint.py::test_map_location_cuda \
    --junitxml="$out_dir/pytest.xml" 2>&1 | tee -a "$out_dir/pytest.log"
tests_status=${PIPESTATUS[0]}
set -e

echo "== torch.compile (dynamic batch) and patched Hugging Face XCLIPModel on triton and cuda" | tee "$out_dir/pytest_compile_hf.log"
set +e
timeout 150 "$PY" -m pytest -q -m cuda tests/xclip/test_compile.py tests/xclip_kernels/integrations/test_hf.py \
    --junitxml="$out_dir/pytest_compile_hf.xml" 2>&1 | tee -a "$out_dir/pytest_compile_hf.log"
compile_hf_status=${PIPESTATUS[0]}
set -e
[ "$compile_hf_status" -eq 0 ] || tests_status=$compile_hf_status

echo "== kernel benchmark" | tee "$out_dir/kernels.log"
timeout 90 "$PY" -m benchmarks.kernels --variants xclip-b16 --batch 32 --dtype bfloat16 \
    --json "$out_dir/kernels.json" 2>&1 | tee -a "$out_dir/kernels.log"

echo "== end to end against Hugging Face (B/16, 8 frames, batch 32, bf16)" | tee "$out_dir/vs_hf.log"
timeout 120 "$PY" -m benchmarks.vs_hf --device cuda --dtype bfloat16 --variant xclip-b16 --batch 32 \
    --rounds 10 --compile --json "$out_dir/vs_hf.json" 2>&1 | tee -a "$out_dir/vs_hf.log"

echo "== benchmarks.run --preset gpu (B/16 and L/14 against the baselines, bf16, batch 32)" | tee "$out_dir/run_gpu.log"
timeout 120 "$PY" -m benchmarks.run --preset gpu --rounds 3 --json "$out_dir/run_gpu.json" \
    --plot "$out_dir/run_gpu.png" 2>&1 | tee -a "$out_dir/run_gpu.log"

echo "device_check: done in $(( $(date +%s) - start )) s; tests exit status $tests_status" | tee "$out_dir/summary.txt"
exit "$tests_status"
