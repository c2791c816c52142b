#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU and no network: the GPU tests, then
# the GPU benchmark. Python wheels the machine lacks travel in .whl/ (see
# README "GPU"): onnxruntime-gpu and onnx-graphsurgeon for its Python; CuPy,
# NumPy, SciPy, onnx and pytest are expected to be there already.
#   bash tools/gpu_check.sh            # from the project root
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'PY'
import onnxruntime as ort, cupy
print("onnxruntime", ort.__version__, ort.get_available_providers())
print("cupy", cupy.__version__, cupy.cuda.runtime.getDeviceCount(), "device(s)")
PY
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
python3 tools/gpu_bench.py --device cuda --samples 10000
