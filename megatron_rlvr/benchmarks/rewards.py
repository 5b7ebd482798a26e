"""`megatron-rlvr bench rewards`: responses verified per second through the reward pool.

One run draws synthetic responses per dataset mix (gsm8k, math, ifeval, and an equal `mixed` of the three;
about half of them right), scores them once with a single-process in-line loop (`run_verifier`, no isolation,
no time limit: the baseline) and then through `RewardPool` with each requested worker count, and prints
responses/s for each beside the in-line figure. Pool start-up is excluded (it happens once per training run);
a warm-up batch runs first. The pool's scores must equal the in-line ones, or the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from megatron_rlvr.rewards import RewardPool, run_verifier
from megatron_rlvr.rewards.pool import WARM_UP_RECORDS

_WORDS = ("the", "model", "reward", "answer", "policy", "token", "value", "gradient", "sample", "group", "batch",
          "update", "step", "verify", "number", "train", "loss", "prompt", "rollout", "score")


def _prose(rng: random.Random, words: int) -> str:
    sentences, current = [], []
    for _ in range(words):
        current.append(rng.choice(_WORDS))
        if len(current) >= rng.randint(6, 14):
            sentences.append(" ".join(current).capitalize() + ".")
            current = []
    return " ".join(sentences + ([" ".join(current).capitalize() + "."] if current else []))


def _gsm8k_record(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    answer = a * b
    said = answer if rng.random() < 0.5 else answer + rng.choice((-1, 1)) * rng.randint(1, 9)
    steps = [f"{_prose(rng, 12)} {rng.randint(1, 500)} + {rng.randint(1, 500)} = {rng.randint(2, 1000)}."
             for _ in range(rng.randint(2, 5))]
    response = "\n".join(steps + [f"So {a} x {b} = {said:,}.", f"The answer is ${said:,}."])
    return "gsm8k", response, f"{a} x {b} = <<{a}*{b}={answer}>>{answer}\n#### {answer:,}"


def _math_record(rng: random.Random) -> tuple[str, str, str]:
    p, q, r = rng.randint(1, 40), rng.randint(2, 40), rng.randint(2, 30)
    forms = [  # (gold, an equivalent spelling)
        (f"\\frac{{{p}}}{{{q}}}", f"\\dfrac{{{2 * p}}}{{{2 * q}}}"),
        (f"{p}\\sqrt{{{r}}}", f"\\sqrt{{{p * p * r}}}"),
        (f"[{p}, {p + q})", f"[{p},{p + q})"),
        (f"\\{{{p}, {q}\\}}", f"\\{{{q},{p}\\}}"),
        (f"(x+{p})^2", f"x^2+{2 * p}x+{p * p}"),
        (f"{p}\\pi", f"{p} \\pi"),
        (f"{p}", f"x = {p}"),
        (f"{p / 4}", f"\\frac{{{p}}}{{4}}"),
    ]
    gold, spelled = rng.choice(forms)
    if rng.random() >= 0.5:
        spelled = spelled.replace(str(p), str(p + 1), 1)
    response = f"{_prose(rng, 60)}\nTherefore the answer is $\\boxed{{{spelled}}}$."
    return "math", response, gold


def _ifeval_record(rng: random.Random) -> tuple[str, str, str]:
    text = _prose(rng, rng.randint(80, 300))
    n = rng.randint(1, 60)
    constraints = [
        {"func_name": "validate_word_constraint", "N": len(text.split()) + rng.choice((-20, 20)),
         "quantifier": rng.choice(("at least", "at most", "around"))},
        {"func_name": "verify_keywords", "keyword_list": rng.sample(_WORDS, 3)},
        {"func_name": "validate_forbidden_words", "forbidden_words": rng.sample(_WORDS, 2)},
        {"func_name": "verify_sentence_constraint", "N": n // 3, "quantifier": "at least"},
        {"func_name": "validate_lowercase"},
        {"func_name": "validate_no_commas"},
        {"func_name": "validate_response_language", "language": "en"},
        {"func_name": "verify_keyword_frequency", "word": rng.choice(_WORDS), "N": n // 6},
        {"func_name": "validate_highlighted_sections", "N": 2},
    ]
    if rng.random() < 0.3:
        text = text.lower()
    return "ifeval", text, json.dumps(rng.choice(constraints))


_MAKERS = {"gsm8k": [_gsm8k_record], "math": [_math_record], "ifeval": [_ifeval_record],
           "mixed": [_gsm8k_record, _math_record, _ifeval_record]}


def make_records(mix: str, count: int, seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    makers = _MAKERS[mix]
    return [makers[i % len(makers)](rng) for i in range(count)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cpus = len(os.sched_getaffinity(0))
    parser.add_argument("--responses", type=int, default=300, help="responses per mix (default 300)")
    parser.add_argument("--mixes", default="gsm8k,math,ifeval,mixed",
                        help=f"comma-separated mixes from {', '.join(_MAKERS)} (default: all)")
    parser.add_argument("--workers", default=",".join(sorted({"1", str(cpus)}, key=int)),
                        help=f"comma-separated pool sizes (default 1,{cpus}: one and this machine's CPUs)")
    parser.add_argument("--timeout", type=float, default=10.0, help="pool per-response timeout, s (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def run(args: argparse.Namespace) -> int:
    mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    unknown = [m for m in mixes if m not in _MAKERS]
    if unknown:
        raise SystemExit(f"bench rewards: unknown mix {', '.join(unknown)}; choose from {', '.join(_MAKERS)}")
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    data = {mix: make_records(mix, args.responses, args.seed) for mix in mixes}
    # The same one-time initialisation the pool's workers do before they report ready (langdetect's profiles,
    # math-verify's regexes), so that neither side is timed with it.
    warm_up = list(WARM_UP_RECORDS) + make_records("mixed", 6, args.seed + 1)
    for record in warm_up:
        run_verifier(*record)

    rows, all_agree = [], True
    inline_scores = {}
    for mix in mixes:
        start = time.perf_counter()
        inline_scores[mix] = [run_verifier(*record) for record in data[mix]]
        rows.append({"mix": mix, "backend": "inline", "workers": 0,
                     "responses_per_s": _rate(args.responses, time.perf_counter() - start),
                     "accuracy": sum(inline_scores[mix]) / args.responses, "agrees": True})
    for workers in worker_counts:
        with RewardPool(workers=workers, timeout=args.timeout) as pool:
            pool.score(warm_up * workers)
            for mix in mixes:
                start = time.perf_counter()
                scores = pool.score(data[mix])
                seconds = time.perf_counter() - start
                agrees = scores == inline_scores[mix]
                all_agree &= agrees
                rows.append({"mix": mix, "backend": "pool", "workers": workers,
                             "responses_per_s": _rate(args.responses, seconds),
                             "accuracy": sum(scores) / args.responses, "agrees": agrees,
                             "timeouts": pool.num_timeouts})
    report = {"responses_per_mix": args.responses, "cpus": len(os.sched_getaffinity(0)), "timeout_s": args.timeout,
              "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if all_agree else 1
    print(f"reward verification: {args.responses} responses per mix, {report['cpus']} CPUs available, "
          f"pool timeout {args.timeout:g} s")
    print(f"{'mix':<8} {'backend':<12} {'responses/s':>12} {'vs inline':>10} {'accuracy':>9} {'same':>5}")
    inline_rate = {row["mix"]: row["responses_per_s"] for row in rows if row["backend"] == "inline"}
    for row in sorted(rows, key=lambda r: (mixes.index(r["mix"]), r["workers"])):
        backend = "inline" if row["backend"] == "inline" else f"pool x{row['workers']}"
        ratio = row["responses_per_s"] / inline_rate[row["mix"]]
        print(f"{row['mix']:<8} {backend:<12} {row['responses_per_s']:>12.1f} {ratio:>9.2f}x "
              f"{row['accuracy']:>9.2f} {'yes' if row['agrees'] else 'NO':>5}")
    return 0 if all_agree else 1
