#!/usr/bin/env bash
# Everything a lent GPU machine must show, in one call of under 5 minutes (run from the repository root):
#   bash benchmarks/gpu.sh
# 1. uses the machine's own CUDA torch ($PYTHON, default python3: the lent machines have one and fetch nothing;
#    this package runs from the checkout, wheels carried in .whl/ — tensorly and threadpoolctl, which their image
#    may lack — go to .gpu-site); where that python has no CUDA torch it installs one into .gpu-venv from the
#    package registry instead; 2. runs every CUDA test (pytest -m cuda tests/test_cuda.py: CPU/GPU agreement of
#    squeeze, extract, combine, merge, LoHa/LoKr conversion, TwoNN search, TeRA forward and tune); 3. times each
#    GPU workload against the same command on the CPU and the I/O floor (benchmarks/gpu_suite.py) and writes
#    gpu_suite.md / gpu_suite.json and pytest.txt to $OUT if set, else to benchmarks/out/. Prints its own total.
# Without a CUDA device it says so in one line and exits 0 after checking that every piece it calls exists ($PYTHON
# must have torch for that check; without it, one line and exit 1).
# GPU_SUITE_DEVICE=cpu: a dry run of all of the above with the CPU in the GPU's place (no GPU needed).
# On the device tool (docs/benchmarks.md):
#   python3 -m pip download --no-deps -d .whl tensorly==0.10.0 threadpoolctl==3.8.0, then
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/benchmarks/out}"
mkdir -p "$OUT"
export OUT
start=$(date +%s)
# this package from the checkout, no install (cli/ is the package surgery_cli)
mkdir -p .gpu-path
ln -sfn ../cli .gpu-path/surgery_cli
export PYTHONPATH="$PWD:$PWD/.gpu-path:$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH}"
unset TORCH_ALLOW_TF32_CUBLAS_OVERRIDE  # full float32 matmuls, as surgery requires (it refuses TF32)
PY="${PYTHON:-python3}"
DEV="${GPU_SUITE_DEVICE:-cuda}"
cuda() { "$1" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; }
if [ "$DEV" = cuda ] && ! nvidia-smi -L >/dev/null 2>&1 && ! cuda "$PY"; then  # no GPU seen either way
    if ! "$PY" -c "import torch" 2>/dev/null; then
        echo "no CUDA device, and $PY has no torch to check the suite's pieces with: set PYTHON to the project environment's python"
        exit 1
    fi
    exec "$PY" benchmarks/gpu_suite.py --check
fi
if [ "$DEV" = cuda ]; then
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null ||
        "$PY" -c "import torch; print(torch.cuda.get_device_name(0))"; } | tee "$OUT/device.txt"
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target .gpu-site .whl/*.whl
fi
if [ "$DEV" = cuda ] && ! cuda "$PY"; then
    [ -x .gpu-venv/bin/python ] || "$PY" -m venv .gpu-venv
    PY=.gpu-venv/bin/python
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q torch  # the registry's default Linux wheel: a CUDA build
    "$PY" -m pip install -q numpy safetensors tensorly threadpoolctl scipy click huggingface_hub pytest hypothesis \
        peft transformers
fi
"$PY" -c "import sys, torch; assert sys.argv[1] == 'cpu' or torch.cuda.is_available(), 'torch has no CUDA'
print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0) if sys.argv[1] != 'cpu' else 'cpu')" "$DEV"
for lib in tensorly threadpoolctl; do
    "$PY" -c "import $lib" 2>/dev/null || echo "$lib is missing: carry its wheel in .whl/ (docs/benchmarks.md)"
done
echo "set-up: $(( $(date +%s) - start )) s"
tests=0 suite=0
SURGERY_TEST_DEVICE=$DEV "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tee "$OUT/pytest.txt" ||
    tests=$?
"$PY" benchmarks/gpu_suite.py --out "$OUT" --device "$DEV" ${GPU_SUITE_ONLY:+--only "$GPU_SUITE_ONLY"} ||
    suite=$?  # a failed workload: its row says why, the others run
echo "gpu.sh total: $(( $(date +%s) - start )) s (exit status: tests $tests, suite $suite)"
[ "$tests" = 0 ] && [ "$suite" = 0 ]
