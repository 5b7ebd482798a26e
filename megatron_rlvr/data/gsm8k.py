"""Convert raw GSM8K (`{"question", "answer"}` with the final answer after `####`) to RLVR records."""

import re
from typing import Any, Iterable, List, Union

from .records import MalformedRecordError, PathLike, RLVRRecord, load_records

_FINAL_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def gsm8k_to_rlvr(example: Any, where: str = "", instruction: str = "") -> RLVRRecord:
    """One GSM8K example as an RLVR record: the question (plus `instruction` after a blank line, if given) is the
    user message, the number after `####` (thousands separators removed) the ground truth, `dataset="gsm8k"`."""
    if not isinstance(example, dict) or not isinstance(example.get("question"), str) \
            or not isinstance(example.get("answer"), str):
        raise MalformedRecordError(where, "a GSM8K record needs string fields 'question' and 'answer'")
    match = _FINAL_ANSWER.search(example["answer"])
    if match is None:
        raise MalformedRecordError(where, "GSM8K 'answer' has no final answer after '####'")
    content = example["question"] + (f"\n\n{instruction}" if instruction else "")
    return RLVRRecord(
        messages=({"role": "user", "content": content},),
        ground_truth=match.group(1).replace(",", ""),
        dataset="gsm8k",
        source=where,
    )


def read_gsm8k(
    paths: Union[PathLike, Iterable[PathLike]], instruction: str = "", on_malformed: str = "fail"
) -> List[RLVRRecord]:
    """All examples of raw GSM8K JSONL/Parquet files converted to RLVR records."""
    return load_records(paths, lambda obj, where: gsm8k_to_rlvr(obj, where, instruction), on_malformed)


if __name__ == "__main__":
    import argparse

    from .records import write_jsonl

    parser = argparse.ArgumentParser(description="Convert raw GSM8K JSONL/Parquet to open-instruct RLVR JSONL.")
    parser.add_argument("src", nargs="+", help="GSM8K files with 'question' and 'answer' fields")
    parser.add_argument("dst", help="output .jsonl")
    parser.add_argument("--instruction", default="", help="text appended to every question after a blank line")
    parser.add_argument("--on-malformed", choices=("fail", "skip"), default="fail")
    args = parser.parse_args()
    n = write_jsonl(read_gsm8k(args.src, args.instruction, args.on_malformed), args.dst)
    print(f"wrote {n} records to {args.dst}")
