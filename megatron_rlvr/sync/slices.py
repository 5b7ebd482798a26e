"""Per-slice routing: which part of each HF tensor a megatron TP shard holds, and full-shape HF tensors built
from only the shards a rollout rank received.

Megatron and vLLM cut every TP-sharded HF tensor into equal parts along the same dim: q/k/v by whole query
groups and gate/up per half along the rows, o_proj/down_proj along the input dim (columns), the vocab tables
along the rows. So training TP shard i of t holds [i/t, (i+1)/t) of each such tensor along its dim, and vLLM
TP rank j of r reads [j/r, (j+1)/r) of it (`parallel.layout.slices_overlap` decides who needs what). A rollout
rank receives only the shards overlapping its slice and hands vLLM full-shape tensors in which only those
regions are valid: vLLM's weight loaders narrow each full tensor to the rank's slice and read nothing else.

Routes: the TP-sharded tensors travel to the overlapping ranks ("slice"); the norms, replicated on every TP
rank, travel with them (each rollout rank takes the copy of the first sender it hears from). The vocab tables
go to every rollout rank ("full"): vLLM pads the vocab per TP rank its own way, so its row slices need not line
up with megatron's, and sending them whole stays correct whatever the padding.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_rlvr.models import hf_mapping
from megatron_rlvr.models.llama import LlamaArch

ROUTES = ("slice", "full")
"""in send order: each sender's broadcasts are its "slice" buckets, then its "full" buckets"""

VOCAB_TABLES = ("embedding.word_embeddings.weight", "output_layer.weight")

# HF module -> the dim its weight is TP-sharded along (both in megatron and in vLLM); modules not listed
# (the norms) are replicated on every TP rank
_SPLIT_DIM = {
    "q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0, "embed_tokens": 0, "lm_head": 0,
    "o_proj": 1, "down_proj": 1,
}


def route(name: str) -> str:
    """"full" for the vocab tables (every rollout rank gets them whole), "slice" for every other megatron tensor."""
    return "full" if name in VOCAB_TABLES else "slice"


def split_dim(hf_name: str) -> int | None:
    """The dim HF tensor `hf_name` is TP-sharded along; None for a tensor every TP rank holds whole."""
    return _SPLIT_DIM.get(hf_name.split(".")[-2])


def is_tp_sharded(name: str) -> bool:
    """Whether megatron parameter `name` is cut over the TP ranks (False: replicated, the norms)."""
    return any(split_dim(hf) is not None for hf in hf_mapping.hf_sources(name))


def shard_to_hf(name: str, shard: torch.Tensor, arch: LlamaArch, tp: int) -> dict[str, torch.Tensor]:
    """The HF pieces of one TP shard of megatron parameter `name`: piece h is the shard's [i/tp, (i+1)/tp) part
    of HF tensor h along `split_dim(h)` (the whole tensor if replicated).

    A QKV shard is a whole number of query groups laid out like the full tensor of a model with 1/tp of the
    heads, and an fc1 shard is [gate_i; up_i], so `hf_mapping.mcore_full_to_hf` splits a shard as it splits the
    full tensor; the vocab rows are kept as they are (megatron's padding rows sit at the end of the last shards).
    """
    part = dataclasses.replace(arch, num_heads=arch.num_heads // tp, num_kv_heads=arch.num_kv_heads // tp,
                               vocab_size=max(arch.vocab_size, shard.shape[0]))
    return hf_mapping.mcore_full_to_hf(name, shard, part)


def assembled_numel(name: str, shard_numel: int, tp: int) -> int:
    """Elements `assemble` may use for megatron parameter `name` (an upper bound: vocab padding included)."""
    return shard_numel * tp if tp > 1 and is_tp_sharded(name) else 0


def assemble(
    name: str, shards: dict[int, torch.Tensor], arch: LlamaArch, tp: int, buffer: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Full-shape HF tensors of megatron parameter `name` from the TP shards received, keyed by TP rank.

    Each received shard is copied into its region ([i/tp, (i+1)/tp) along the split dim, clipped at the real
    vocab size); the other regions of the result hold whatever `buffer` held and must not be read. A replicated
    parameter, or a training TP of 1, needs no assembly: the first shard is converted as the full tensor it is.
    `buffer` is a flat tensor of at least `assembled_numel` elements; the results are views into it.
    """
    if tp == 1 or not is_tp_sharded(name):
        return hf_mapping.mcore_full_to_hf(name, shards[min(shards)], arch)
    pieces = {i: shard_to_hf(name, shard, arch, tp) for i, shard in sorted(shards.items())}
    first = next(iter(pieces.values()))
    out = {}
    offset = 0
    for hf_name, like in first.items():
        dim = split_dim(hf_name)
        length = like.shape[dim]
        shape = list(like.shape)
        shape[dim] = arch.vocab_size if dim == 0 and name in VOCAB_TABLES else length * tp
        numel = shape[0] * shape[1]
        full = buffer[offset : offset + numel].view(shape)
        offset += numel
        for i, piece in pieces.items():
            valid = min(length, shape[dim] - i * length)  # the vocab's padding rows are dropped
            if valid > 0:
                full.narrow(dim, i * length, valid).copy_(piece[hf_name].narrow(dim, 0, valid))
        out[hf_name] = full
    return out
