#!/usr/bin/env bash
# The GPU checks of a session lent a device machine, as one script: bench-quick on CUDA
# first (the figures the README reports), step profiles of the worst misses (benchmarks.
# step_profile), then every test on its CUDA parametrization
# (every test takes the device as a parameter; the CPU half runs in CI). Runs from the
# repository root with the machine's own python3 and torch (PYTHONPATH=.). That machine
# lacks expecttest, which torch.testing._internal (tests/test_optim_db.py) imports: carry
# its wheel in .whl/ (device README, "Notes") and it is installed first.
# Usage: bash benchmarks/gpu_check.sh OUT_DIR [PART ...]   parts: bench profiles race tests.
# The default, "bench tests", took 3.3 + 4.5 min on an H200 (2026-11-27; the bench now times up
# to 5 s more per config, --timing-s 5): one `run` call, whose
# limit is 10 minutes. "profiles race" (at most 2 x 2 + 2.5 min) in a second call if time is left.
set -uo pipefail
out=${1:-gpu_check_out}
parts=" ${*:2} "
[[ -z "${*:2}" ]] && parts=" bench tests "
want() { [[ "$parts" == *" $1 "* ]]; }
mkdir -p "$out"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi -L
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"
if want bench; then
    timeout "${BENCH_TIMEOUT:-270}" python3 -m benchmarks.run --quick --device cuda --timing-s 5 --out "$out/results" >"$out/bench.log" 2>&1
    echo "bench rc=$?"
    tail -25 "$out/bench.log"
fi
# Where fx_optim's step time goes against its peers on the two worst misses of the last GPU run
# (README, "On a GPU"): per step, kernel launches, host-device copies, synchronizations and
# .item() reads, device kernels, and the ops with the most self CPU time; Chrome traces in OUT.
for config in "mlp adamw" "convnet sgd"; do
    want profiles || break
    set -- $config
    timeout "${PROFILE_TIMEOUT:-120}" python3 -m benchmarks.step_profile --quick --device cuda --model "$1" \
        --optimizer "$2" --steps 10 --trace "$out/traces" >"$out/profile_$1.log" 2>&1
    echo "profile $1 rc=$?"
    grep -v "^\s*$" "$out/profile_$1.log" | tail -60
done
# The H200 fuzz failure's diagnosis (README, Known limitations): failures only without the barrier.
want race && timeout "${RACE_TIMEOUT:-150}" python3 tests/cuda_race_check.py 4 cuda 2>&1 | grep barrier
# One compile thread per xdist worker: 15 workers then keep the 16 cores busy, not oversubscribed.
if want tests; then
    TORCHINDUCTOR_COMPILE_THREADS=1 timeout "${TEST_TIMEOUT:-300}" \
        python3 -m pytest -q tests -k cuda -p no:cacheprovider -p no:benchmark -n 15 -rfE >"$out/pytest.log" 2>&1
    echo "pytest rc=$?"
    grep -E "^(FAILED|ERROR)|passed|failed" "$out/pytest.log" | tail -20
fi
