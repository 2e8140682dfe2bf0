#!/usr/bin/env bash
# Everything a lent GPU machine must show, in one call of under 5 minutes (run from the repository root):
#   bash benchmarks/gpu.sh
# 1. installs what it needs into .gpu-venv (a CUDA build of torch from the package registry, this package,
#    pytest), 2. runs every CUDA test (pytest -m cuda: CPU/GPU agreement of squeeze, extract, combine, merge,
#    LoHa/LoKr conversion, TwoNN search, TeRA forward and tune), 3. times each GPU workload against the same
#    command on the CPU and the I/O floor (benchmarks/gpu_suite.py) and writes gpu_suite.md / gpu_suite.json
#    and pytest.txt to $OUT if set, else to benchmarks/out/. Prints its own total.
# Without a CUDA device it says so in one line and exits 0 after checking that every piece it calls exists.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/benchmarks/out}"
mkdir -p "$OUT"
export OUT
start=$(date +%s)
if ! nvidia-smi -L >/dev/null 2>&1; then
    exec "${PYTHON:-python3}" benchmarks/gpu_suite.py --check
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
if [ ! -x .gpu-venv/bin/python ]; then
    python3 -m venv .gpu-venv
fi
. .gpu-venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch            # the registry's default Linux wheel: a CUDA build
python -m pip install -q -e . pytest hypothesis
python -c "import torch; assert torch.cuda.is_available(), 'torch has no CUDA'; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
echo "install: $(( $(date +%s) - start )) s"
status=0
python -m pytest -q -m cuda tests/test_cuda.py 2>&1 | tee "$OUT/pytest.txt" || status=$?
python benchmarks/gpu_suite.py --out "$OUT"
echo "gpu.sh total: $(( $(date +%s) - start )) s (tests exit status $status)"
exit $status
