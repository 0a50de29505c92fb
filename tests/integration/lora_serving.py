"""Run by ``test_lora_families.py`` in a process of its own (vLLM in process, no Ray):

    python -m tests.integration.lora_serving <out dir> <tokenizer dir> <family> [<family> ...]

For each family: its tiny random model (``models.tiny.build_random_lm``), peft's rank-8 adapters on
every projection (``models.lora.add_adapters``) with random B (peft starts B at 0, which any engine
would serve), and an in-process vLLM engine that serves them the way the generation role does: the
tensors a sync sends (``models.lora.adapter_exports``) put where ``AdapterReceiver.receive_adapter``
leaves them, then ``AdapterReceiver.load_adapter``. Prints one JSON line per family: the layers the
check at start (``unknown_adapter_layers``) finds the engine cannot adapt, and the largest
|engine - transformers| logprob of fixed sequences with the adapter requested, and without it (the
base: what a sync that did not take would serve), or the load's error for a family vLLM cannot serve so.
"""

from __future__ import annotations

import json
import os
import sys

import torch

SEQUENCES = [[5, 9, 13, 2, 7, 11, 3, 17, 19, 4, 8, 6], [21, 3, 3, 8, 14, 2, 9], [1, 30, 12, 12, 7, 25, 4, 16, 5]]


def _stash(worker, tensors: dict) -> None:
    """Where ``receive_adapter`` leaves a sync's tensors (on vLLM's worker, behind its wrapper)."""
    getattr(worker, "worker", worker)._received_adapter = tensors


def transformers_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def serve(out: str, tokenizer: str, family: str) -> dict:
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams, TokensPrompt

    from rlhf_dist.config import LoraConfig
    from rlhf_dist.models.lora import adapter_exports, add_adapters
    from rlhf_dist.models.tiny import build_random_lm
    from rlhf_dist.weight_sync.adapter import adapter_request

    path = build_random_lm(os.path.join(out, family), family, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    add_adapters(model, LoraConfig(rank=8))
    generator = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data.normal_(0.0, 0.2, generator=generator)
    tensors = {name: value().detach().clone() for name, _, value in adapter_exports(model)}
    expected = [transformers_logprobs(model, ids) for ids in SEQUENCES]
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=64, kv_cache_memory_bytes=2**26,
              enable_lora=True, max_lora_rank=8, max_loras=1,
              worker_extension_cls="rlhf_dist.weight_sync.adapter.AdapterReceiver")
    # the check at start (GenerationEngine.check_adapter), then the load of a sync's tensors
    [unknown] = llm.collective_rpc("unknown_adapter_layers", args=(list(tensors),))
    llm.collective_rpc(_stash, args=(tensors,))
    try:
        [layers] = llm.collective_rpc("load_adapter", args=(1, {"r": 8, "lora_alpha": 32.0}))
    except Exception as e:  # noqa: BLE001 - reported with what the check at start found
        return {"family": family, "unknown": unknown, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
    gaps = {}
    for label, request in (("adapter", adapter_request(0)), ("base", None)):
        worst = 0.0
        for ids, want in zip(SEQUENCES, expected):  # one per batch: see GenerationEngine.sequence_logprobs
            [got] = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, lora_request=request, use_tqdm=False)
            served = torch.tensor([step[t].logprob for step, t in zip(got.prompt_logprobs[1:], ids[1:])])
            worst = max(worst, float((served - want).abs().max()))
        gaps[label] = worst
    del llm
    return {"family": family, "tensors": len(tensors), "layers": layers, "unknown": unknown, **gaps}


def main() -> None:
    out, tokenizer, *families = sys.argv[1:]
    for family in families:
        try:
            row = serve(out, tokenizer, family)
        except Exception as e:  # noqa: BLE001 - reported per family, the next one still runs
            row = {"family": family, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        print("LORA_SERVING " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
