"""Reading RLVR records and converting GSM8K: real sample data, Parquet, and malformed-record reporting."""

import json
import logging
import sys

import pytest

from megatron_rlvr.data import MalformedRecordError, RLVRRecord, read_gsm8k, read_rlvr_records, write_jsonl

from .conftest import GSM8K_SAMPLE

# The final answers of the five sample records, read off the file by eye ("#### N" on each answer's last line).
SAMPLE_ANSWERS = ["72", "10", "5", "42", "624"]


def test_gsm8k_conversion_of_real_records():
    records = read_gsm8k(GSM8K_SAMPLE)
    assert [r.ground_truth for r in records] == SAMPLE_ANSWERS
    assert {r.dataset for r in records} == {"gsm8k"}
    assert records[0].messages == ({"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and "
                                    "then she sold half as many clips in May. How many clips did Natalia sell "
                                    "altogether in April and May?"},)
    assert records[2].source == f"{GSM8K_SAMPLE}:line 3"


def test_gsm8k_instruction_and_thousands_separator():
    from megatron_rlvr.data import gsm8k_to_rlvr

    record = gsm8k_to_rlvr({"question": "Q?", "answer": "work\n#### 1,250"}, "x", instruction="Think.")
    assert record.ground_truth == "1250"
    assert record.messages[0]["content"] == "Q?\n\nThink."


def test_gsm8k_conversion_cli(tmp_path):
    import subprocess

    dst = tmp_path / "rlvr.jsonl"
    out = subprocess.run([sys.executable, "-m", "megatron_rlvr.data.gsm8k", GSM8K_SAMPLE, str(dst)],
                         capture_output=True, text=True, check=True)
    assert f"wrote 5 records to {dst}" in out.stdout
    assert [json.loads(line)["ground_truth"] for line in open(dst)] == SAMPLE_ANSWERS


def test_jsonl_round_trip(tmp_path):
    records = read_gsm8k(GSM8K_SAMPLE)
    path = tmp_path / "rlvr.jsonl"
    assert write_jsonl(records, path) == 5
    loaded = read_rlvr_records(path)
    assert [r.to_dict() for r in loaded] == [r.to_dict() for r in records]
    assert loaded[4].source == f"{path}:line 5"


def write_parquet(rows, path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def test_parquet_round_trip(tmp_path):
    records = read_gsm8k(GSM8K_SAMPLE)
    path = str(tmp_path / "rlvr.parquet")
    write_parquet([r.to_dict() for r in records], path)
    loaded = read_rlvr_records(path)
    assert [r.to_dict() for r in loaded] == [r.to_dict() for r in records]
    assert loaded[3].source == f"{path} row 3"


def test_parquet_malformed_row_is_named(tmp_path):
    path = str(tmp_path / "bad.parquet")
    good = {"messages": [{"role": "user", "content": "hi"}], "ground_truth": "1", "dataset": "gsm8k"}
    write_parquet([good, {**good, "dataset": ""}], path)
    with pytest.raises(MalformedRecordError, match=r"bad\.parquet row 1: 'dataset' must be a non-empty"):
        read_rlvr_records(path)


def test_parquet_without_pyarrow_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"x\.parquet needs pyarrow.*pip install pyarrow"):
        read_rlvr_records(tmp_path / "x.parquet")


GOOD = {"messages": [{"role": "user", "content": "1+1?"}], "ground_truth": "2", "dataset": "gsm8k"}
MALFORMED_LINES = [
    json.dumps(GOOD),
    "",
    '{"messages": [',
    json.dumps({**GOOD, "ground_truth": 2}),
    json.dumps({k: v for k, v in GOOD.items() if k != "dataset"}),
    json.dumps({**GOOD, "messages": [{"role": "user"}]}),
    json.dumps(GOOD),
]


@pytest.fixture
def malformed_file(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(MALFORMED_LINES) + "\n")
    return str(path)


def test_malformed_record_fails_with_file_and_line(malformed_file):
    with pytest.raises(MalformedRecordError, match=r"mixed\.jsonl:line 3: invalid JSON") as info:
        read_rlvr_records(malformed_file)
    assert info.value.where == f"{malformed_file}:line 3"


def test_malformed_records_skipped_and_logged(malformed_file, caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_rlvr.data.records"):
        records = read_rlvr_records(malformed_file, on_malformed="skip")
    assert [r.source for r in records] == [f"{malformed_file}:line 1", f"{malformed_file}:line 7"]
    log = caplog.text
    assert f"{malformed_file}:line 3: invalid JSON" in log
    assert f"{malformed_file}:line 4: 'ground_truth' must be a string (or a JSON list/object), got int" in log
    assert f"{malformed_file}:line 5: missing field(s) dataset" in log
    assert f"{malformed_file}:line 6: messages[0] must be an object with string 'role' and 'content'" in log
    assert "skipped 4 malformed record(s); 2 loaded" in log


def test_gsm8k_without_final_answer_is_named(tmp_path):
    path = tmp_path / "raw.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a\n#### 3"}) + "\n"
                    + json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(MalformedRecordError, match=r"raw\.jsonl:line 2: GSM8K 'answer' has no final answer"):
        read_gsm8k(path)
    assert [r.ground_truth for r in read_gsm8k(path, on_malformed="skip")] == ["3"]


def test_unsupported_file_type_and_policy(tmp_path):
    with pytest.raises(ValueError, match=r"data\.csv: unsupported data file type"):
        read_rlvr_records(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="on_malformed must be one of"):
        read_rlvr_records(GSM8K_SAMPLE, on_malformed="ignore")


def test_record_validated_directly():
    record = RLVRRecord.from_dict(GOOD, "here")
    assert record.to_dict() == GOOD
    with pytest.raises(MalformedRecordError, match="here: expected a JSON object, got list"):
        RLVRRecord.from_dict([GOOD], "here")
