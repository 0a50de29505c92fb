"""Check: is the tiny calculator policy the starting point RL needs? Measured on held-out problems.

Simulates the multi-turn loop of `rlhf_dist.roles.agent_loop` in plain transformers: a turn is generated
until EOS or the `</calc>` token, decoded from exactly its tokens to the action, and passed to
`CalculatorEnv.step`; the observation is tokenised alone and appended, and the next turn goes on
from the token ids (at most MAX_TURNS turns and MAX_NEW_TOKENS response tokens, model and
observation, as the engine counts them). A turn cut by the token budget ends the episode with
reward 0, as in the engine. Prints, for `--num` test problems:

    greedy         accuracy and tool-call rate   (RL starts here: wants accuracy < 0.3)
    sampled T=1    accuracy and tool-call rate   (how often RL sees the tool: wants ~10-40%)
    forced tool    TOOL_OPEN forced at the decision token, greedy after: accuracy, and the share
                   of first calls whose expression is the problem's (what RL can reach: wants > 0.8)
    decision       at the decision token, greedy: the share of problems where TOOL_OPEN is the
                   argmax, and its mean probability

    .venv/bin/python scripts/check_calculator_model.py [--path DIR] [--num 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, DynamicCache, LlamaForCausalLM, PreTrainedTokenizerBase

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlhf_dist.models import tiny as tiny_model  # noqa: E402 -- after the repo is on sys.path
from rlhf_dist.tasks import calculator  # noqa: E402

MAX_TURNS = 3
MAX_NEW_TOKENS = 40
SPLIT_SEED = 1234  # which test problems; apart from the pretraining seed

# (logits of the next token, the current turn's tokens so far, turn index) -> the token to append
Picker = Callable[[torch.Tensor, list[int], int], int]


@dataclass
class Episode:
    reward: float  # the environment's return
    tool_calls: int
    actions: list[str]  # the decoded model turns


@torch.no_grad()
def run_episode(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, row: dict[str, str],
                pick: Picker) -> Episode:
    env = calculator.CalculatorEnv(row["prompt"], {"answer": row["answer"]})
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(calculator.TOOL_CLOSE)}
    pending = tokenizer(row["prompt"])["input_ids"]  # tokens not yet fed to the model (<s> + prompt)
    cache, used, episode = DynamicCache(), 0, Episode(0.0, 0, [])
    for turn_index in range(MAX_TURNS):
        turn: list[int] = []
        while not turn or turn[-1] not in stops:
            if used == MAX_NEW_TOKENS:
                return episode  # the budget ran out mid-turn: the engine ends it there, unscored
            logits = model(input_ids=torch.tensor([pending]), past_key_values=cache, use_cache=True).logits[0, -1]
            turn.append(pick(logits, turn, turn_index))
            pending, used = [turn[-1]], used + 1
        action = tokenizer.decode(turn, skip_special_tokens=True)
        episode.actions.append(action)
        observation, reward, terminated, truncated, info = env.step(action)
        episode.reward += reward
        episode.tool_calls += int(info.get("tool_call", not (terminated or truncated)))
        observation_ids = tokenizer(observation, add_special_tokens=False)["input_ids"] if observation else []
        if terminated or truncated or used + len(observation_ids) >= MAX_NEW_TOKENS:
            return episode
        pending, used = pending + observation_ids, used + len(observation_ids)
    return episode


def greedy(logits: torch.Tensor, turn: list[int], turn_index: int) -> int:
    return int(logits.argmax())


def sampler(seed: int, temperature: float = 1.0) -> Picker:
    generator = torch.Generator().manual_seed(seed)

    def pick(logits: torch.Tensor, turn: list[int], turn_index: int) -> int:
        probs = torch.softmax(logits / temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))

    return pick


def forced_tool(tokenizer: PreTrainedTokenizerBase) -> Picker:
    """Greedy, except that TOOL_OPEN is the token at the decision position of the first turn."""
    prefix, tool = _decision_prefix(tokenizer), tokenizer.convert_tokens_to_ids(calculator.TOOL_OPEN)

    def pick(logits: torch.Tensor, turn: list[int], turn_index: int) -> int:
        return tool if turn_index == 0 and turn == prefix else int(logits.argmax())

    return pick


def _decision_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    # Both kinds of corpus line continue the prompt with " ", one token; the next one decides.
    return tokenizer(" ", add_special_tokens=False)["input_ids"]


@torch.no_grad()
def decision_stats(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase,
                   rows: list[dict[str, str]]) -> tuple[float, float]:
    """(share of problems whose argmax at the decision token is TOOL_OPEN, mean P(TOOL_OPEN) there)."""
    tool = tokenizer.convert_tokens_to_ids(calculator.TOOL_OPEN)
    argmax, prob = 0, 0.0
    for row in rows:
        ids = tokenizer(row["prompt"])["input_ids"] + _decision_prefix(tokenizer)
        probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], dim=-1)
        argmax += int(probs.argmax()) == tool
        prob += float(probs[tool])
    return argmax / len(rows), prob / len(rows)


def summarize(episodes: list[Episode]) -> tuple[float, float]:
    """(accuracy, share of episodes with at least one tool call)."""
    return (sum(e.reward for e in episodes) / len(episodes), sum(e.tool_calls > 0 for e in episodes) / len(episodes))


def check(path: pathlib.Path, num: int, seed: int) -> dict[str, float]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path).eval()
    rows = calculator.make_problems(num, SPLIT_SEED, "test")

    def episodes(pick: Picker) -> list[Episode]:
        return [run_episode(model, tokenizer, row, pick) for row in rows]

    figures = {}
    figures["greedy/accuracy"], figures["greedy/tool_rate"] = summarize(episodes(greedy))
    figures["sampled/accuracy"], figures["sampled/tool_rate"] = summarize(episodes(sampler(seed)))
    forced = episodes(forced_tool(tokenizer))
    figures["forced/accuracy"], _ = summarize(forced)
    calls = [f"{calculator.TOOL_OPEN}{row['prompt'].removesuffix(' =')}{calculator.TOOL_CLOSE}" for row in rows]
    figures["forced/expression_right"] = sum(e.actions[0].strip() == c for e, c in zip(forced, calls)) / num
    figures["decision/tool_argmax"], figures["decision/tool_prob"] = decision_stats(model, tokenizer, rows)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=pathlib.Path, default=None,
                        help="where the policy is (built there if missing); default: default_model_dir(RECIPE.name)")
    parser.add_argument("--num", type=int, default=200, help="held-out (test split) problems")
    parser.add_argument("--seed", type=int, default=0, help="pretraining seed (when building) and sampling seed")
    args = parser.parse_args()
    path = tiny_model.build_task_policy(calculator.TASK, args.path, args.seed)
    torch.set_num_threads(tiny_model.NUM_THREADS)
    figures = check(pathlib.Path(path), args.num, args.seed)
    print(f"{path}, {args.num} test problems, at most {MAX_TURNS} turns / {MAX_NEW_TOKENS} tokens")
    for key, value in figures.items():
        print(f"  {key:<24} {value:.3f}")


if __name__ == "__main__":
    main()
