#!/usr/bin/env bash
# GPU check without the full stack: the trainer-side passes on CUDA (tests/gpu/test_gpu_paths.py),
# one line per check. Needs only PyTorch with CUDA, transformers and pytest (no vLLM, Ray, Hydra or
# network: the tiny models are built locally); DeepSpeed ZeRO-2 updates run when deepspeed,
# hydra-core and omegaconf are installed, and are skipped, with that reason, otherwise.
# The full stack (vLLM on CUDA, NCCL weight sync, sleep/wake) is scripts/gpu_smoke.sh's.
#
#   bash scripts/gpu_check.sh                            # on a GPU machine
#   RLHF_DIST_CHECK_DEVICE=cpu bash scripts/gpu_check.sh # the same checks on the CPU
#   bash scripts/gpu_check.sh -k bfloat16                # extra arguments go to pytest
#
# Env: PYTHON (default: $RLHF_DIST_VENV/bin/python, .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${RLHF_DIST_VENV:-.venv}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$venv/bin/python" ]; then PYTHON=$venv/bin/python; else PYTHON=python3; fi
fi

# The versions first; then, without CUDA and no RLHF_DIST_CHECK_DEVICE, one line and exit 2.
"$PYTHON" - <<'PY'
import importlib.util, os, platform, sys

missing = [m for m in ("torch", "transformers", "pytest") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check.sh: {sys.executable} lacks {', '.join(missing)} (needs torch with CUDA, transformers, pytest)")
import torch, transformers

def version(module):
    if importlib.util.find_spec(module) is None:
        return "not installed"
    from importlib.metadata import PackageNotFoundError, version as dist_version
    try:
        return dist_version({"hydra": "hydra-core"}.get(module, module))
    except PackageNotFoundError:
        return "installed"

device = os.environ.get("RLHF_DIST_CHECK_DEVICE", "")
built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
if device not in ("", "cpu", "cuda"):
    sys.exit(f"gpu_check.sh: RLHF_DIST_CHECK_DEVICE={device!r}: use cpu or cuda")
if not device and not torch.cuda.is_available():
    print(f"gpu_check.sh: torch {torch.__version__} ({built}) sees no CUDA device; run it on a GPU machine, or "
          "RLHF_DIST_CHECK_DEVICE=cpu bash scripts/gpu_check.sh for the same checks on the CPU", file=sys.stderr)
    sys.exit(2)
print(f"python {platform.python_version()}, torch {torch.__version__} ({built}), transformers {transformers.__version__}, "
      f"deepspeed {version('deepspeed')}, hydra-core {version('hydra')}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB")
print(f"checks on: {device or 'cuda:0'}")
PY
if [ "${RLHF_DIST_CHECK_DEVICE:-}" != cpu ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader | sed 's/^/nvidia-smi: /'
fi

exec "$PYTHON" -m pytest -p no:cacheprovider -v --tb=short tests/gpu/test_gpu_paths.py "$@"
