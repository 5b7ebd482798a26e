"""Reward pool and `verify`: order, agreement with in-line scoring, time limits, worker crashes, errors."""

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from megatron_rlvr.rewards import RecordError, RewardPool, configure_default_pool, run_verifier, verify
from tests.rewards import test_gsm8k, test_ifeval, test_math

HANG_GUARD_S = 60.0  # a bound that only a hang would cross; never a performance check
MISBEHAVING = "tests.rewards.misbehaving_verifiers"


def _table_records():
    records = [("gsm8k", p, t) for p, t, _ in test_gsm8k.CASES.values()]
    records += [("math", p, t) for p, t, _ in test_math.CASES.values()]
    records += [("ifeval", p, t) for p, t, _ in test_ifeval.DIFFERENCES.values()]
    return records


@pytest.fixture(scope="module")
def pool():
    with RewardPool(workers=2, timeout=2.0, max_chunk=4, verifier_modules=[MISBEHAVING]) as reward_pool:
        yield reward_pool


def test_scores_match_inline_in_order():
    records = _table_records()
    # Interleave datasets so chunks mix verifiers; order must still come back as given.
    records = records[::2] + records[1::2]
    expected = [run_verifier(*record) for record in records]
    # A generous limit: this compares scores, and a loaded CI machine must not turn a slow record into a 0.
    with RewardPool(workers=2, timeout=60.0, max_chunk=4) as roomy_pool:
        assert roomy_pool.score(records) == expected
    assert 0 < sum(expected) < len(expected)


def test_empty_batch(pool):
    assert pool.score([]) == []


PATHOLOGICAL = {
    "tower_of_powers": ("math", "\\boxed{9^{9^{9^{9}}}}", "1"),
    "deep_nesting": ("math", "\\boxed{" + "{" * 20000 + "1" + "}" * 20000 + "}", "2"),
    "deep_parentheses": ("math", "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}", "2"),
    "megabyte_of_latex": ("math", "\\frac{" * 170_000 + "$", "1"),
    "megabyte_no_number": ("gsm8k", "x" * 1_000_000, "#### 5"),
    "megabyte_nested_json": ("ifeval", "[" * 1_000_000, json.dumps({"func_name": "validate_json_format"})),
    "hang": ("test_misbehaving", "hang", "hang"),
}


def test_pathological_inputs_score_zero_and_pool_recovers(pool, caplog):
    ok = [("gsm8k", "so 4", "#### 4"), ("math", "\\boxed{\\frac{1}{2}}", "0.5")]
    records = list(PATHOLOGICAL.values()) + ok
    timeouts_before = pool.num_timeouts
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="megatron_rlvr.rewards.pool"):
        scores = pool.score(records)
    assert time.monotonic() - start < HANG_GUARD_S
    assert scores == [0.0] * len(PATHOLOGICAL) + [1.0, 1.0]
    # At least the hang and the tower of powers ran into the limit; each was logged with its record.
    assert pool.num_timeouts - timeouts_before >= 2
    assert "exceeded 2 s on record 0" in caplog.text
    assert f"exceeded 2 s on record {list(PATHOLOGICAL).index('hang')}" in caplog.text
    # The replaced workers keep serving.
    assert pool.score(ok * 3) == [1.0] * 6


def test_crashing_worker_is_replaced(pool, caplog):
    records = [("test_misbehaving", "a", "a"), ("test_misbehaving", "crash", "x"), ("test_misbehaving", "b", "b")]
    with caplog.at_level(logging.WARNING, logger="megatron_rlvr.rewards.pool"):
        assert pool.score(records * 2) == [1.0, 0.0, 1.0] * 2
    assert "reward worker died (exit code 3) on record 1" in caplog.text


