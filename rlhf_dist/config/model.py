"""The model group: what is trained (the policy's path, the critic's, the dtype) and, with
``model.lora.rank`` > 0, which low-rank adapters are trained in place of every weight."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_dist.config.errors import _check_positive, _fail

# How a LoRA policy's weights reach the engines. adapter: the engines keep the base weights they
# loaded and receive only the adapters' tensors, served as a LoRA adapter (rlhf_dist.weight_sync.adapter);
# merged: the trainer adds each adapter's product into its base weight and sends full weights (any
# architecture vLLM serves, with or without LoRA support).
LORA_SYNCS = ("adapter", "merged")
VLLM_MAX_LORA_RANK = 512  # vLLM's largest max_lora_rank


@dataclass
class LoraConfig:
    # Rank of every adapter; 0 trains every weight (no adapters).
    rank: int = 0
    # The adapters' product is scaled by alpha / rank (peft's lora_alpha). 32 is the "LoRA Without
    # Regret" choice, which makes the best learning rate nearly independent of the rank.
    alpha: float = 32.0
    dropout: float = 0.0
    # Which linear layers get adapters: "all-linear" (every attention and MLP projection, fused
    # qkv_proj / gate_up_proj included; never the output head), or comma-separated module names
    # (their last component: q_proj,v_proj).
    target_modules: str = "all-linear"
    # How the weights reach the engines (LORA_SYNCS).
    sync: str = "adapter"

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def targets(self) -> str | list[str]:
        """peft's ``target_modules``: "all-linear", or the list of module names."""
        if self.target_modules == "all-linear":
            return self.target_modules
        return [name.strip() for name in self.target_modules.split(",")]

    def validate(self, key: str = "model.lora") -> None:
        if self.rank < 0:
            _fail(f"{key}.rank", self.rank, "must be >= 0 (0: no adapters, every weight trained)")
        if not self.enabled:
            return
        _check_positive(key, self, "alpha")
        if not 0.0 <= self.dropout < 1.0:
            _fail(f"{key}.dropout", self.dropout, "must be in [0, 1)")
        if self.target_modules != "all-linear" and not all(self.targets):
            _fail(f"{key}.target_modules", self.target_modules,
                  "use all-linear or comma-separated module names such as q_proj,v_proj")
        if self.sync not in LORA_SYNCS:
            _fail(f"{key}.sync", self.sync, f"use one of {', '.join(LORA_SYNCS)}")
        if key == "model.lora" and self.sync == "adapter" and self.rank > VLLM_MAX_LORA_RANK:
            _fail("model.lora.rank", self.rank, f"vLLM serves adapters of rank <= {VLLM_MAX_LORA_RANK}; "
                  "use model.lora.sync=merged for a larger rank")

    @property
    def served(self) -> dict | None:
        """What the engines need to serve the adapters (peft's r and lora_alpha) with sync=adapter; None otherwise."""
        return {"r": self.rank, "lora_alpha": self.alpha} if self.enabled and self.sync == "adapter" else None


@dataclass
class ModelConfig:
    # Policy to fine-tune: a Hugging Face hub id, a local directory, or the embedded tiny policy of a
    # built-in task, built and cached locally on first use (its model name in rlhf_dist.registry.TASKS).
    path: str = "tiny"
    # Critic backbone (a value head is added on top); empty means "same as path".
    critic_path: str = ""
    # Parameter dtype of the trained models and engines: float32 or bfloat16.
    dtype: str = "float32"
    # Prompts longer than this many tokens are rejected when the prompt set is loaded.
    max_prompt_len: int = 64
    # Low-rank adapters for the policy (rank 0: off).
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Low-rank adapters for the critic's backbone (rank 0: off); its value head is trained in full.
    # (sync does not apply: the critic serves no engine.)
    critic_lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> None:
        if not self.path:
            _fail("model.path", self.path, "set a hub id, a local directory, or 'tiny'")
        if self.dtype not in ("float32", "bfloat16"):
            _fail("model.dtype", self.dtype, "use float32 or bfloat16")
        _check_positive("model", self, "max_prompt_len")
        self.lora.validate()
        self.critic_lora.validate("model.critic_lora")
