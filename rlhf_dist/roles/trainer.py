"""Trainer roles, each a ``zero_rank.DeepSpeedRank`` with its model and loss: the policy (PPO
updates, logprobs, the weight broadcast to the engines), the critic, SFT and the reward model."""

from __future__ import annotations

import torch

from rlhf_dist.config import AlgoConfig, ModelConfig, RunPlan, TrainerConfig, TrainerPlan
from rlhf_dist.core.experience import Experience, RankingBatch
from rlhf_dist.core.losses import actor_loss, ranking_loss, sft_loss, value_loss
from rlhf_dist.core.stats import masked_sum
from rlhf_dist.models.lora import adapter_exports, adapter_parameters, add_adapters, merged_exports
from rlhf_dist.models.modeling import (
    load_causal_lm,
    load_critic,
    load_reward_model,
    moe_block_classes,
    ranking_scores,
    response_values,
)
from rlhf_dist.models.routing import router_aux_coef
from rlhf_dist.roles.spec import RankSpec
from rlhf_dist.roles.zero_rank import DeepSpeedRank, gathered
from rlhf_dist.weight_sync.transport import GroupTransport, load_transport


class PolicyTrainer(DeepSpeedRank):
    """The policy: PPO-clip updates, logprobs, and the weight broadcast to the engines."""

    # A mixture of experts' load-balancing loss comes back as a part of the minibatch's, summed like the loss.
    LOSS_STATS = (*DeepSpeedRank.LOSS_STATS, "aux_loss")

    def __init__(
        self, *, spec: RankSpec, cfg: TrainerConfig, model_cfg: ModelConfig, plan: RunPlan,
        temperature: float, max_new_tokens: int,
    ) -> None:
        super().__init__(spec=spec, cfg=cfg, model_cfg=model_cfg, plan=plan)
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.transport = None  # the weight-sync transport (init_weight_sender)
        self.sender = None  # rank 0's end of a group transport's weight-transfer group (gloo, nccl)
        self.exporter = None  # every rank's exported copies (a handle transport: ipc)
        self.moe = False  # a mixture-of-experts policy (build_model)
        self.peft = None  # peft's PeftModel around the policy when it trains LoRA adapters (model.lora)

    @property
    def lr(self) -> float:
        return self.cfg.lr

    def build_model(self) -> torch.nn.Module:
        model = load_causal_lm(self.model_path, self.model_cfg.dtype, self.cfg.gradient_checkpointing)
        self.moe = bool(moe_block_classes(model))
        if self.model_cfg.lora.enabled:  # in place: DeepSpeed wraps the transformers model, adapters inside
            self.peft = add_adapters(model, self.model_cfg.lora)
        return model

    def exports(self):
        """With LoRA adapters the engines receive each adapted layer's base weight with its adapter's
        product added, under the layer's own name (``models.lora.merged_exports``)."""
        return merged_exports(self.engine.module) if self.peft is not None else super().exports()

    def sync_exports(self):
        """With ``model.lora.sync=adapter`` a sync sends the adapters' own tensors (``models.lora.adapter_exports``);
        the engines keep the base weights they loaded."""
        if self.model_cfg.lora.served:  # (the one place that says when the engines serve adapters)
            return adapter_exports(self.engine.module)
        return self.exports()

    @torch.no_grad()
    def reference_logprobs(self, exp: Experience) -> torch.Tensor:
        """(b, T) logprobs of this rank's shard under the base model (the adapters disabled): the KL
        reference of a LoRA run (``config.reference_on_policy``), at the rollout temperature."""
        if self.peft is None:
            raise ValueError("reference_logprobs: this policy has no LoRA adapters to disable (model.lora.rank=0)")
        self.engine.eval()
        with self.peft.disable_adapter():
            logprobs, _ = self._per_row(exp, lambda micro: self._logprobs(micro, self.temperature))
        return logprobs

    def adapter_writer(self):
        """With LoRA: the adapters, gathered, written by peft (``adapter_model.safetensors`` and
        ``adapter_config.json``) for ``PeftModel.from_pretrained`` or vLLM's ``LoRARequest``."""
        if self.peft is None:
            return None
        params = adapter_parameters(self.engine.module)
        with gathered([p for _, p in params]):
            state = {name: p.data.detach().cpu().clone() for name, p in params} if self.rank == 0 else {}
        return lambda directory: self.peft.save_pretrained(directory, state_dict=state)

    @torch.no_grad()
    def logprobs(self, exp: Experience, temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs, entropy), each (b, T), of this rank's shard under the current policy, at the
        rollout temperature unless ``temperature`` is given."""
        self.engine.eval()
        logprobs, entropy = self._per_row(exp, lambda micro: self._logprobs(micro, temperature or self.temperature))
        return logprobs, entropy

    def train(
        self, exp: Experience, epochs: int, algo: AlgoConfig, kl_coef: float
    ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor | None]:
        """PPO-clip epochs with the loss options of ``algo``; ``kl_coef`` weighs the KL loss term
        when ``algo.kl_in == "loss"`` (the controller owns the coefficient and its schedule).

        ``exp`` is the whole batch, on every rank (``_minibatches`` deals each minibatch). Returns
        the stats and the pi_old the update used, (B, T) of the whole batch (the same on every
        rank), with its entropy: ``exp.old_logprobs`` when given (entropy None); else, for an
        update of one optimizer step (one epoch of one minibatch), those of that step's own
        forward (ratio exactly 1, as TRL with ``num_iterations=1``: no separate pass), otherwise
        those of a pass before the first epoch, each rank computing its share of the rows.

        With the engines' routing (``exp.routing``, algo.routing_replay) every forward pass routes
        as they did; ``routing/replay_changed`` is the share of those (token, layer) routings on
        which the policy's routers would have chosen other experts, over the passes before the
        first optimizer step (whose routers are still those of the policy that sampled)."""
        replay = self.engine.module.routing_replay if exp.routing is not None else None
        if replay is not None:
            replay.take_counts()
            replay.counting = True
        if exp.old_logprobs is not None:
            stats = self._train(exp, epochs, self._actor_loss(algo, kl_coef))
            old_logprobs, entropy = exp.old_logprobs, None
        elif epochs == 1 and len(exp) == self.plan.per_rank_minibatch * self.cfg.world_size:
            stats, old_logprobs, entropy = self._train_one_pass(exp, algo, kl_coef)
        else:
            shard = self._shard(exp)
            both = self._gather_rows(shard, torch.stack([t.float() for t in self.logprobs(exp.select(shard))], -1), len(exp))
            old_logprobs, entropy = (t.contiguous() for t in both.unbind(-1))  # one all-reduce for the two
            stats = self._train(exp.with_fields(old_logprobs=old_logprobs), epochs, self._actor_loss(algo, kl_coef))
        if replay is not None:
            given, changed = replay.take_counts()
            stats["routing/replay_changed"] = changed / max(given, 1)
        return stats, old_logprobs, entropy

    def after_optimizer_step(self) -> None:
        replay = getattr(self.engine.module, "routing_replay", None)
        if replay is not None:
            replay.counting = False  # the routers moved: what they would now choose otherwise is no mismatch

    def _train_one_pass(
        self, exp: Experience, algo: AlgoConfig, kl_coef: float
    ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        """One optimizer step whose micro-batches take their old logprobs from their own forward."""
        seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        stats = self._train(exp.with_fields(row_index=torch.arange(len(exp))), 1,
                            self._actor_loss(algo, kl_coef, seen))
        index = torch.cat([i.cpu() for i, _, _ in seen])
        both = torch.cat([torch.stack((lp.float().cpu(), ent.float().cpu()), -1) for _, lp, ent in seen])
        logprobs, entropy = (t.contiguous() for t in self._gather_rows(index, both, len(exp)).unbind(-1))
        return stats, logprobs, entropy

    def _actor_loss(self, algo: AlgoConfig, kl_coef: float, one_pass: list | None = None):
        """The loss of a micro-batch; with ``one_pass`` (a list) the old logprobs are the forward's
        own, detached, and each micro-batch's (row index, old logprobs, entropy) is appended to it."""
        kl_loss_coef = kl_coef if algo.kl_in == "loss" else None
        aux_coef = self._router_aux_coef(algo)
        total = "tokens" if algo.loss_agg == "token_mean" else "sequences"

        def loss_fn(micro: Experience, totals: dict[str, float]):
            logprobs, entropy, *aux = self._logprobs(micro, self.temperature, entropy_grad=algo.entropy_coef != 0,
                                                     router_aux=aux_coef > 0)
            old = micro.old_logprobs
            kl_term = kl_loss_coef if micro.ref_logprobs is not None else None  # no reference: no KL term
            if one_pass is not None:
                old = logprobs.detach()
                if micro.row_index is not None:
                    one_pass.append((micro.row_index, old, entropy.detach()))
            loss, stats = actor_loss(
                logprobs, old, micro.ref_logprobs, micro.advantages, entropy, micro.response_mask,
                algo.clip_eps, clip_eps_high=algo.clip_eps_high, dual_clip=algo.dual_clip, agg=algo.loss_agg,
                max_len=self.max_new_tokens, rollout_weights=micro.rollout_weights, ratio_level=algo.ratio_level,
                entropy_coef=algo.entropy_coef, kl_coef=kl_term, kl_estimator=algo.kl_estimator,
                total=totals[total],
            )
            if not aux:
                return loss, stats
            # The load-balancing loss is a mean over one forward pass's tokens, not additive over passes:
            # each pass's weighs by its share of the minibatch's tokens, so a minibatch in one micro-batch
            # gets exactly its own, and one cut into several the token-weighted mean of theirs.
            aux_part = aux[0] * (micro.attention_mask.sum() / totals["routed_tokens"])
            stats["aux_loss"] = aux_part.item()
            return loss + aux_coef * aux_part, stats

        return loss_fn

    def _router_aux_coef(self, algo: AlgoConfig) -> float:
        """The weight of the routers' load-balancing loss (``algo.router_aux_loss_coef``; null: the
        model's, where its config asks transformers to add the loss)."""
        coef = router_aux_coef(self.engine.module.config.get_text_config(), algo.router_aux_loss_coef)
        if coef and not self.moe:
            raise ValueError(f"algo.router_aux_loss_coef={coef}: the policy {self.model_path!r} has no "
                             "mixture-of-experts routers to balance; set algo.router_aux_loss_coef=0 (or null)")
        return coef

    def _totals(self, minibatch: Experience) -> dict[str, float]:
        """Also, for a mixture-of-experts policy, the minibatch's tokens (prompts included: the
        routers see them all), summed over ranks: what the load-balancing loss is a mean over."""
        totals = super()._totals(minibatch)
        if self.moe:
            (totals["routed_tokens"],) = self._all_reduce([float(minibatch.attention_mask.sum())], "sum")
        return totals

    # ------------------------------------------------------------------ weight sync
    def init_weight_sender(
        self, transport: str, host: str, port: int, world_size: int, timeout_s: float, bucket_bytes: int
    ) -> None:
        """Rank 0 opens the trainer end of a group transport's weight-transfer group; other ranks have
        no part in it (a handle transport has no group: every rank exports handles,
        ``export_weight_handles``). Every rank gathers ZeRO-3 parameters in buckets of
        ``bucket_bytes`` from now on."""
        self.bucket_bytes = bucket_bytes
        self.transport = load_transport(transport)
        if self.rank == 0 and isinstance(self.transport, GroupTransport):
            if self.sender is not None:  # a new group after an engine restart replaces the old one
                self.sender.close()
            self.sender = self.transport.open_sender(host, port, world_size, timeout_s, self.weight_specs(),
                                                     bucket_bytes)

    def broadcast_weights(self) -> None:
        """Send every parameter (full, ZeRO-3 gathered) from rank 0; all ranks must call this."""
        if self.sender is not None:
            self.sender.send(self._full_params(self.bucket_bytes, sync=True))
        else:
            for _ in self._full_params(self.bucket_bytes, sync=True):
                pass

    def export_weight_handles(self) -> list:
        """Handles of the full weights on this rank's GPU (a handle transport: ipc's CUDA IPC
        handles); all ranks call it."""
        if self.exporter is None:
            self.exporter = self.transport.exporter()
        return self.exporter.export(self._full_params(self.bucket_bytes, sync=True))

    def release_weight_handles(self) -> None:
        """Free the copies behind the last exported handles (the engines have loaded them)."""
        if self.exporter is not None:
            self.exporter.release()


