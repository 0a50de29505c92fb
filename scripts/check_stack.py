"""setup.sh's check of a venv's stack: the stack imports, and the GPU stack's torch is a CUDA
build that sees the GPU. Prints one line: the versions, or what is wrong and the fix.

    .venv/bin/python scripts/check_stack.py cpu|gpu
"""

from __future__ import annotations

import shutil
import sys


def cuda_status() -> str:
    """The GPU stack's torch: a CUDA build (vLLM's ``torch==X`` pin also accepts ``X+cpu``), and, where
    nvidia-smi shows a GPU is meant to be here, one that sees it. Without nvidia-smi (an image build,
    a login node) only the build is checked here; the next set-up on the GPU machine checks the GPU."""
    import torch

    where = f"torch {torch.__version__} in {sys.prefix}"
    if torch.version.cuda is None:
        sys.exit(f"setup.sh gpu: {where} is a CPU build (torch.version.cuda is None); set up the GPU stack in a "
                 f"fresh venv (mv {sys.prefix} {sys.prefix}-cpu) with pip reaching PyPI's CUDA torch, not PyTorch's "
                 "CPU index (see PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, pip config list)")
    if torch.cuda.is_available():
        return f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}"
    if shutil.which("nvidia-smi"):
        sys.exit(f"setup.sh gpu: {where}, built for CUDA {torch.version.cuda}, sees no GPU although nvidia-smi "
                 f"is here: is the driver older than CUDA {torch.version.cuda} needs (nvidia-smi's header shows "
                 "the newest CUDA it supports), or CUDA_VISIBLE_DEVICES empty?")
    return f"CUDA {torch.version.cuda}; no nvidia-smi here, so whether it sees a GPU is not checked"


def main(stack: str) -> None:
    cuda = f" ({cuda_status()})" if stack == "gpu" else ""  # first: a CPU build fails before the slow imports
    from importlib.metadata import entry_points

    import deepspeed
    import hydra  # noqa: F401
    import ray
    import torch
    import transformers  # noqa: F401
    import vllm
    import wandb  # noqa: F401
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401  fails if a broken torchvision is present

    import rlhf_dist.train  # noqa: F401

    plugins = [e for e in entry_points(group="vllm.general_plugins") if e.name == "rlhf_dist_gloo"]
    assert plugins, "vLLM plugin not registered"
    plugins[0].load()  # its target resolves (an install older than the code names a module that is gone)
    print(f"rlhf_dist ready: torch {torch.__version__}{cuda}, vllm {vllm.__version__}, "
          f"deepspeed {deepspeed.__version__}, ray {ray.__version__}")

if __name__ == "__main__":
    if sys.argv[1:] not in (["cpu"], ["gpu"]):
        sys.exit("usage: check_stack.py cpu|gpu")
    main(sys.argv[1])
