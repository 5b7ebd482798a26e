"""The demo's verifiable task: two-number arithmetic word problems in the open-instruct RLVR format.

A problem is a one-sentence story ("Mia has 47 shells and finds 38 more. How many shells does Mia have now?")
whose answer is a sum or a difference of two 2-digit numbers. The reference solution is the equation
(`47+38=85`), so the answer is the last number of the response: the `gsm8k` verifier scores it, exactly as it
scores GSM8K. Three files are written:

- `train.jsonl`, `eval.jsonl`: RLVR records `{messages, ground_truth, dataset: "gsm8k"}`; the eval problems are
  disjoint from the training ones (checked by their operands and operator).
- `sft.jsonl`: SFT records, the training problems with the solution as an assistant turn.

Everything is drawn from `random.Random(seed)`, so a seed names the data set.
"""

from __future__ import annotations

import json
import os
import random

NAMES = ("Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Tom", "Ana", "Ben")
ITEMS = ("apples", "shells", "coins", "books", "stamps", "cards", "pens", "eggs")
ADD = ("{name} has {a} {item} and finds {b} more. How many {item} does {name} have now?",
       "{name} buys {a} {item}, then {b} more. How many {item} in total?")
SUB = ("{name} has {a} {item} and gives away {b}. How many {item} are left?",
       "{name} had {a} {item} and lost {b} of them. How many {item} does {name} have?")


def make_problem(rng: random.Random, digits: int = 2) -> dict:
    """One problem on `digits`-digit operands: question, solution (the equation) and answer; differences are never
    negative."""
    low, high = (0, 9) if digits == 1 else (10 ** (digits - 1), 10 ** digits - 1)
    a, b = rng.randint(low, high), rng.randint(low, high)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if rng.random() < 0.5:
        question = rng.choice(ADD).format(name=name, item=item, a=a, b=b)
        op, answer = "+", a + b
    else:
        a, b = max(a, b), min(a, b)
        question = rng.choice(SUB).format(name=name, item=item, a=a, b=b)
        op, answer = "-", a - b
    return {"question": question, "solution": f"{a}{op}{b}={answer}", "answer": answer, "key": (a, op, b)}


def rlvr_record(problem: dict) -> dict:
    return {"messages": [{"role": "user", "content": problem["question"]}],
            "ground_truth": str(problem["answer"]), "dataset": "gsm8k"}


def sft_record(problem: dict) -> dict:
    return {"messages": [{"role": "user", "content": problem["question"]},
                         {"role": "assistant", "content": problem["solution"]}]}


def write_task(directory: str, *, num_train: int = 4000, num_eval: int = 200, seed: int = 0,
               digits: int = 2) -> dict[str, str]:
    """Write train.jsonl, eval.jsonl and sft.jsonl under `directory`; returns their paths by name."""
    rng = random.Random(seed)
    distinct = (2 * (10 if digits == 1 else 9 * 10 ** (digits - 1))) ** 2
    if num_eval > distinct // 4:
        raise ValueError(f"num_eval={num_eval} is too many for {digits}-digit problems; use at most {distinct // 4}")
    eval_problems, eval_keys = [], set()
    while len(eval_problems) < num_eval:
        problem = make_problem(rng, digits)
        if problem["key"] not in eval_keys:
            eval_keys.add(problem["key"])
            eval_problems.append(problem)
    train_problems = []
    while len(train_problems) < num_train:
        problem = make_problem(rng, digits)
        if problem["key"] not in eval_keys:
            train_problems.append(problem)
    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, f"{name}.jsonl") for name in ("train", "eval", "sft")}
    for name, records in (("train", map(rlvr_record, train_problems)), ("eval", map(rlvr_record, eval_problems)),
                          ("sft", map(sft_record, train_problems))):
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return paths