def test_verifier_exception_scores_zero_and_is_logged(pool, caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_rlvr.rewards.pool"):
        assert pool.score([("test_misbehaving", "raise", "x"), ("test_misbehaving", "y", "y")]) == [0.0, 1.0]
    assert "RuntimeError: verifier exploded on record 0" in caplog.text


def test_record_error_in_worker_is_raised_and_pool_stays_usable(pool):
    records = [("test_misbehaving", "a", "a")] * 5 + [("test_misbehaving", "bad record", "x")]
    with pytest.raises(RecordError, match="record 5 \\(test_misbehaving\\): RecordError: this record's ground"):
        pool.score(records)
    with pytest.raises(RecordError, match="record 1 \\(gsm8k\\).*gsm8k ground truth"):
        pool.score([("gsm8k", "1", "1"), ("gsm8k", "1", "#### none")])
    assert pool.score([("test_misbehaving", "a", "a"), ("gsm8k", "is 3", "3")]) == [1.0, 1.0]


def test_unknown_dataset_is_rejected_before_dispatch(pool):
    with pytest.raises(ValueError) as err:
        pool.score([("gsm8k", "1", "1"), ("mmlu", "A", "A")])
    message = str(err.value)
    assert "record 1" in message and "'mmlu'" in message
    assert all(name in message for name in ("gsm8k", "math", "ifeval"))


@pytest.mark.parametrize("record", [("gsm8k", 5, "5"), ("gsm8k", "5"), "gsm8k"])
def test_malformed_records_rejected(pool, record):
    with pytest.raises(RecordError, match="record 0"):
        pool.score([record])


def test_closed_pool_refuses_work():
    with RewardPool(workers=1, timeout=5.0) as short_lived:
        assert short_lived.score([("gsm8k", "7", "7")]) == [1.0]
    assert short_lived.closed
    with pytest.raises(RuntimeError, match="after close"):
        short_lived.score([("gsm8k", "7", "7")])


@pytest.mark.parametrize("kwargs,message", [
    ({"workers": 0}, "at least 1 worker"),
    ({"timeout": 0}, "positive number of seconds"),
    ({"max_chunk": 0}, "max_chunk"),
])
def test_pool_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardPool(**kwargs)


def test_verify_unknown_dataset_names_known_ones():
    with pytest.raises(ValueError) as err:
        verify("humaneval", "def f(): pass", "")
    message = str(err.value)
    assert "'humaneval'" in message
    assert all(name in message for name in ("gsm8k", "math", "ifeval"))


def test_verify_scores_and_bounds_time():
    configure_default_pool(workers=1, timeout=2.0)
    try:
        assert verify("GSM8K", "The answer is 1,080.", "#### 1,080") == 1.0
        assert verify("Math", "$\\boxed{\\dfrac{1}{2}}$", "0.5") == 1.0
        assert verify("IfEval", "no commas", json.dumps({"func_name": "validate_no_commas"})) == 1.0
        start = time.monotonic()
        assert verify("math", "\\boxed{9^{9^{9^{9}}}}", "1") == 0.0
        assert time.monotonic() - start < HANG_GUARD_S
        assert verify("gsm8k", "so 2", "2") == 1.0
        with pytest.raises(ValueError, match="unknown ifeval func_name 'nope'"):
            verify("ifeval", "x", json.dumps({"func_name": "nope"}))
    finally:
        configure_default_pool()


SCRIPT_WITHOUT_MAIN_GUARD = """
import time
from megatron_rlvr.rewards import configure_default_pool, verify
configure_default_pool(workers=1, timeout=2.0)
print("gsm8k", verify("gsm8k", "so 12", "#### 12"))
start = time.monotonic()
print("hostile", verify("math", "\\\\boxed{9^{9^{9^{9}}}}", "1"), time.monotonic() - start)
"""


def test_verify_from_a_plain_script_without_main_guard(tmp_path):
    """The workers are fresh interpreters: the script is not re-run in them, and its time bound holds."""
    script = tmp_path / "score.py"
    script.write_text(SCRIPT_WITHOUT_MAIN_GUARD)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=HANG_GUARD_S * 4)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines["gsm8k"] == "1.0"
    score, seconds = lines["hostile"].split()
    assert score == "0.0" and float(seconds) < HANG_GUARD_S


BROKEN_IN_WORKER = """
import sys
if getattr(sys.modules["__main__"].__spec__, "name", "") == "megatron_rlvr.rewards.worker":
    raise ImportError("libverifier.so.3: cannot open shared object file")
"""


def test_worker_start_up_error_states_the_real_cause(tmp_path, monkeypatch):
    (tmp_path / "broken_in_worker.py").write_text(BROKEN_IN_WORKER)
    monkeypatch.syspath_prepend(str(tmp_path))
    with RewardPool(workers=1, timeout=5.0, verifier_modules=["broken_in_worker"]) as doomed:
        with pytest.raises(RuntimeError, match="exited during start-up") as err:
            doomed.score([("gsm8k", "7", "7")])
    assert "libverifier.so.3: cannot open shared object file" in str(err.value)
