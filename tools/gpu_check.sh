#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU and no network: the GPU tests, the
# GPU benchmark, then (where torch and onnx2torch import and the shared data is
# found) the side-by-side benchmark against the peer on the GPU and a sampled
# profile of one refine (tools/profile_refine.py).
# Python wheels the machine lacks travel in .whl/ (see README "GPU"):
# onnxruntime-gpu and onnx-graphsurgeon (onnx2torch for the side-by-side run);
# CuPy, NumPy, SciPy, onnx and pytest are expected to be there already.
# Every step runs even if one before it failed (a device lease is short); the exit
# status says whether all passed.
#   bash tools/gpu_check.sh            # from the project root; REPEATS=3 by default
set -uo pipefail
failed=()
cd "$(dirname "$0")/.." || exit 1
# A wheel too large to carry in one piece travels split
# (split -b 50M NAME.whl .whl/NAME.whl.part: NAME.whl.partaa, .partab, ...): joined here.
for first in .whl/*.whl.partaa; do
  [ -e "$first" ] && cat "${first%aa}"* > "${first%.partaa}"
done
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# CUDA and cuDNN from pip's nvidia-* wheels (PyTorch's), where they are not on the
# loader's path already: onnxruntime-gpu loads them by name.
nv=$(python3 -c "import nvidia, os; print(' '.join(nvidia.__path__))" 2>/dev/null || true)
if [ -n "$nv" ]; then
  # shellcheck disable=SC2086  # one path per word
  libs=$(find $nv -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:)
  export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'PY'
import sys
import cupy
import onnxruntime as ort
from onnxfbp.run.forward import cuda_starts
print("onnxruntime", ort.__version__, ort.get_available_providers())
print("cupy", cupy.__version__, cupy.cuda.runtime.getDeviceCount(), "device(s)")
if not cuda_starts():
    sys.exit("onnxruntime's CUDA provider falls back to the CPU: CUDA or cuDNN libraries not found")
print("a CUDA session runs on CUDA")
PY
[ $? -eq 0 ] || exit 1
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py || failed+=("tests/test_gpu.py")
python3 tools/gpu_bench.py --device cuda --samples 10000 || failed+=("tools/gpu_bench.py")
if python3 -c "import torch, onnx2torch" 2>/dev/null \
    && python3 -c "import sys; sys.path.insert(0, 'tests'); from shared_data import models_dir as m; sys.exit(not (m() / 'mnist_pytorch25_legacy_cnn.onnx').is_file())"; then
  python3 tools/bench.py --device cuda --threads 4 --scenarios mnist-rot \
    --methods none,onnxfbp,adam-1 --repeats "${REPEATS:-3}" --markdown \
    || failed+=("tools/bench.py")
  python3 tools/profile_refine.py --device cuda || failed+=("tools/profile_refine.py")
else
  echo "side-by-side benchmark skipped: needs torch, onnx2torch and the shared model corpus"
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "gpu_check: all steps passed"
