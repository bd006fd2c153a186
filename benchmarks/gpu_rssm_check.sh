#!/usr/bin/env bash
# GPU check of the RSSM rollout variants (issue 4: the fold inside the launch,
# folded_inkernel_w8 / folded_inkernel_w16), for one GPU machine, from the repo root:
#
#     bash benchmarks/gpu_rssm_check.sh <git sha>
#
# Stages, each under its own time limit (all within about 6 minutes of wall time), each run
# even when the one before failed or was cut:
#   1. install   python3 -m pip install -q --no-deps --no-build-isolation -e .
#   2. tests     python3 -m pytest -v -m gpu -n 4 tests/test_rssm_rollout.py
#                -> $OUT/rssm_gpu_tests.txt (-v, not -q: a run cut by its time limit still
#                names the verdict of every test that finished)
#   3. sweep     benchmarks/sweep_rssm.py at K=5, H in {256, 512}, T in {1, 10, 50, 200} for
#                fused_volatile, fused_volatile_w8, folded_w8 and the in-kernel variants
#                -> $OUT/sweep_rssm.csv (graph replay and direct call, do_bench median, us)
#                   and $OUT/sweep_rssm.log (the table)
# $OUT: the folder the results go to (the device machine sets it; default ./rssm_gpu_check).
# The sha argument only labels the results ($OUT/info.txt): the copy that runs may have no
# git history of its own. Limits (seconds) can be changed: INSTALL_S, TESTS_S, SWEEP_S, and
# BUDGET_S for the whole script (each stage also stops when the budget is spent).
set -u

SHA=${1:-unknown}
OUT=${OUT:-$PWD/rssm_gpu_check}
mkdir -p "$OUT"
INSTALL_S=${INSTALL_S:-40}
TESTS_S=${TESTS_S:-200}
SWEEP_S=${SWEEP_S:-115}
BUDGET_S=${BUDGET_S:-345}
VARIANTS=${VARIANTS:-fused_volatile,fused_volatile_w8,folded_w8,folded_inkernel_w8,folded_inkernel_w16}
START=$SECONDS

stage() {  # stage NAME LIMIT LOG CMD...: time-limited (the whole process group), logged
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((BUDGET_S - (SECONDS - START)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        echo "== $name: skipped, the ${BUDGET_S} s budget is spent: $*"
        return 0
    fi
    echo "== $name (limit ${limit} s, at $((SECONDS - START)) s): $*"
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@" >"$log" 2>&1
    local rc=$?
    local why=""
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why=" (time limit)"
    echo "== $name: exit $rc$why in $((SECONDS - t0)) s; log $log"
    tail -n "${TAIL:-15}" "$log"
    if [ "$name" = tests ]; then  # every failure, also those of a run cut by its limit
        grep -E "(FAILED|ERROR) tests/" "$log" | sort -u | head -40
    fi
    echo
    return 0
}

{
    echo "git sha (argument): $SHA"
    echo "HEAD of this copy: $(git rev-parse --short HEAD 2>/dev/null || echo none)"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1
    echo "variants: $VARIANTS"
} | tee "$OUT/info.txt"
echo

stage install "$INSTALL_S" "$OUT/install.txt" \
    python3 -m pip install -q --no-deps --no-build-isolation -e .

stage tests "$TESTS_S" "$OUT/rssm_gpu_tests.txt" \
    python3 -m pytest -v -m gpu -n 4 -p no:cacheprovider -rfE tests/test_rssm_rollout.py

stage sweep "$SWEEP_S" "$OUT/sweep_rssm.log" \
    python3 benchmarks/sweep_rssm.py --variants "$VARIANTS" --K 5 --H 256,512 \
    --T 1,10,50,200 --hang-s 70 --csv "$OUT/sweep_rssm.csv"

echo "== done in $((SECONDS - START)) s; files in $OUT:"
ls -l "$OUT"
