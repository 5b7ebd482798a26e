"""The demo's verifiable task: two-number arithmetic word problems in the open-instruct RLVR format.

A problem is a one-sentence story ("Mia has 7 shells and finds 8 more. How many shells does Mia have now?")
whose answer is a sum or a difference of two numbers. The reference solution is the equation (`7+8=15`), so the
answer is the last number of the response: the `gsm8k` verifier scores it, exactly as it scores GSM8K.

The held-out problems are held out by wording: their names and items never occur in training (SFT or RLVR),
so held-out accuracy measures whether the policy reads a new story and does the arithmetic, not whether it
recalls a prompt. With 1-digit operands the arithmetic facts themselves are few (155) and are all seen in
training; with more digits most held-out facts are new too. Five files are written:

- `train.jsonl`, `eval.jsonl`: RLVR records `{messages, ground_truth, dataset: "gsm8k"}`;
- `sft.jsonl`: SFT records, the first `num_sft` training problems with the solution as an assistant turn;
- `dpo.jsonl`, `dpo_eval.jsonl`: preference records `{chosen, rejected}` (open-instruct's format) of the training
  and the held-out problems: the solution is chosen, the same equation with a wrong result (off by 1 to 3, or the
  other operation's result) is rejected: the slips a warm-started model makes.

Everything is drawn from `random.Random(seed)` (the wrong results from a second generator, so the other files do not
depend on them), so a seed names the data set.
"""

from __future__ import annotations

import json
import os
import random
import re

NAMES = ("Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Tom")
ITEMS = ("apples", "shells", "coins", "books", "stamps", "cards")
EVAL_NAMES = ("Ana", "Ben")  # held-out wording: only in eval.jsonl
EVAL_ITEMS = ("pens", "eggs")
ADD = ("{name} has {a} {item} and finds {b} more. How many {item} does {name} have now?",
       "{name} buys {a} {item}, then {b} more. How many {item} in total?")
SUB = ("{name} has {a} {item} and gives away {b}. How many {item} are left?",
       "{name} had {a} {item} and lost {b} of them. How many {item} does {name} have?")


def make_problem(rng: random.Random, digits: int = 1, held_out: bool = False) -> dict:
    """One problem on `digits`-digit operands: question, solution (the equation) and answer; differences are never
    negative. `held_out` draws the story's name and item from the eval-only wording."""
    low, high = (0, 9) if digits == 1 else (10 ** (digits - 1), 10 ** digits - 1)
    a, b = rng.randint(low, high), rng.randint(low, high)
    name = rng.choice(EVAL_NAMES if held_out else NAMES)
    item = rng.choice(EVAL_ITEMS if held_out else ITEMS)
    if rng.random() < 0.5:
        question = rng.choice(ADD).format(name=name, item=item, a=a, b=b)
        op, answer = "+", a + b
    else:
        a, b = max(a, b), min(a, b)
        question = rng.choice(SUB).format(name=name, item=item, a=a, b=b)
        op, answer = "-", a - b
    return {"question": question, "solution": f"{a}{op}{b}={answer}", "answer": answer}


def rlvr_record(problem: dict) -> dict:
    return {"messages": [{"role": "user", "content": problem["question"]}],
            "ground_truth": str(problem["answer"]), "dataset": "gsm8k"}


def sft_record(problem: dict) -> dict:
    return {"messages": [{"role": "user", "content": problem["question"]},
                         {"role": "assistant", "content": problem["solution"]}]}


def preference_record(problem: dict, rng: random.Random) -> dict:
    """The solution as chosen, the same equation with a wrong, non-negative result as rejected."""
    left, answer = problem["solution"].rsplit("=", 1)
    a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)", left).groups()
    other = int(a) - int(b) if op == "+" else int(a) + int(b)
    wrong = other if rng.random() < 0.3 else None
    while wrong is None or wrong == int(answer) or wrong < 0:
        wrong = int(answer) + rng.choice((-3, -2, -1, 1, 2, 3))
    prompt = [{"role": "user", "content": problem["question"]}]
    return {"chosen": prompt + [{"role": "assistant", "content": problem["solution"]}],
            "rejected": prompt + [{"role": "assistant", "content": f"{left}={wrong}"}]}


def write_task(directory: str, *, num_train: int = 4000, num_eval: int = 200, num_sft: int | None = None,
               seed: int = 0, digits: int = 1) -> dict[str, str]:
    """Write train.jsonl, eval.jsonl, sft.jsonl, dpo.jsonl and dpo_eval.jsonl under `directory`; returns their
    paths by name."""
    rng = random.Random(seed)
    eval_problems = [make_problem(rng, digits, held_out=True) for _ in range(num_eval)]
    train_problems = [make_problem(rng, digits) for _ in range(num_train)]
    sft_problems = train_problems[: num_train if num_sft is None else num_sft]
    wrong = random.Random(seed + 1)
    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, f"{name}.jsonl") for name in ("train", "eval", "sft", "dpo", "dpo_eval")}
    for name, records in (("train", map(rlvr_record, train_problems)), ("eval", map(rlvr_record, eval_problems)),
                          ("sft", map(sft_record, sft_problems)),
                          ("dpo", [preference_record(p, wrong) for p in train_problems]),
                          ("dpo_eval", [preference_record(p, wrong) for p in eval_problems])):
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return paths
