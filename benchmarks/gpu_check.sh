#!/usr/bin/env bash
# The GPU checks of a session lent a device machine, as one script: the test suite
# (every test takes the device as a parameter, so CUDA runs too), then bench-quick
# on CUDA. Runs from the repository root with the machine's own python3 and torch,
# nothing installed (PYTHONPATH=.). Usage: bash benchmarks/gpu_check.sh OUT_DIR
set -uo pipefail
out=${1:-gpu_check_out}
mkdir -p "$out"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"
timeout "${TEST_TIMEOUT:-280}" python3 -m pytest -q tests -p no:cacheprovider -n 12 -rfE 2>&1 | tee "$out/pytest.log" | tail -30
timeout "${BENCH_TIMEOUT:-200}" python3 -m benchmarks.run --quick --device cuda --out "$out/results" 2>&1 | tee "$out/bench.log" | tail -30
