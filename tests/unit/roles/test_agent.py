"""Multi-turn rollouts: the math over responses with environment tokens in them (by hand), the
action mask, environment returns and failures, observation tokens, and the environment factory."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_dist.core.advantages import gae, reinforce_pp_advantages, token_rewards
from rlhf_dist.core.experience import collate
from rlhf_dist.core.losses import policy_loss
from rlhf_dist.core.stats import broadcast_to_tokens
from rlhf_dist.driver.metrics import env_metrics
from rlhf_dist.registry import env_factory
from rlhf_dist.roles.agent_loop import EnvError, observation_ids
from rlhf_dist.roles.generation import Generation
from rlhf_dist.rollout.scoring import task_scores
from rlhf_dist.tasks.base import Environment

# A response of 5 tokens: a model token, two observation tokens, two model tokens (then padding).
MASK = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 0.0]])


def test_gae_skips_the_observation_between_two_turns():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 9.0, 9.0, 0.25, 0.75, 9.0]])  # 9: never read (observation, padding)
    # gamma = lam = 1 over the valid tokens 0, 3, 4:
    #   t4: delta = 1 - 0.75 = 0.25                 A4 = 0.25
    #   t3: delta = 0 + 0.75 - 0.25 = 0.5           A3 = 0.5 + 0.25 = 0.75
    #   t0: delta = 0 + 0.25 - 0.5 = -0.25          A0 = -0.25 + 0.75 = 0.5   (bootstraps from t3, not t1)
    adv, ret = gae(rewards, values, MASK, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0, 0, 0.75, 0.25, 0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 0, 0, 1.0, 1.0, 0]]))
    # gamma = lam = 0.5: one discount step per valid token, none for the observation:
    #   t4: A4 = 0.25; t3: delta = 0.5 * 0.75 - 0.25 = 0.125, A3 = 0.125 + 0.25 * 0.25 = 0.1875
    #   t0: delta = 0.5 * 0.25 - 0.5 = -0.375, A0 = -0.375 + 0.25 * 0.1875 = -0.328125
    adv, _ = gae(rewards, values, MASK, gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.328125, 0, 0, 0.1875, 0.25, 0]]))


def test_token_rewards_put_the_score_on_the_last_model_token():
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]])  # row 2: an observation first
    kl = torch.full((2, 5), 0.5)
    rewards = token_rewards(torch.tensor([2.0, 3.0]), kl, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.05, 0, 1.95, 0], [0, 2.95, 0, 0, 0]]))


def test_reinforce_pp_returns_carry_over_the_observation():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
    # G4 = 1, G3 = 0.5 * 1 = 0.5, G0 = 0.5 * G3 = 0.25 (the observation is no step); then whitened
    # over the three valid tokens.
    returns = torch.tensor([[0.25, 0.0, 0.0, 0.5, 1.0, 0.0]])
    valid = torch.tensor([0.25, 0.5, 1.0])
    expected = (returns - valid.mean()) / (valid.std() + 1e-8) * MASK
    torch.testing.assert_close(reinforce_pp_advantages(rewards, MASK, gamma=0.5), expected, atol=1e-6, rtol=0)


def test_observation_tokens_carry_no_loss_gradient():
    logprobs = torch.full((1, 6), -1.0, requires_grad=True)
    old = torch.full((1, 6), -1.0)
    advantages = broadcast_to_tokens(torch.tensor([1.0]), MASK)
    loss, _ = policy_loss(logprobs, old, advantages, MASK, clip_eps=0.2)
    loss.backward()
    assert logprobs.grad[0, [1, 2, 5]].abs().max() == 0  # observation and padding
    assert (logprobs.grad[0, [0, 3, 4]] != 0).all()


def test_collate_zeroes_the_environment_tokens_of_the_response_mask():
    exp = collate([[1, 2], [3]], [[10, 11, 12, 13], [20]], pad_id=0, action_masks=[[1, 0, 0, 1], None])
    torch.testing.assert_close(exp.response_mask, torch.tensor([[1.0, 0, 0, 1], [1, 0, 0, 0]]))
    torch.testing.assert_close(exp.attention_mask, torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]]))
    with pytest.raises(ValueError, match="row 0: action mask of 2 for a response of 4 tokens"):
        collate([[1]], [[10, 11, 12, 13]], pad_id=0, action_masks=[[1, 0]])


def _multi_turn(ret: float, error: str = "", turns: int = 2, tool_calls: int = 1, seconds: float = 0.5) -> Generation:
    env = {"turns": turns, "tool_calls": tool_calls, "seconds": seconds, "error": error,
           "return": math.nan if error else ret, "message": "step() raised KeyError: 'x'" if error else ""}
    return Generation([1], [2, 3], [-0.1, 0.0], "t", action_mask=[1, 0], env=env)


def test_environment_returns_add_to_the_scores_and_a_failed_environment_follows_on_invalid():
    gens = [_multi_turn(1.0), _multi_turn(0.0), Generation([1], [2], [-0.1], "single")]
    assert task_scores([0.5, 0.25, 2.0], gens, weight=2.0, on_invalid="error") == [2.5, 0.25, 2.0]
    failed = [_multi_turn(1.0), _multi_turn(0.0, error="error")]
    scores = task_scores([0.0, 0.0], failed, weight=1.0, on_invalid="drop")
    assert scores[0] == 1.0 and math.isnan(scores[1])
    with pytest.raises(EnvError, match=r"^generation.env: sample 1: the environment failed \(error\): step\(\) raised KeyError: 'x' "
                                       r"\(reward.on_invalid=drop skips such samples\)$"):
        task_scores([0.0, 0.0], failed, weight=1.0, on_invalid="error")


def test_env_metrics_count_turns_tool_calls_and_failures():
    gens = [_multi_turn(1.0, turns=3, tool_calls=2, seconds=1.0), _multi_turn(0.0, error="timeout", turns=1,
                                                                                tool_calls=0, seconds=5.0),
            _multi_turn(0.0, error="error", turns=2, tool_calls=1, seconds=0.5)]
    assert env_metrics(gens) == {"env/turns_mean": 2.0, "env/tool_calls_mean": 1.0, "env/errors": 1.0,
                                 "env/timeouts": 1.0, "time/env": 6.5}
    assert env_metrics([Generation([1], [2], [-0.1], "single")]) == {}


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_observation_tokens_plain_and_as_a_chat_turn(tiny_policy):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    assert observation_ids(tokenizer, " the end", chat=False, turn_open=False) == tokenizer(
        " the end", add_special_tokens=False)["input_ids"]
    assert observation_ids(tokenizer, "", chat=False, turn_open=False) == []
    tokenizer.chat_template = CHATML
    tokenizer.eos_token = "<|im_end|>"
    # The model sampled its end-of-turn token: the observation starts with the template's newline after it.
    closed = observation_ids(tokenizer, "42", chat=True, turn_open=False)
    assert tokenizer.decode(closed) == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    # The turn stopped at a tool call's stop string: the template's close of the turn comes first.
    opened = observation_ids(tokenizer, "42", chat=True, turn_open=True)
    assert tokenizer.decode(opened) == "<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"


class _Env(Environment):
    stop = ("</x>",)

    def __init__(self, prompt: str, metadata: dict, level: int = 1) -> None:
        self.prompt, self.level = prompt, level

    def step(self, action: str):
        return "", float(self.level), True, False, {}


def test_env_factory_binds_arguments_and_names_the_problem():
    make = env_factory({"_target_": f"{__name__}._Env", "level": 3})
    env = make("p", {"a": 1})
    assert (env.prompt, env.level, env.reset()) == ("p", 3, ("", {}))
    with pytest.raises(ValueError, match=r"^rollout.env: needs _target_"):
        env_factory({"level": 3})
    with pytest.raises(ValueError, match=r"^rollout.env._target_='nope.Env': cannot import it"):
        env_factory({"_target_": "nope.Env"})
    with pytest.raises(ValueError, match=rf"^rollout.env._target_='{__name__}._Env': cannot be called as "
                                         rf"{__name__}._Env\(prompt=, metadata=, colour=\)"):
        env_factory({"_target_": f"{__name__}._Env", "colour": "red"})
