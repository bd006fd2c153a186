#!/usr/bin/env bash
# Run the GPU tests and the full-size benchmark suites on a CUDA machine, in one go.
#
#   bash benchmarks/run_gpu.sh [STAGE ...]     stages: tests sweep_quantize kernels sizes memory
#                                               memory_hf training optim
#
# 'sizes' (not in the default list: it takes about as long as 'kernels') is the size sweep of
# benchmarks/kernels_sizes.py, one process per kernel, merged into one report with sizes.png.
#
# Works offline: the project is installed editable without dependencies (torch, triton,
# numpy, pandas, matplotlib must already be there). Reports land under reports/; when $OUT is
# set (the lent GPU machine of this workplace), they are also packed into $OUT/reports.tgz
# and every log is copied there.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
LOG=$(mktemp -d)/logs
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

family_timeout() {  # seconds per kernel family (KERNELS_TIMEOUT overrides all)
    local -A limits=([mixed_precision]=90 [accumulate]=70 [adamw]=90 [quantize]=160 [rssm]=110 [elementwise]=30)
    echo "${KERNELS_TIMEOUT:-${limits[$1]:-120}}"
}

merge_report() {  # merge_report SUITE DIR: every DIR/*.csv into one report under reports/
    python3 - "$1" "$2" <<'PY'
import glob, sys
import pandas as pd
from hybrid_triton.bench.report import update_index, write_report
from hybrid_triton.bench.results import read_csv
suite, folder = sys.argv[1], sys.argv[2]
parts = sorted(glob.glob(f"{folder}/*.csv"))
if not parts:
    sys.exit(f"{suite}: no rows to report")
df = pd.concat([read_csv(p) for p in parts], ignore_index=True)
print(write_report(df, "reports", suite))
update_index("reports")
PY
}