class _SupervisedRank(DeepSpeedRank):
    """A rank of a supervised stage (SFT, reward model): its learning rate comes from the stage's config."""

    def __init__(
        self, *, spec: RankSpec, cfg: TrainerConfig, model_cfg: ModelConfig, plan: TrainerPlan, lr: float
    ) -> None:
        super().__init__(spec=spec, cfg=cfg, model_cfg=model_cfg, plan=plan)
        self._lr = lr

    @property
    def lr(self) -> float:
        return self._lr


class SFTTrainer(_SupervisedRank):
    """Supervised fine-tuning of a causal LM on demonstrations (next-token NLL of the response)."""

    def build_model(self) -> torch.nn.Module:
        return load_causal_lm(self.model_path, self.model_cfg.dtype, self.cfg.gradient_checkpointing)

    def train(self, exp: Experience) -> dict[str, float]:
        """One optimizer step on a batch of demonstrations (the whole batch; this rank takes its share)."""

        def loss_fn(micro: Experience, totals: dict[str, float]):
            logprobs, _ = self._logprobs(micro, 1.0)
            loss = sft_loss(logprobs, micro.response_mask, totals["tokens"])
            return loss, {"loss": loss.item()}

        return self._train(exp, 1, loss_fn)

    @torch.no_grad()
    def eval_loss(self, exp: Experience) -> tuple[float, float]:
        """(summed NLL, token count) of this rank's shard of held-out demonstrations."""
        self.engine.eval()
        (logprobs,) = self._per_row(exp, lambda micro: self._logprobs(micro, 1.0)[0])
        return -masked_sum(logprobs, exp.response_mask).item(), exp.response_mask.sum().item()


