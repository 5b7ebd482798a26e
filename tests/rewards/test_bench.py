"""`megatron-rlvr bench rewards` at a tiny size: it runs, reports every mix and backend, and the pool agrees
with the in-line loop (the exit status says so)."""

import argparse
import json

from megatron_rlvr.benchmarks import rewards as bench


def test_bench_rewards_tiny(capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--responses", "9", "--workers", "1", "--json"])
    assert bench.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(row["mix"], row["backend"]) for row in report["rows"]}
    assert rows == {(mix, backend) for mix in ("gsm8k", "math", "ifeval", "mixed") for backend in ("inline", "pool")}
    assert all(row["agrees"] and row["responses_per_s"] > 0 for row in report["rows"])
    # The synthetic data holds right and wrong answers, so a verifier that always says yes (or no) would show.
    assert all(0 < row["accuracy"] < 1 for row in report["rows"])


def test_synthetic_records_are_deterministic():
    assert bench.make_records("mixed", 6, seed=3) == bench.make_records("mixed", 6, seed=3)
    assert [r[0] for r in bench.make_records("mixed", 6, seed=3)] == ["gsm8k", "math", "ifeval"] * 2
