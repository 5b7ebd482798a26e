"""Padding and batch collation for rollouts (prompts in) and training (prompt + response sequences)."""

from typing import Dict, Optional, Sequence

import torch

from .dataset import Prompt

PAD_SIDES = ("left", "right")


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right",
                  length: Optional[int] = None) -> "tuple[torch.Tensor, torch.Tensor]":
    """Token id lists -> (ids [B, L] int64, mask [B, L] int64, 1 on real tokens), padded on `side` to `length`
    (default: the longest sequence)."""
    if side not in PAD_SIDES:
        raise ValueError(f"pad side must be one of {PAD_SIDES}, got {side!r}")
    longest = max((len(s) for s in seqs), default=0)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a sequence of {longest} tokens does not fit the padded length {length}")
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def collate_prompts(prompts: Sequence[Prompt], pad_id: int) -> Dict[str, object]:
    """A rollout batch: the token id lists (what vLLM takes), the same left-padded (for an HF / megatron-core
    generator, so every prompt ends at the last column), and the verifier inputs of each prompt."""
    input_ids, attention_mask = pad_sequences([p.prompt_ids for p in prompts], pad_id, side="left")
    return {
        "prompt_ids": [list(p.prompt_ids) for p in prompts],
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "ground_truths": [p.record.ground_truth for p in prompts],
        "datasets": [p.record.dataset for p in prompts],
        "sources": [p.record.source for p in prompts],
    }


def build_training_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int,
                         max_response_length: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """One row per (prompt, response) pair: `[left-padded prompt | right-padded response]`.

    Returns `input_ids`, `attention_mask`, `position_ids` (count of real tokens before each one, so left
    padding does not shift positions), all `[B, P + R]`; `responses` and `response_mask` `[B, R]`. The
    log-prob of `responses[:, j]` is read from the logits at column `P - 1 + j` (`P = input_ids.shape[1] - R`).
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses; pass one prompt per response")
    prompts, prompt_mask = pad_sequences(prompt_ids, pad_id, side="left")
    responses, response_mask = pad_sequences(response_ids, pad_id, side="right", length=max_response_length)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    return {
        "input_ids": torch.cat([prompts, responses], dim=1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0),
        "responses": responses,
        "response_mask": response_mask,
    }
