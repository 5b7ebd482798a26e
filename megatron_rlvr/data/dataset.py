"""Tokenized RLVR prompts, with prompts longer than the rollout budget dropped (and counted) up front."""

import logging
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from .records import PathLike, RLVRRecord, read_rlvr_records
from .templates import render_prompt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """A rendered, tokenized prompt and the record it came from (ground truth, verifier name, source)."""

    prompt_ids: Tuple[int, ...]
    text: str
    record: RLVRRecord


class RLVRPromptDataset(Sequence[Prompt]):
    """Prompts of `records` rendered with `chat_template` (see `render_prompt`) and tokenized; those longer than
    `max_prompt_length` tokens are dropped, and `num_dropped` says how many."""

    def __init__(self, records: Sequence[RLVRRecord], tokenizer, *, max_prompt_length: int,
                 chat_template: Optional[str] = None):
        origin = ", ".join(sorted({r.source.rsplit(":line ", 1)[0].rsplit(" row ", 1)[0] for r in records})) or "?"
        texts = [render_prompt(r.messages, tokenizer, chat_template) for r in records]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        self.prompts: List[Prompt] = [
            Prompt(tuple(i), text, r) for i, text, r in zip(ids, texts, records) if len(i) <= max_prompt_length
        ]
        self.num_dropped = len(records) - len(self.prompts)
        if self.num_dropped:
            logger.warning("dropped %d of %d prompts longer than max_prompt_length=%d tokens (%s)",
                           self.num_dropped, len(records), max_prompt_length, origin)
        if not records:
            raise ValueError("no records to build prompts from: check data.train_files / data.eval_files")
        if not self.prompts:
            raise ValueError(
                f"no prompt is left: all {len(records)} are longer than max_prompt_length={max_prompt_length} "
                f"tokens ({origin}); raise data.max_prompt_length"
            )

    @classmethod
    def from_files(cls, paths: Union[PathLike, Iterable[PathLike]], tokenizer, *, max_prompt_length: int,
                   chat_template: Optional[str] = None, on_malformed: str = "fail") -> "RLVRPromptDataset":
        records = read_rlvr_records(paths, on_malformed)
        return cls(records, tokenizer, max_prompt_length=max_prompt_length, chat_template=chat_template)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> Prompt:
        return self.prompts[index]
