"""Preference data: open-instruct records -> token pairs -> packed micro-batches that keep each pair together.

A record is `{"chosen": [messages...], "rejected": [messages...]}` (JSONL), the two lists sharing every message but
the last, which is the assistant's response in each. The prompt is rendered with the chat template as in SFT
(ending with the generation prompt); each response is followed by the EOS token, and only response tokens count in
the loss.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import torch

from megatron_rlvr.models.forward import MicroBatch

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenPair:
    """A tokenized preference pair: the shared prompt and the two responses (each ending with EOS)."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


def _check_record(record, where: str) -> tuple[list, dict, dict]:
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise ValueError(f"{where}: a preference record needs 'chosen' and 'rejected' message lists")
    chosen, rejected = record["chosen"], record["rejected"]
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(messages, list) or len(messages) < 2 or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError(f"{where}: '{name}' must be a list of at least two {{role, content}} messages")
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last message of '{name}' must be the assistant's response")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError(f"{where}: 'chosen' and 'rejected' must share the prompt (every message but the last)")
    return chosen[:-1], chosen[-1], rejected[-1]


def load_pairs(files: list[str], tokenizer, template: str | None, max_length: int) -> list[TokenPair]:
    """Token pairs of the records in `files`; a malformed record is a ValueError naming its file and line, pairs
    whose longer sequence exceeds `max_length` tokens are dropped (and logged)."""
    from megatron_rlvr.data import render_prompt

    pairs, dropped = [], 0
    eos = [tokenizer.eos_token_id]
    for path in files:
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:line {lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: not JSON ({err})") from None
                prompt_messages, chosen, rejected = _check_record(record, where)
                prompt = tokenizer(render_prompt(prompt_messages, tokenizer, template),
                                   add_special_tokens=False)["input_ids"]
                chosen_ids = tokenizer(chosen["content"], add_special_tokens=False)["input_ids"] + eos
                rejected_ids = tokenizer(rejected["content"], add_special_tokens=False)["input_ids"] + eos
                if len(prompt) + max(len(chosen_ids), len(rejected_ids)) > max_length:
                    dropped += 1
                    continue
                pairs.append(TokenPair(tuple(prompt), tuple(chosen_ids), tuple(rejected_ids)))
    if dropped:
        logger.warning("dropped %d preference pairs longer than data.max_length=%d tokens", dropped, max_length)
    if not pairs:
        raise ValueError(f"no preference pair of at most {max_length} tokens in {files}: raise data.max_length or "
                         "check the files")
    return pairs


def pair_micro_batches(pairs: list[TokenPair], pairs_per_micro_batch: int, reference: torch.Tensor | None = None,
                       device=None) -> list[MicroBatch]:
    """Micro-batches of `pairs_per_micro_batch` pairs, each one packed row `[1, T]` holding prompt+chosen,
    prompt+rejected, prompt+chosen, ... (so a pair's two sequences are never split), with fields aligned with the
    padded log-prob frame `[2b, max_len - 1]`: `mask` (1 on response tokens) and, when `reference` `[P, 2]` is
    given (chosen, rejected sequence log-probs), `reference` `[2b]` in the same row order."""
    out = []
    for start in range(0, len(pairs), pairs_per_micro_batch):
        chunk = pairs[start:start + pairs_per_micro_batch]
        rows = [(p.prompt, response) for p in chunk for response in (p.chosen, p.rejected)]
        lengths = torch.tensor([len(prompt) + len(response) for prompt, response in rows])
        tokens = torch.tensor([t for prompt, response in rows for t in prompt + response]).unsqueeze(0)
        mask = torch.zeros(len(rows), int(lengths.max()) - 1)
        for row, (prompt, response) in enumerate(rows):
            mask[row, len(prompt) - 1: len(prompt) - 1 + len(response)] = 1.0
        fields = {"mask": mask.to(device)}
        if reference is not None:
            fields["reference"] = reference[start:start + len(chunk)].reshape(-1).to(device)
        out.append(MicroBatch(tokens.to(device), fields, lengths))
    return out