class RewardModelTrainer(_SupervisedRank):
    """A sequence-classification reward model trained on rankings of K responses per prompt (a
    preference pair is a ranking of two): the Bradley-Terry loss over each prompt's comparisons."""

    # Accuracy and margin come back as parts of the minibatch's comparisons (``ranking_loss``), summed
    # like the loss: the share of the whole minibatch's comparisons, however it is cut (a mean of
    # micro-batch shares weighted by prompts would not be, as prompts give unequal numbers of them).
    LOSS_STATS = (*DeepSpeedRank.LOSS_STATS, "accuracy", "margin")

    def build_model(self) -> torch.nn.Module:
        model = load_reward_model(self.model_path, self.model_cfg.dtype)
        if self.cfg.packing and not getattr(model, "packed_scores", False):
            raise ValueError(f"trainer.packing=true: the reward model {self.model_path!r} has no linear `score` head "
                             "to read packed scores from; set trainer.packing=false")
        return model

    def train(self, rankings: RankingBatch) -> dict[str, float]:
        """One optimizer step on a batch of rankings (the whole batch; this rank takes its share)."""
        return self._train(rankings, 1, self._ranking_loss)

    def _ranking_loss(self, micro: RankingBatch, totals: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        """A micro-batch's part of its minibatch's loss (mean over prompts) and of its accuracy and
        margin (over comparisons)."""
        scores = ranking_scores(self.engine, micro, self.engine.module.config.pad_token_id, self.cfg.packing)
        loss, stats = ranking_loss(scores, micro.ranks, totals["sequences"], totals["comparisons"])
        return loss, {"loss": loss.item(), **stats}

    def _totals(self, minibatch: RankingBatch) -> dict[str, float]:
        """Also the minibatch's comparable pairs, summed over ranks: what accuracy and margin are shares of."""
        totals = super()._totals(minibatch)
        (totals["comparisons"],) = self._all_reduce([float(minibatch.comparisons())], "sum")
        return totals

    @torch.no_grad()
    def scores(self, rankings: RankingBatch) -> torch.Tensor:
        """Scores (b, K) of every response of this rank's shard (0 in empty slots)."""
        self.engine.eval()
        pad = self.engine.module.config.pad_token_id
        (scores,) = self._per_row(rankings, lambda micro: ranking_scores(self.engine, micro, pad, self.cfg.packing))
        return scores


class CriticTrainer(DeepSpeedRank):
    """The critic: clipped value-loss updates and the values of the rollout states."""

    def __init__(
        self, *, spec: RankSpec, cfg: TrainerConfig, model_cfg: ModelConfig, plan: RunPlan, value_clip_eps: float
    ) -> None:
        super().__init__(spec=spec, cfg=cfg, model_cfg=model_cfg, plan=plan)
        self.value_clip_eps = value_clip_eps

    @property
    def lr(self) -> float:
        return self.cfg.critic_lr

    def build_model(self) -> torch.nn.Module:
        critic = load_critic(self.model_path, self.model_cfg.dtype, self.cfg.gradient_checkpointing)
        if self.model_cfg.critic_lora.enabled:  # on the backbone alone: the value head stays trained in full
            add_adapters(critic.backbone, self.model_cfg.critic_lora, key="model.critic_lora")
        return critic

    @torch.no_grad()
    def values(self, exp: Experience) -> torch.Tensor:
        self.engine.eval()
        (values,) = self._per_row(exp, lambda micro: response_values(self.engine, micro, self.cfg.packing))
        return values

    def train(self, exp: Experience, epochs: int) -> dict[str, float]:
        def loss_fn(micro: Experience, totals: dict[str, float]):
            values = response_values(self.engine, micro, self.cfg.packing)
            loss, stats = value_loss(values, micro.old_values, micro.returns, micro.response_mask,
                                       self.value_clip_eps, totals["tokens"])
            return loss, {"value_loss": loss.item(), "value_clipfrac": stats["clipfrac"]}

        return self._train(exp, epochs, loss_fn)
