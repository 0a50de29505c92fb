"""The Hydra groups of what is trained and how: data, eval, algo, rollout, trainer,
reward, reference, sft and rm (the model group is in ``model.py``). One dataclass per group; each validates itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhf_dist.config.errors import _check_fraction, _check_positive, _fail
from rlhf_dist.registry import TASKS

# The built-in sources: every task's prompt set; demonstrations and preference pairs of the tasks that have them.
BUILTIN_PROMPTS = tuple(f"builtin:{name}" for name in TASKS)
BUILTIN_SUPERVISED = tuple(f"builtin:{name}" for name, entry in TASKS.items() if entry.supervised)


@dataclass
class DataConfig:
    # Training prompts: builtin:<task> (a built-in task's train split, BUILTIN_PROMPTS; builtin:reviews
    # is the positive-reviews task), or a JSONL file whose rows have a "prompt" key; the other keys of
    # a row are its metadata, passed to reward functions and environments (e.g. a reference answer).
    prompts: str = "builtin:reviews"
    # Held-out prompts scored every eval.every_steps: builtin:<task> (its test split), a JSONL file,
    # or "" (none).
    eval_prompts: str = ""
    # Number of prompts generated for a builtin prompt set.
    num_builtin_prompts: int = 2048
    # What to do with a malformed row (bad JSON or UTF-8, missing or empty text, too long): skip
    # (counted and logged) or error (stops, naming file and line).
    on_bad_row: str = "skip"
    # SFT demonstrations: builtin:reviews (the embedded task; BUILTIN_SUPERVISED), or a JSONL file /
    # Hugging Face datasets directory whose rows have "prompt" and "response".
    sft: str = "builtin:reviews"
    # Held-out demonstrations for the SFT loss before and after training: a source, "" (none), or
    # "auto": the test split of a builtin data.sft, none for a file (so a real data set is never
    # evaluated on the embedded task by accident).
    eval_sft: str = "auto"
    # Preferences for the reward model: builtin:reviews (ranked by the embedded task's simulated
    # annotator), or a JSONL file / datasets directory whose rows are pairs ("prompt", "chosen",
    # "rejected") or rankings ("prompt", "responses" best first, optional "ranks": lower is better,
    # equal is a tie).
    preferences: str = "builtin:reviews"
    # Held-out preferences for the reward model's pairwise accuracy: a source, "" (none), or "auto"
    # (the test split of a builtin data.preferences, none for a file).
    eval_preferences: str = "auto"
    # Rows generated for builtin:reviews demonstrations and preferences (pairs, or rankings of
    # ranking_k responses; held-out: an eighth).
    num_builtin_sft: int = 4096
    num_builtin_pairs: int = 4096
    # Responses the simulated annotator ranks per prompt for builtin preferences: 2 = pairs; K > 2
    # gives up to C(K, 2) comparisons per prompt (InstructGPT ranked K = 4 to 9).
    ranking_k: int = 2
    # Probability that the simulated annotator ranks a pair the wrong way round (label noise; in a
    # ranking, the average over its pairs of score levels).
    annotator_noise: float = 0.1
    # Apply the tokenizer's chat template (when it has one) to prompts and reward-model inputs.
    chat_template: bool = True

    def validate(self) -> None:
        _check_positive("data", self, "num_builtin_prompts", "num_builtin_sft", "num_builtin_pairs")
        if self.on_bad_row not in ("skip", "error"):
            _fail("data.on_bad_row", self.on_bad_row, "use skip or error")
        for key in ("prompts", "eval_prompts"):
            value = getattr(self, key)
            if value.startswith("builtin:") and value not in BUILTIN_PROMPTS:
                _fail(f"data.{key}", value, f"use one of {', '.join(BUILTIN_PROMPTS)} or a JSONL path")
        for key in ("sft", "eval_sft", "preferences", "eval_preferences"):
            value = getattr(self, key)
            if key.startswith("eval_") and value == "auto":
                continue
            if value.startswith("builtin:") and value not in BUILTIN_SUPERVISED:
                _fail(f"data.{key}", value, f"use {', '.join(BUILTIN_SUPERVISED)} or a JSONL file / datasets directory")
        if self.ranking_k < 2:
            _fail("data.ranking_k", self.ranking_k, "must be >= 2 (2: preference pairs; K: rankings of K responses)")
        if self.ranking_k != 2 and not self.preferences.startswith("builtin:"):
            _fail("data.ranking_k", self.ranking_k, f"sizes the builtin rankings only; data.preferences="
                  f"{self.preferences!r} is a file, whose rows carry their own responses: leave it at 2")
        if not 0.0 <= self.annotator_noise < 0.5:
            _fail("data.annotator_noise", self.annotator_noise, "must be in [0, 0.5)")

    def held_out(self, kind: str) -> str:
        """The held-out source of ``kind`` ("sft" or "preferences") with "auto" resolved."""
        value, train = getattr(self, f"eval_{kind}"), getattr(self, kind)
        if value == "auto":
            return train if train.startswith("builtin:") else ""
        return value


@dataclass
class EvalConfig:
    # Score the held-out prompts (data.eval_prompts) with greedy decoding every this many steps; 0 is off.
    every_steps: int = 0
    # Held-out prompts used per evaluation (the first ones of the set).
    num_prompts: int = 128
    # Decode greedily (true) or sample at rollout.temperature with fixed per-prompt seeds (false).
    greedy: bool = True
    # A gold metric "module:function" (prompt, response) -> float reported next to the reward
    # (eval/gold_mean) and used by `python -m rlhf_dist.evaluate` to judge win rates; never a reward.
    gold_function: str = ""
    # rlhf_dist.evaluate: the policies to compare, name -> model directory (or hub id), given on
    # the command line as +eval.policies.NAME=DIR.
    policies: dict[str, str] = field(default_factory=dict)
    # rlhf_dist.evaluate: the policy the others are judged against (win rate, KL); a key of policies.
    baseline: str = ""

    def validate(self) -> None:
        if self.every_steps < 0:
            _fail("eval.every_steps", self.every_steps, "must be >= 0 (0 = no evaluation)")
        _check_positive("eval", self, "num_prompts")
        if self.baseline and self.baseline not in self.policies:
            _fail("eval.baseline", self.baseline, f"must be one of eval.policies ({', '.join(self.policies) or 'none'})")


ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp")
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")  # need rollout.n > 1 samples per prompt
LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
ROLLOUT_CORRECTIONS = ("none", "tis", "mis")
RATIO_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class AlgoConfig:
    """The RL algorithm. Presets in conf/algo set the usual companions of an estimator: ppo (the
    default), grpo, dr_grpo, rloo, reinforce_pp, and two recipes on grpo: dapo (Yu et al. 2025,
    "DAPO: an open-source LLM reinforcement learning system at scale": clip-higher, token-mean
    loss, rollout.dynamic_sampling, reward.overlong_buffer, no KL) and gspo (Zheng et al. 2025,
    "Group Sequence Policy Optimization": ratio_level=sequence, clip 3e-4 / 4e-4, sequence-mean
    loss, no KL)."""

    # Advantage estimator: gae (PPO with a critic; Schulman et al. 2016), grpo (group-normalised,
    # Shao et al. 2024), dr_grpo (group mean only, Liu et al. 2025), rloo (leave-one-out,
    # Ahmadian et al. 2024), reinforce_pp (batch-normalised returns, Hu 2025). Only gae creates a critic.
    estimator: str = "gae"
    # Discount factor of GAE and of the REINFORCE++ returns.
    gamma: float = 1.0
    # GAE lambda (bias/variance trade-off of the advantage estimate).
    lam: float = 0.95
    # PPO ratio clip range epsilon (the lower side when clip_eps_high is set).
    clip_eps: float = 0.2
    # Upper clip range ("clip-higher", DAPO, Yu et al. 2025); null means clip_eps.
    clip_eps_high: float | None = None
    # Dual-clip constant c > 1 capping the loss of negative-advantage tokens (Ye et al. 2020); null is off.
    dual_clip: float | None = None
    # Policy-loss aggregation over each micro-batch (gradients then accumulate over the minibatch):
    # token_mean, seq_mean_token_mean, or seq_mean_token_sum_norm (Dr. GRPO: token sum over
    # micro-batch size x rollout.max_new_tokens).
    loss_agg: str = "token_mean"
    # Entropy bonus coefficient (the loss subtracts entropy_coef x aggregated entropy).
    entropy_coef: float = 0.0
    # Clip range of the value-function update around the old values (gae only).
    value_clip_eps: float = 0.2
    # KL coefficient beta (the initial value when kl_controller=adaptive). 0 with the fixed controller
    # is no KL penalty (the KL is still logged unless reference.monitor=false).
    kl_coef: float = 0.05
    # KL estimator of Schulman (2020) on d = log pi - log ref clamped to [-20, 20]: k1 = d, k2 = d^2 / 2,
    # k3 = e^-d - 1 + d (unbiased, low variance); k2 and k3 capped at 10 per token. As a loss term
    # (kl_in=loss) the expected gradient is 0 for k1 (refused), grad KL(pi||ref) for k2, grad KL(ref||pi) for k3.
    kl_estimator: str = "k1"
    # Where the KL penalty goes: "reward" (per token, folded into the reward) or "loss" (a loss term, as GRPO).
    kl_in: str = "reward"
    # fixed, or adaptive (Ziegler et al. 2019: beta moves so that the per-sequence KL tracks kl_target).
    kl_controller: str = "fixed"
    # Target per-sequence KL of the adaptive controller.
    kl_target: float = 1.0
    # Horizon (in samples) of the adaptive controller.
    kl_horizon: float = 10000.0
    # Whiten sequence scores across the batch before shaping the rewards (gae, reinforce_pp).
    whiten_rewards: bool = False
    # Passes over each rollout batch.
    ppo_epochs: int = 2
    # Samples per optimizer step, summed over all data-parallel ranks.
    minibatch_size: int = 32
    # Off-policy correction of the policy loss per token, rho = pi_old / pi_rollout (trainer before the
    # update / engine that sampled): none; tis, weight min(rho, cap) (truncated IS, Yao et al. 2025, "Your
    # efficient RL framework secretly brings you off-policy RL training"); mis, weight rho inside
    # [1/cap, cap] and 0 outside (masked IS, IcePop: Ring-1T, arXiv 2510.18855). Loss denominators unchanged.
    rollout_correction: str = "none"
    # The cap C > 1 of rollout_correction: tis truncates rho at C, mis drops tokens with rho outside [1/C, C].
    rollout_is_cap: float = 2.0
    # Importance ratio the loss clips: token (PPO, per token) or sequence (GSPO, Zheng et al. 2025: the
    # length-normalised sequence ratio, clipped per sequence; pair it with loss_agg=seq_mean_token_mean).
    ratio_level: str = "token"
    # DAPO's overlong filtering: responses cut off by rollout.max_new_tokens get no policy gradient
    # (advantage 0; they still count in the loss denominators and in a KL or entropy term).
    mask_truncated: bool = False
    # MoE policies: weight of the routers' load-balancing loss in the policy loss (loss/aux). null: the model
    # config's router_aux_loss_coef if its output_router_logits is true (released configs: false); 0: off.
    router_aux_loss_coef: float | None = None
    # Mixture-of-experts policies, routing replay (R3): the policy's passes route each token to the experts
    # the engine did (roles/routing_capture.py), so near-tied routers add no mismatch. Needs rollout.enforce_eager.
    routing_replay: bool = False

    @property
    def needs_critic(self) -> bool:
        return self.estimator == "gae"

    @property
    def uses_kl(self) -> bool:
        """A KL penalty to the frozen initial policy is in use (or may become so: adaptive)."""
        return self.kl_coef > 0 or self.kl_controller == "adaptive"

    def validate(self) -> None:
        choices = {"estimator": ESTIMATORS, "loss_agg": LOSS_AGGS, "kl_estimator": KL_ESTIMATORS,
                   "kl_in": ("reward", "loss"), "kl_controller": ("fixed", "adaptive"),
                   "rollout_correction": ROLLOUT_CORRECTIONS, "ratio_level": RATIO_LEVELS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                _fail(f"algo.{name}", getattr(self, name), f"use one of {', '.join(allowed)}")
        _check_fraction("algo", self, "gamma", "lam")
        _check_positive("algo", self, "clip_eps", "value_clip_eps", "ppo_epochs", "minibatch_size",
                        "kl_target", "kl_horizon")
        if self.clip_eps_high is not None and self.clip_eps_high <= 0:
            _fail("algo.clip_eps_high", self.clip_eps_high, "must be > 0 (or null to use clip_eps)")
        if self.dual_clip is not None and self.dual_clip <= 1:
            _fail("algo.dual_clip", self.dual_clip, "must be > 1 (or null to disable)")
        if self.rollout_is_cap <= 1:
            _fail("algo.rollout_is_cap", self.rollout_is_cap,
                  "must be > 1 (tis truncates the ratio at it, mis keeps ratios in [1/cap, cap])")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            bad = "kl_coef" if self.kl_coef < 0 else "entropy_coef"
            _fail(f"algo.{bad}", getattr(self, bad), "must be >= 0")
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            _fail("algo.router_aux_loss_coef", self.router_aux_loss_coef,
                  "must be >= 0 (0: no load-balancing loss; null: the model config's)")
        # E[grad k1] = E[grad log pi] = 0 for tokens sampled from pi: as a loss k1 adds only noise.
        if self.kl_in == "loss" and self.kl_estimator == "k1" and self.kl_coef > 0:
            _fail("algo.kl_estimator", self.kl_estimator,
                  f"with algo.kl_in=loss and algo.kl_coef={self.kl_coef} the k1 loss has zero expected "
                  "gradient, so the KL term does nothing; use algo.kl_estimator=k3 (or k2), or algo.kl_in=reward")


@dataclass
class RolloutConfig:
    # Number of vLLM engines (Ray actors); prompts are spread across them.
    num_engines: int = 1
    # Prompts sampled per step.
    batch_size: int = 64
    # Responses sampled per prompt (group size of grpo, dr_grpo and rloo); a step has batch_size x n samples.
    n: int = 1
    # Maximum new tokens per response.
    max_new_tokens: int = 24
    # Sampling temperature; 0 is greedy decoding, which is not a valid RL policy.
    temperature: float = 1.0
    # Nucleus sampling threshold.
    top_p: float = 1.0
    # vLLM tensor-parallel size per engine: its workers are the engine actor's subprocesses, on the
    # GPUs of its placement bundle (on CPU, on its cores; needs resources.vllm_in_process=false).
    tensor_parallel_size: int = 1
    # vLLM's budget (weights, activations, KV cache) as a fraction of its GPU's memory, which must be
    # free when the engine starts (on CPU: of the NUMA node's RAM); the KV cache gets what the rest leaves
    # when kv_cache_gib=0. Colocated: at most 1 - the other roles' resources.<role>.gpus on GPU 0.
    gpu_memory_utilization: float = 0.5
    # Explicit KV-cache size per engine in GiB (sized for CPU runs; the GPU presets set 0); 0 sizes it
    # from gpu_memory_utilization. A colocated GPU run needs 0: a fixed size ignores the engine's share.
    kv_cache_gib: float = 0.25
    # Maximum sequence length (prompt + response) of the engine.
    max_model_len: int = 256
    # Disable CUDA graphs / torch.compile in vLLM (faster start, slower decode).
    enforce_eager: bool = True
    # GPU only: engines sleep after each rollout and wake for the weight update, freeing the GPU
    # memory for the roles that share it (placement=colocated). 0: never; 1: weights offloaded to
    # CPU memory, KV cache dropped; 2: weights and KV cache dropped (the weight update refills them).
    sleep_level: int = 0
    # Policy versions a training sample may lag behind the trainer. 0: synchronous, on-policy
    # (generate, then train on it). N >= 1: the engines generate the next steps' samples while the
    # trainers train (weights synced at each step boundary, applied between generations), so a
    # sample may come from a policy up to N updates old; pair it with algo.rollout_correction.
    max_staleness: int = 0
    # Responses an engine hands back at a time as they finish; each such chunk is scored at once,
    # while the engines go on generating.
    stream_chunk: int = 32
    # Start the passes before the update on full micro-batches of samples as they arrive (rollout/passes.py):
    # the reference logprobs, and in a synchronous run (max_staleness 0, no dynamic sampling) the old
    # logprobs and the critic's values. false: one pass once all is scored (local_cpu: shared cores).
    stream_passes: bool = True
    # Write each step's scored rollout to <run dir>/rollouts/step_<N>.safetensors as it is taken
    # (token ids, sampling logprobs, scores, policy versions, texts; rollout/dump.py, which also
    # prints one: python -m rlhf_dist.rollout.dump <file>). time/rollout_dump says what it costs.
    dump: bool = False
    # Train on the rollouts a run dumped (rollout.dump=true) in its directory, step by step, instead
    # of generating and scoring: no engines and no reward actors start. Replaying a run from its
    # first step with its settings reproduces its losses (a loss spike, looked at again). "": off.
    replay_from: str = ""
    # DAPO's dynamic sampling (Yu et al. 2025): drop prompt groups whose n rewards are all equal (no
    # advantage under a group baseline) and sample more prompts until the step holds batch_size
    # informative groups, or max_sampling_rounds rounds were drawn (then the step is filled with
    # uninformative groups, counted in rollout/filled_groups). Needs a group estimator.
    dynamic_sampling: bool = False
    # Rounds of generation a step may draw with dynamic_sampling (1 = the step's own prompts only).
    max_sampling_rounds: int = 3
    # Multi-turn rollouts against an environment (rlhf_dist.tasks.base.Environment): a Hydra node whose
    # _target_ is the environment class and whose other keys are its arguments, e.g.
    # {_target_: rlhf_dist.tasks.calculator.CalculatorEnv}; {} is single-turn. max_new_tokens then bounds
    # the whole response, model and environment tokens.
    env: dict[str, Any] = field(default_factory=dict)
    # Model turns per multi-turn sample at most (rollout.env).
    max_turns: int = 4

    def validate(self) -> None:
        if self.max_staleness < 0:
            _fail("rollout.max_staleness", self.max_staleness, "must be >= 0 (0 = synchronous)")
        if self.max_staleness and self.sleep_level:
            _fail("rollout.max_staleness", self.max_staleness,
                  "needs engines on their own devices; with rollout.sleep_level > 0 (colocated) use 0")
        _check_positive(
            "rollout", self, "num_engines", "batch_size", "n", "max_new_tokens", "temperature",
            "tensor_parallel_size", "max_model_len", "stream_chunk", "max_sampling_rounds", "max_turns",
        )
        if self.env and not isinstance(self.env.get("_target_"), str):
            _fail("rollout.env", self.env, "needs _target_ naming the environment class (or {} for single-turn)")
        if not 0.0 < self.top_p <= 1.0:
            _fail("rollout.top_p", self.top_p, "must be in (0, 1]")
        if self.kv_cache_gib < 0:
            _fail("rollout.kv_cache_gib", self.kv_cache_gib, "must be >= 0 (0 = size from gpu_memory_utilization)")
        if self.sleep_level not in (0, 1, 2):
            _fail("rollout.sleep_level", self.sleep_level, "must be 0 (never), 1 or 2")
        if not 0.0 < self.gpu_memory_utilization < 1.0:
            _fail("rollout.gpu_memory_utilization", self.gpu_memory_utilization, "must be in (0, 1)")


@dataclass
class TrainerConfig:
    # Data-parallel ranks of the policy trainer group (the critic group uses the same).
    world_size: int = 2
    # DeepSpeed ZeRO stage 0-3.
    zero_stage: int = 2
    # Samples per rank per forward/backward; gradients accumulate up to the minibatch.
    micro_batch_size: int = 8
    # > 0: cut micro-batches by tokens instead (prompt + response tokens per forward pass, a longer
    # sequence alone), as many on every rank as the rank needing the most; micro_batch_size is then unused.
    max_tokens_per_micro_batch: int = 0
    # Pack the sequences of a micro-batch into few rows (no padding; position ids restart per
    # sequence, attention cannot cross them) for the policy, critic, reference and SFT passes.
    packing: bool = True
    # Compute logprobs and entropies this many response tokens at a time (0: all at once), so the
    # (tokens, vocabulary) float32 logits never exist in full; each chunk is recomputed in the backward pass.
    logprob_chunk_tokens: int = 1024
    # Recompute the transformer layers' activations in the backward pass instead of keeping them
    # (the model's gradient_checkpointing_enable), for the policy, critic and SFT ranks.
    gradient_checkpointing: bool = False
    # Policy learning rate.
    lr: float = 5e-4
    # Critic learning rate.
    critic_lr: float = 1e-3
    # AdamW weight decay.
    weight_decay: float = 0.0
    # Global gradient-norm clip (DeepSpeed gradient_clipping).
    grad_clip: float = 1.0
    # Optimizer steps of linear warm-up.
    warmup_steps: int = 0
    # Learning-rate schedule after warm-up: constant, linear or cosine.
    lr_schedule: str = "constant"
    # Offload optimizer state (and its update) to CPU memory under ZeRO-2/3; meant for GPU runs.
    offload_optimizer: bool = False

    def validate(self) -> None:
        _check_positive("trainer", self, "world_size", "micro_batch_size", "lr", "critic_lr")
        if self.zero_stage not in (0, 1, 2, 3):
            _fail("trainer.zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        if self.offload_optimizer and self.zero_stage < 2:
            _fail("trainer.offload_optimizer", True, f"needs trainer.zero_stage 2 or 3 (got {self.zero_stage})")
        if self.lr_schedule not in LR_SCHEDULES:
            _fail("trainer.lr_schedule", self.lr_schedule, "use constant, linear or cosine")
        nonnegative = ("grad_clip", "weight_decay", "warmup_steps", "max_tokens_per_micro_batch", "logprob_chunk_tokens")
        if any(getattr(self, n) < 0 for n in nonnegative):
            bad = next(n for n in nonnegative if getattr(self, n) < 0)
            _fail(f"trainer.{bad}", getattr(self, bad), "must be >= 0")


@dataclass
class RewardConfig:
    # The reward is a weighted sum of sources; a source with weight 0 is off.
    # Weight of the Python function named by `function`.
    function_weight: float = 1.0
    # Import path "module:function", called as fn(prompt, response) or fn(prompt, response, metadata) -> float.
    function: str = "rlhf_dist.tasks.reviews:positive_sentiment_reward"
    # Weight of the AutoModelForSequenceClassification reward model at `model_path`.
    model_weight: float = 0.0
    # Directory or hub id of the reward model.
    model_path: str = ""
    # Weight of the remote HTTP endpoint at `http_url`.
    http_weight: float = 0.0
    # Endpoint taking POST {"prompts", "responses", "metadata"} and answering {"scores": [...]}.
    http_url: str = ""
    # Weight of the environment's return (the sum of its step rewards; rollout.env), added to the sources above.
    env_weight: float = 1.0
    # Seconds per HTTP attempt.
    http_timeout_s: float = 10.0
    # Extra HTTP attempts after a failure (with exponential back-off).
    http_retries: int = 2
    # A score that raises or is NaN/inf: "error" fails the step naming the sample; "drop" excludes
    # the sample (no policy gradient, not in reward statistics) and counts it in reward/dropped.
    on_invalid: str = "error"
    # Normalise reward-model scores with the mean/std saved next to the model
    # (reward_normalization.json, written by `python -m rlhf_dist.reward_model`).
    normalize: bool = True
    # Number of reward actors; samples are spread across them.
    num_actors: int = 1
    # Samples per forward pass of a reward model.
    batch_size: int = 32
    # DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): a response in the last overlong_buffer
    # tokens before rollout.max_new_tokens gets a penalty falling linearly from 0 to -overlong_penalty
    # at the budget, added to its training score (not to evaluation scores). 0: off.
    overlong_buffer: int = 0
    # Size of that penalty at the length budget.
    overlong_penalty: float = 1.0

    def validate(self) -> None:
        weights = {"function": self.function_weight, "model": self.model_weight, "http": self.http_weight}
        if not any(weights.values()) and not self.env_weight:  # (an environment is checked with rollout.env)
            _fail("reward.function_weight", self.function_weight, "every reward weight is 0: enable at least one source")
        needs = {"function": "function", "model": "model_path", "http": "http_url"}
        for source, weight in weights.items():
            if weight and not getattr(self, needs[source]):
                _fail(f"reward.{needs[source]}", getattr(self, needs[source]),
                      f"required when reward.{source}_weight={weight}")
        if self.http_url and not self.http_url.startswith(("http://", "https://")):
            _fail("reward.http_url", self.http_url, "must start with http:// or https://")
        if self.on_invalid not in ("error", "drop"):
            _fail("reward.on_invalid", self.on_invalid, "use error or drop")
        if self.http_retries < 0:
            _fail("reward.http_retries", self.http_retries, "must be >= 0")
        _check_positive("reward", self, "num_actors", "batch_size", "http_timeout_s")
        if self.overlong_buffer < 0 or self.overlong_penalty < 0:
            bad = "overlong_buffer" if self.overlong_buffer < 0 else "overlong_penalty"
            _fail(f"reward.{bad}", getattr(self, bad), "must be >= 0 (overlong_buffer 0 is off)")


@dataclass
class ReferenceConfig:
    # Start the reference actors even without a KL penalty (algo.kl_coef=0), so that kl/mean still
    # measures how far the policy moved from the initial one (e.g. the kl_coef=0 arm of a sweep);
    # false saves the actors, their memory and a forward pass per step in KL-free runs (algo=dapo, gspo).
    monitor: bool = True
    # The frozen policy of the KL penalty; "": the policy's start (model.path).
    path: str = ""
    # Number of reference actors holding it.
    num_actors: int = 1
    # Samples per forward pass.
    batch_size: int = 32

    def validate(self) -> None:
        _check_positive("reference", self, "num_actors", "batch_size")


@dataclass
class SFTConfig:
    # Passes over the demonstrations (data.sft).
    epochs: int = 2
    # Demonstrations per optimizer step, summed over trainer.world_size ranks.
    batch_size: int = 32
    # Learning rate (AdamW; trainer.lr_schedule and warmup_steps apply).
    lr: float = 1e-3
    # Demonstrations longer than this many tokens (prompt + response + EOS) are skipped or rejected.
    max_len: int = 128

    def validate(self) -> None:
        _check_positive("sft", self, "epochs", "batch_size", "lr", "max_len")


@dataclass
class RewardModelConfig:
    # Backbone the reward model starts from (a score head is added); "" means model.path. The
    # pipeline starts it from the SFT model, as InstructGPT did.
    init_path: str = ""
    # Passes over the preference pairs (data.preferences).
    epochs: int = 2
    # Pairs per optimizer step, summed over trainer.world_size ranks.
    batch_size: int = 32
    # Learning rate (AdamW).
    lr: float = 5e-4
    # Pairs whose chosen or rejected exchange exceeds this many tokens are skipped or rejected.
    max_len: int = 128

    def validate(self) -> None:
        _check_positive("rm", self, "epochs", "batch_size", "lr", "max_len")