for stage in "${stages[@]}"; do
    case $stage in
    tests)
        # Most tests in parallel; the big-tensor GPU tests (> 2^31 elements) one at a time.
        # -v prints every test's verdict as it happens, so a run cut by its time limit still
        # names the tests that failed before it (grep FAILED in the log).
        run tests "${TESTS_TIMEOUT:-200}" python3 -m pytest -v -n 8 -p no:cacheprovider -rfE -m "not gpu"
        grep -E "(FAILED|ERROR) tests/" "$LOG/tests.log" | sort -u | head -20
        run tests_gpu "${TESTS_GPU_TIMEOUT:-200}" python3 -m pytest -v -p no:cacheprovider -rfE -m gpu
        grep -E "(FAILED|ERROR) tests/" "$LOG/tests_gpu.log" | sort -u | head -20 ;;
    sweep_quantize)
        run sweep_quantize "${SWEEP_TIMEOUT:-240}" python3 -m benchmarks.sweep_quantize \
            "$LOG/sweep_quantize.csv" ;;
    sizes)
        # One process per kernel of the sweep (each compiles torch.compile once per size).
        parts=$(mktemp -d)
        # SIZES_KERNELS (comma-separated case-name prefixes) picks a subset, so the sweep can
        # be split across calls that each fit a time limit; the launch floor always runs.
        IFS=, read -ra kernels <<<"launch floor,${SIZES_KERNELS:-cast_scale,unscale,quantize int8,quantize ternary,quantize int4,dequantize int8,dequantize_add}"
        for kernel in "${kernels[@]}"; do
            slug=${kernel// /_}
            HYBRID_TRITON_PARTIAL_CSV="$parts/$slug.csv" run "sizes_$slug" \
                "${SIZES_TIMEOUT:-240}" hybrid-triton bench kernels --no-progress \
                --cases "sizes/$kernel*" --out "$parts/$slug" ${QUICK:+--quick}
        done
        merge_report kernels "$parts" ;;
    kernels)
        # One process per family, each under its own time limit, so a slow family cannot cost
        # the others their results; the rows are merged into one report at the end.
        parts=$(mktemp -d)
        for family in ${KERNEL_FAMILIES:-mixed_precision accumulate adamw quantize rssm elementwise}; do
            HYBRID_TRITON_PARTIAL_CSV="$parts/$family.csv" run "kernels_$family" \
                "$(family_timeout "$family")" hybrid-triton bench kernels --no-progress \
                --cases "$family/*" --out "$parts/$family" ${QUICK:+--quick}
        done
        merge_report kernels "$parts" ;;
    memory)
        # One process per model, each under its own time limit (MEMORY_TIMEOUT, or
        # MEMORY_TIMEOUT_<model with _ for ->); inside it every configuration has its own limit
        # (MEMORY_CONFIG_TIMEOUT) and the rows so far are written after each one, so a time
        # limit costs only the configuration it interrupts. MEMORY_SUBSET: a glob after the
        # model name ("* 8x1024"); MEMORY_CAPS: "8,16,24" checks each configuration under
        # each cap; MEMORY_OPTIONS: more suite options ("steps=2 cap_runs=all");
        # MEMORY_ALLOC_CONF: exported as PYTORCH_CUDA_ALLOC_CONF for this stage only
        # ("expandable_segments:True" checks the planner's expandable-segments model; the rows
        # record it, and the planner plans with the allocator the process runs under).
        parts=$(mktemp -d)
        alloc_env=()
        [ -n "${MEMORY_ALLOC_CONF:-}" ] && alloc_env=(env "PYTORCH_CUDA_ALLOC_CONF=$MEMORY_ALLOC_CONF")
        for model in ${MEMORY_MODELS:-gpt2-small gpt2-medium}; do
            limit_var="MEMORY_TIMEOUT_${model//-/_}"
            opts=(--option "config_timeout=${MEMORY_CONFIG_TIMEOUT:-150}")
            for o in ${MEMORY_OPTIONS:-}; do opts+=(--option "$o"); done
            [ -n "${MEMORY_CAPS:-}" ] && opts+=(--memory-cap "$MEMORY_CAPS")
            HYBRID_TRITON_PARTIAL_CSV="$parts/$model.csv" run "memory_$model" \
                "${!limit_var:-${MEMORY_TIMEOUT:-240}}" "${alloc_env[@]}" hybrid-triton bench memory --no-progress \
                --cases "$model ${MEMORY_SUBSET:-*}" --out "$parts/$model" "${opts[@]}" ${QUICK:+--quick}
            # The whole report's rows (savings, agreement) replace the partial ones.
            find "$parts/$model" -name results.csv -exec cp {} "$parts/$model.csv" \; 2>/dev/null
            grep -h "done in" "$LOG/memory_$model.log" | tail -n 40
        done
        merge_report memory "$parts" ;;
    memory_hf)
        # Hugging Face models built from configs (needs transformers on the machine), one
        # process per model so a time limit costs one model; MEMORY_HF_MODELS picks them,
        # MEMORY_HF_SETUPS the setups, MEMORY_HF_OPTIONS more options ("caps=none").
        parts=$(mktemp -d)
        for model in ${MEMORY_HF_MODELS:-gpt2 qwen2.5-0.5b llama-0.3b pythia-410m gemma2-0.9b mistral-0.4b qwen3-0.6b gpt2-large pythia-1b llama-3.2-1b qwen2.5-1.5b}; do
            opts=(--option "models=$model")
            [ -n "${MEMORY_HF_SETUPS:-}" ] && opts+=(--option "setups=$MEMORY_HF_SETUPS")
            for o in ${MEMORY_HF_OPTIONS:-}; do opts+=(--option "$o"); done
            HYBRID_TRITON_PARTIAL_CSV="$parts/$model.csv" run "memory_hf_$model" \
                "${MEMORY_HF_TIMEOUT:-180}" hybrid-triton bench memory_hf --no-progress \
                --out "$parts/$model" "${opts[@]}" ${QUICK:+--quick}
            find "$parts/$model" -name results.csv -exec cp {} "$parts/$model.csv" \; 2>/dev/null
            grep -h "done in" "$LOG/memory_hf_$model.log" | tail -n 20
        done
        merge_report memory_hf "$parts" ;;
    training) run training "${TRAINING_TIMEOUT:-300}" hybrid-triton bench training --no-progress ;;
    optim) run optim "${OPTIM_TIMEOUT:-300}" python3 benchmarks/optimizer_comparison.py --out reports/optim ;;
    *) echo "unknown stage $stage (tests sweep_quantize kernels sizes memory memory_hf training optim)"; exit 2 ;;
    esac
done
# Everything in two files: the lent machine returns at most 8 files from $OUT.
if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu_run.tgz" reports -C "$(dirname "$LOG")" logs
    cp "$LOG/env.txt" "$OUT/env.txt"
fi
