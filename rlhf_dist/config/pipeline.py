"""The iterated pipeline's group (``pipeline``): how many rounds of reward model and PPO, and how
each further round's rankings are made."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_dist.config.errors import _check_positive, _fail

KL_REFERENCES = ("sft", "previous")
LABELLERS = ("builtin", "human")


@dataclass
class PipelineConfig:
    """``python -m rlhf_dist.pipeline``: round 1 is SFT -> reward model -> PPO; each further round
    samples responses of the current policy and of the SFT model to the same prompts, has the
    labeller rank them (the task's embedded annotator, with data.annotator_noise), continues the
    reward model from the previous round's on the new rankings, and continues PPO from the current
    policy against it. The evaluation then compares SFT, every round's policy and the last one."""

    # Rounds of reward model + PPO (1: the pipeline runs once). Each round's PPO runs total_steps steps.
    rounds: int = 1
    # Prompts of data.prompts (train split, a fresh draw each round) whose responses are ranked per round.
    label_prompts: int = 256
    # Responses ranked per prompt, split between the current policy (first half, rounded up) and SFT.
    ranking_k: int = 4
    # The KL reference of each further round's PPO: sft (the recipe's), or previous (the policy it starts from).
    kl_reference: str = "sft"
    # Who ranks a round's samples: builtin (the task's labeller), or human: the pipeline exports them
    # (<round>/label/to_rank.jsonl) and pauses until the rankings are imported (pipeline.import_rankings).
    labeller: str = "builtin"
    # python -m rlhf_dist.label hydra.run.dir=<round>/label pipeline.import_rankings=FILE: import a
    # human's rankings of that export ({"id", "responses" best first, optional "ranks"} rows).
    import_rankings: str = ""
    # Set by the pipeline: the round a label stage samples for (seeds its prompts and samples).
    label_round: int = 2

    def validate(self) -> None:
        _check_positive("pipeline", self, "rounds", "label_prompts", "label_round")
        if self.ranking_k < 2:
            _fail("pipeline.ranking_k", self.ranking_k, "must be >= 2 (a ranking needs two responses)")
        if self.labeller not in LABELLERS:
            _fail("pipeline.labeller", self.labeller, f"use one of {', '.join(LABELLERS)}")
        if self.kl_reference not in KL_REFERENCES:
            _fail("pipeline.kl_reference", self.kl_reference, f"use one of {', '.join(KL_REFERENCES)}")
