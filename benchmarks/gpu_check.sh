#!/usr/bin/env bash
# The prepared GPU check, for a session that is lent a GPU machine (one command, about 5 minutes).
#
# The machine has its own python3 with torch, transformers, safetensors and pytest, but no diffusers
# (the reference) and no network. Here, once per checkout (.gitignore keeps the folder out of git):
#     pip download --no-deps -d .gpu-wheels diffusers==0.42.1 importlib_metadata
# then with the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-wheels"], timeout_s=540).
#
# It runs tests/test_gpu.py (our networks in float16 and bfloat16 against the references on the GPU,
# float16 images against diffusers', every generation door on CUDA), then benchmarks/bench_gpu.py
# (ours against diffusers on full-size random models). Logs and results go to $OUT (there) or
# benchmarks/results (elsewhere); the exit status is non-zero when a test failed.
set -uo pipefail
OUT="${OUT:-benchmarks/results}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
if compgen -G ".gpu-wheels/*.whl" > /dev/null; then
    python3 -m pip install --quiet --no-index --no-deps --target /tmp/gpu-site .gpu-wheels/*.whl
    export PYTHONPATH="/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu-smi.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT/gpu-smi.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log"
tests=$?
timeout 420 python3 benchmarks/bench_gpu.py --out "$OUT" 2>&1 | grep -v "it/s\]" | tee "$OUT/gpu-bench.log"
bench=$?
echo "tests exit $tests, benchmark exit $bench"
exit $(( tests != 0 || bench != 0 ))
