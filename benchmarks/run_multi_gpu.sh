#!/usr/bin/env bash
# The multi-GPU proof (issue 9) on one host with 2 GPUs (the nvidia-h200-x2 kind):
#
#   bash benchmarks/run_multi_gpu.sh [NPROC]        default NPROC=2
#
# GPT-2 medium, FSDP2 per block + root, DistributedHybridTrainer vs HybridTrainer on one GPU
# at equal global batch: step losses, per-rank peak memory vs the planner's per-rank
# estimate, step time and scaling efficiency (benchmarks/multi_gpu.py). The report lands
# under reports/multi_gpu/; when $OUT is set (the lent GPU machine of this workplace) it is
# also packed into $OUT/reports.tgz with the logs. Works offline: the project is installed
# editable without dependencies (torch, triton, numpy, pandas, matplotlib already there).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
NPROC=${1:-2}
LOG=$(mktemp -d)/logs
mkdir -p "$LOG"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$LOG/install.log" 2>&1 ||
    { echo "editable install failed:"; tail -5 "$LOG/install.log"; exit 1; }
python3 -m hybrid_triton.env | tee "$LOG/env.txt"
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee -a "$LOG/env.txt"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt "$NPROC" ]; then
    echo "multi_gpu: needs $NPROC GPUs, this machine has $gpus" | tee "$LOG/multi_gpu.log"
    status=2
else
    # The standard-library corpus is built once, before the ranks start (they would all wait
    # on its lock otherwise).
    python3 -c "from hybrid_triton.data import load_corpus; load_corpus()" >"$LOG/corpus.log" 2>&1
    t0=$SECONDS
    timeout 1500 torchrun --standalone --nproc-per-node "$NPROC" benchmarks/multi_gpu.py \
        --out reports 2>&1 | tee "$LOG/multi_gpu.log"
    status=${PIPESTATUS[0]}
    echo "multi_gpu: exit $status after $((SECONDS - t0)) s" | tee -a "$LOG/multi_gpu.log"
fi
if [ -n "${OUT:-}" ]; then
    tar -czf "$OUT/reports.tgz" reports/multi_gpu 2>/dev/null || true
    cp -r "$LOG" "$OUT/" 2>/dev/null || true
fi
exit "$status"
