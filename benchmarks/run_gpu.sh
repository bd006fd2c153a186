#!/usr/bin/env bash
# Run the GPU tests and the full-size benchmark suites on a CUDA machine, in one go.
#
#   bash benchmarks/run_gpu.sh [STAGE ...]     stages: tests kernels memory training optim
#
# Works offline: the project is installed editable without dependencies (torch, triton,
# numpy, pandas, matplotlib must already be there). Reports land under reports/; when $OUT is
# set (the lent GPU machine of this workplace), they are also packed into $OUT/reports.tgz
# and every log is copied there.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
LOG=${OUT:-/tmp/hybrid_triton_gpu}
mkdir -p "$LOG"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests kernels memory training optim)

# Optional comparison libraries carried as wheels (e.g. bitsandbytes) go to a private target.
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$LOG/install.log" 2>&1 ||
    { echo "editable install failed:"; tail -5 "$LOG/install.log"; exit 1; }
python3 -m hybrid_triton.env | tee "$LOG/env.txt"

run() {  # run NAME TIMEOUT CMD...: time-limited, logged, never stops the other stages
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$LOG/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - t0)) s"
    tail -n "${TAIL:-6}" "$LOG/$name.log"
}

for stage in "${stages[@]}"; do
    case $stage in
    tests) run tests "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -n 8 -p no:cacheprovider -rfE ;;
    kernels) run kernels "${KERNELS_TIMEOUT:-300}" hybrid-triton bench kernels --no-progress ;;
    memory) run memory "${MEMORY_TIMEOUT:-300}" hybrid-triton bench memory --no-progress ;;
    training) run training "${TRAINING_TIMEOUT:-300}" hybrid-triton bench training --no-progress ;;
    optim) run optim "${OPTIM_TIMEOUT:-300}" python3 benchmarks/optimizer_comparison.py --out reports/optim ;;
    *) echo "unknown stage $stage (tests kernels memory training optim)"; exit 2 ;;
    esac
done
if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/reports.tgz" reports
fi
