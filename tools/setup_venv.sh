#!/usr/bin/env bash
# Create or refresh the CPU .venv at the repo root (Python 3.11, the stack of
# shared/notes/cpu-stack.md). Cached: a stamp records the hash of setup.py and this script.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.tbrm-stamp"
want=$(cat "$root/setup.py" "$root/tools/setup_venv.sh" | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
echo "[setup] creating $venv with $($py --version)"
[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip wheel setuptools
# torch first and pinned: the CPU wheel; anything unpinned would pull a CUDA build.
"$venv/bin/python" -m pip install -q "torch==2.13.0"
"$venv/bin/python" -m pip install -q -e "$root[cpu,test]"
# PyPI's CUDA builds of these fail against torch+cpu and break transformers' Qwen2 import;
# triton is unused on CPU. Text models need none of them.
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
"$venv/bin/python" -c "import torch, vllm, megatron.core, math_verify, transformers; print('[setup] torch', torch.__version__, 'vllm', vllm.__version__, 'mcore', megatron.core.__version__)"
echo "$want" > "$stamp"
