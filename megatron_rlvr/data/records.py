"""open-instruct RLVR records from JSONL or Parquet, with malformed records reported by file and line/row.

A record is `{"messages": [{"role", "content"}, ...], "ground_truth": str, "dataset": str}`: the messages are
the prompt, `dataset` names the verifier that scores a response against `ground_truth`.
"""

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Tuple, TypeVar, Union

logger = logging.getLogger(__name__)

ON_MALFORMED = ("fail", "skip")
PathLike = Union[str, os.PathLike]
T = TypeVar("T")


class MalformedRecordError(ValueError):
    """A record that cannot be used; `where` is `FILE:line N` (JSONL, 1-based) or `FILE row N` (Parquet, 0-based)."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


@dataclass(frozen=True)
class RLVRRecord:
    messages: Tuple[Dict[str, str], ...]
    ground_truth: str
    dataset: str
    source: str = ""
    """Where the record came from (`FILE:line N`), carried along so later failures can name it."""

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> "RLVRRecord":
        """Validate one decoded record; raises MalformedRecordError naming `where` and the faulty field."""
        if not isinstance(obj, dict):
            raise MalformedRecordError(where, f"expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in ("messages", "ground_truth", "dataset") if k not in obj]
        if missing:
            raise MalformedRecordError(where, f"missing field(s) {', '.join(missing)} (have: {', '.join(obj)})")
        messages = obj["messages"]
        if not isinstance(messages, (list, tuple)) or not messages:
            raise MalformedRecordError(where, "'messages' must be a non-empty list of {role, content} objects")
        for i, message in enumerate(messages):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise MalformedRecordError(
                    where, f"messages[{i}] must be an object with string 'role' and 'content', got {message!r:.80}"
                )
        ground_truth = obj["ground_truth"]
        if isinstance(ground_truth, (list, dict)):
            # A structured ground truth written as JSON rather than as a string (open-instruct's IFEval
            # instruction lists, func_name objects): kept as its JSON text, which the verifiers decode.
            ground_truth = json.dumps(ground_truth, ensure_ascii=False)
        if not isinstance(ground_truth, str):
            raise MalformedRecordError(
                where, f"'ground_truth' must be a string (or a JSON list/object), got {type(ground_truth).__name__}"
            )
        if not isinstance(obj["dataset"], str) or not obj["dataset"]:
            raise MalformedRecordError(where, f"'dataset' must be a non-empty verifier name, got {obj['dataset']!r}")
        return cls(
            messages=tuple({"role": m["role"], "content": m["content"]} for m in messages),
            ground_truth=ground_truth,
            dataset=obj["dataset"],
            source=where,
        )

    def to_dict(self) -> Dict[str, Any]:
        return {"messages": list(self.messages), "ground_truth": self.ground_truth, "dataset": self.dataset}


def _iter_jsonl(path: str) -> Iterator[Tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:line {lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, MalformedRecordError(where, f"invalid JSON ({e.msg} at column {e.colno})")


def _iter_parquet(path: str) -> Iterator[Tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            f"reading the Parquet file {path} needs pyarrow, which is not installed: pip install pyarrow "
            "(or convert the file to JSONL)"
        ) from e
    row = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for obj in batch.to_pylist():
            yield f"{path} row {row}", obj
            row += 1


def iter_raw_records(path: PathLike) -> Iterator[Tuple[str, Any]]:
    """(where, decoded object) per record of a `.jsonl` or `.parquet` file; undecodable lines come as the error."""
    path = os.fspath(path)
    if path.endswith(".jsonl"):
        return _iter_jsonl(path)
    if path.endswith(".parquet"):
        return _iter_parquet(path)
    raise ValueError(f"{path}: unsupported data file type; use .jsonl (one JSON object per line) or .parquet")


def load_records(
    paths: Union[PathLike, Iterable[PathLike]], parse: Callable[[Any, str], T], on_malformed: str = "fail"
) -> List[T]:
    """Parse every record of `paths` with `parse(obj, where)`; a MalformedRecordError raises (`fail`) or is
    logged with its location and dropped (`skip`)."""
    if on_malformed not in ON_MALFORMED:
        raise ValueError(f"on_malformed must be one of {ON_MALFORMED}, got {on_malformed!r}")
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    records: List[T] = []
    skipped = 0
    for path in paths:
        seen = 0
        for where, obj in iter_raw_records(path):
            seen += 1
            try:
                if isinstance(obj, MalformedRecordError):
                    raise obj
                records.append(parse(obj, where))
            except MalformedRecordError as e:
                if on_malformed == "fail":
                    raise
                skipped += 1
                logger.warning("skipping malformed record %s", e)
        if not seen:
            raise ValueError(f"{os.fspath(path)}: the data file holds no records (it is empty); fill it or drop it "
                             "from the config")
    if skipped:
        logger.warning("skipped %d malformed record(s); %d loaded", skipped, len(records))
        if not records:
            raise ValueError(f"every record of {', '.join(map(os.fspath, paths))} is malformed ({skipped} skipped, "
                             "see the warnings above): nothing to train on")
    return records


def read_rlvr_records(paths: Union[PathLike, Iterable[PathLike]], on_malformed: str = "fail") -> List[RLVRRecord]:
    """All RLVR records of one or more JSONL/Parquet files, in file order; a record whose `dataset` has no
    verifier in the registry is malformed (found here, not at the step that first samples it)."""
    return load_records(paths, _scorable_record, on_malformed)


def _scorable_record(obj: Any, where: str) -> RLVRRecord:
    from megatron_rlvr.rewards.registry import get_verifier

    record = RLVRRecord.from_dict(obj, where)
    try:
        get_verifier(record.dataset)
    except ValueError as err:
        raise MalformedRecordError(where, str(err)) from None
    return record


def write_jsonl(records: Iterable[RLVRRecord], path: PathLike) -> int:
    """Write records as open-instruct JSONL; returns the count."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
            count += 1
    return count
