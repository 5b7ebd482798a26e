"""Megatron shards -> the parameters of one vLLM tensor-parallel rank, in place: one strided copy per region.

The colocated layout keeps the trainer's megatron model and a vLLM shard on the same device. The reload path goes
megatron -> HF tensors (the QKV reorder is a copy) -> vLLM's loader (another copy into the fused tensors), more than
one pass over the bytes. Here the copy is planned straight from megatron's layout into vLLM's, as a list of
`Region`s, each ONE `copy_` between two `as_strided` windows: every element of vLLM's parameters is written once,
nothing is staged. A region whose source lies on several training TP shards is cut at the shard boundary.

vLLM's layout on rollout TP rank j of R (unquantized Llama: the weight loaders of vLLM's `QKVParallelLinear`,
`MergedColumnParallelLinear`, `RowParallelLinear` and `VocabParallelEmbedding`), with H query heads, G KV heads,
head dim d, hidden h, MLP size F, vocab V:

- `qkv_proj` `[(H/R + 2 K) d, h]` = [q heads jH/R .. (j+1)H/R ; k ; v] with K = max(1, G/R) KV heads: heads
  jG/R .. (j+1)G/R when R <= G, else head j // (R/G) (each KV head replicated on R/G ranks).
- `gate_up_proj` `[2F/R, h]` = [gate rows jF/R .. (j+1)F/R ; up rows jF/R .. (j+1)F/R].
- `o_proj` `[h, Hd/R]`, `down_proj` `[h, F/R]`: column slice j.
- `embed_tokens`, `lm_head` `[P/R, h]` with P = V rounded up to a multiple of 64: rows jP/R .. (j+1)P/R of the
  padded vocab, rows >= V zero (a tied `lm_head` is the embedding's parameter itself).
- norms: whole on every rank.

Megatron's side (`models.hf_mapping`), training TP rank r of T: query groups rG/T .. (r+1)G/T, each group
`[q heads of g | k_g | v_g]`; `linear_fc1` = [gate_r ; up_r]; row-parallel weights split on dim 1; vocab rows
split after padding to the trainer's padded vocab.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import torch

from megatron_rlvr.models.llama import LlamaArch

VOCAB_PADDING = 64
"""vLLM's `DEFAULT_VOCAB_PADDING_SIZE`: its vocab tables are padded to a multiple of this before TP sharding"""

_EMBED, _OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"
_FINAL_NORM = "decoder.final_layernorm.weight"


@dataclasses.dataclass(frozen=True)
class Strided:
    """A window of a contiguous tensor, in elements: `tensor.as_strided(size, stride, offset)`."""

    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.size)

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.as_strided(self.size, self.stride, tensor.storage_offset() + self.offset)


def _rows(first: int, count: int, width: int) -> Strided:
    return Strided(first * width, (count, width), (width, 1))


@dataclasses.dataclass(frozen=True)
class Region:
    """One copy: `dst_view` of vLLM parameter `dst` <- `src_view` of megatron parameter `src`'s shard."""

    dst: str
    dst_view: Strided
    src: str | None
    """megatron global parameter name; None: the region is zero-filled (vLLM's vocab padding rows)"""
    src_rank: int | None
    """training TP rank whose shard holds the source; None: every rank holds the whole tensor (norms)"""
    src_view: Strided | None


def _split(lo: int, hi: int, part: int) -> list[tuple[int, int, int]]:
    """[lo, hi) cut where a partition into blocks of `part` cuts it: (block index, start, stop), global units."""
    pieces = []
    while lo < hi:
        block = lo // part
        stop = min(hi, (block + 1) * part)
        pieces.append((block, lo, stop))
        lo = stop
    return pieces


def vllm_vocab_rows(arch: LlamaArch, rollout_tp: int) -> int:
    """Rows of vLLM's vocab tables on each rollout rank (vocab padded to a multiple of 64, then split)."""
    return -(-arch.vocab_size // VOCAB_PADDING) * VOCAB_PADDING // rollout_tp


def _check_sizes(arch: LlamaArch, train_tp: int, train_vocab: int, rollout_tp: int, rollout_rank: int) -> None:
    """Refuse sizes that neither vLLM nor megatron can shard, naming the field."""
    g, r = arch.num_kv_heads, rollout_tp
    if not 0 <= rollout_rank < r:
        raise ValueError(f"rollout rank {rollout_rank} is outside rollout TP {r}")
    padded = -(-arch.vocab_size // VOCAB_PADDING) * VOCAB_PADDING
    for what, value, tp in (("num_attention_heads", arch.num_heads, r), ("intermediate_size", arch.ffn_hidden_size, r),
                            ("vLLM's padded vocab", padded, r), ("num_key_value_heads", g, train_tp),
                            ("intermediate_size", arch.ffn_hidden_size, train_tp),
                            ("the trainer's padded vocab", train_vocab, train_tp)):
        if value % tp:
            raise ValueError(f"{what}={value} is not divisible by tensor parallel size {tp}")
    if g % r and r % g:
        raise ValueError(f"rollout TP {r} and num_key_value_heads={g}: one must divide the other (vLLM replicates "
                         "KV heads only in whole multiples)")
    if train_vocab < arch.vocab_size:
        raise ValueError(f"the trainer's padded vocab {train_vocab} is smaller than vocab_size={arch.vocab_size}")


def vllm_parameter_shapes(arch: LlamaArch, rollout_tp: int) -> dict[str, tuple[int, ...]]:
    """vLLM's parameter names and shapes on every rank of a rollout TP group (`named_parameters` order)."""
    h, d, r = arch.hidden_size, arch.head_dim, rollout_tp
    kv = max(1, arch.num_kv_heads // r)
    vocab = (vllm_vocab_rows(arch, r), h)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": vocab}
    for layer in range(arch.num_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.qkv_proj.weight": ((arch.num_heads // r + 2 * kv) * d, h),
            p + "self_attn.o_proj.weight": (h, arch.num_heads * d // r),
            p + "mlp.gate_up_proj.weight": (2 * arch.ffn_hidden_size // r, h),
            p + "mlp.down_proj.weight": (h, arch.ffn_hidden_size // r),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = vocab
    return shapes


def _qkv(dst: str, src: str, arch: LlamaArch, t: int, r: int, j: int) -> list[Region]:
    h, d = arch.hidden_size, arch.head_dim
    heads, groups = arch.num_heads, arch.num_kv_heads
    per_group = heads // groups  # query heads per KV group
    group_rows = (per_group + 2) * d  # one group's rows in megatron's fused tensor: [q heads | k | v]
    groups_per_shard = groups // t
    q_heads = heads // r
    kv_lo = j // (r // groups) if r >= groups else j * groups // r
    kv_hi = kv_lo + max(1, groups // r)
    regions = []
    # vLLM's query heads are either whole groups (R <= G) or part of one group (R > G), so each piece taken
    # from one megatron shard is a single [groups, rows, h] window of it
    for shard, a, b in _split(j * q_heads, (j + 1) * q_heads, heads // t):
        count, rows = ((b - a) // per_group, per_group * d) if b - a >= per_group else (1, (b - a) * d)
        first = (a // per_group - shard * groups_per_shard) * group_rows + (a % per_group) * d
        regions.append(Region(dst, Strided((a - j * q_heads) * d * h, (count, rows, h), (rows * h, h, 1)),
                              src, shard, Strided(first * h, (count, rows, h), (group_rows * h, h, 1))))
    for dst_row, row_in_group in ((q_heads * d, per_group * d), ((q_heads + kv_hi - kv_lo) * d, (per_group + 1) * d)):
        for shard, a, b in _split(kv_lo, kv_hi, groups_per_shard):
            first = (a - shard * groups_per_shard) * group_rows + row_in_group
            regions.append(Region(dst, Strided((dst_row + (a - kv_lo) * d) * h, (b - a, d, h), (d * h, h, 1)),
                                  src, shard, Strided(first * h, (b - a, d, h), (group_rows * h, h, 1))))
    return regions


def _gate_up(dst: str, src: str, arch: LlamaArch, t: int, r: int, j: int) -> list[Region]:
    h, f = arch.hidden_size, arch.ffn_hidden_size
    mine, theirs = f // r, f // t
    return [
        Region(dst, _rows(half * mine + a - j * mine, b - a, h), src, shard,
               _rows(half * theirs + a - shard * theirs, b - a, h))
        for half in (0, 1)  # gate, then up, on both sides
        for shard, a, b in _split(j * mine, (j + 1) * mine, theirs)
    ]


def _columns(dst: str, src: str, arch: LlamaArch, columns: int, t: int, r: int, j: int) -> list[Region]:
    h, mine, theirs = arch.hidden_size, columns // r, columns // t
    return [
        Region(dst, Strided(a - j * mine, (h, b - a), (mine, 1)), src, shard,
               Strided(a - shard * theirs, (h, b - a), (theirs, 1)))
        for shard, a, b in _split(j * mine, (j + 1) * mine, theirs)
    ]


def _vocab(dst: str, src: str, arch: LlamaArch, train_vocab: int, t: int, r: int, j: int) -> list[Region]:
    h, rows = arch.hidden_size, vllm_vocab_rows(arch, r)
    lo = j * rows
    hi = max(lo, min(lo + rows, arch.vocab_size))
    regions = [
        Region(dst, _rows(a - lo, b - a, h), src, shard, _rows(a - shard * (train_vocab // t), b - a, h))
        for shard, a, b in _split(lo, hi, train_vocab // t)
    ]
    if hi - lo < rows:  # vLLM keeps its padding rows zero (its loader fills them); the plan does the same
        regions.append(Region(dst, _rows(hi - lo, rows - (hi - lo), h), None, None, None))
    return regions


def plan_inplace(arch: LlamaArch, *, train_tp: int, train_vocab: int, rollout_tp: int,
                 rollout_rank: int) -> list[Region]:
    """The regions that fill rollout rank `rollout_rank`'s vLLM parameters from megatron TP shards.

    `train_vocab` is the trainer's padded vocab (its vocab tables have `train_vocab / train_tp` rows per shard).
    Regions come in vLLM's parameter order; together they cover every element of every parameter once.
    """
    _check_sizes(arch, train_tp, train_vocab, rollout_tp, rollout_rank)
    t, r, j = train_tp, rollout_tp, rollout_rank
    h = arch.hidden_size

    def whole(dst: str, src: str) -> Region:
        return Region(dst, Strided(0, (h,), (1,)), src, None, Strided(0, (h,), (1,)))

    regions = _vocab("model.embed_tokens.weight", _EMBED, arch, train_vocab, t, r, j)
    for layer in range(arch.num_layers):
        dst, src = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        regions += _qkv(dst + "self_attn.qkv_proj.weight", src + "self_attention.linear_qkv.weight", arch, t, r, j)
        regions += _columns(dst + "self_attn.o_proj.weight", src + "self_attention.linear_proj.weight", arch,
                            arch.num_heads * arch.head_dim, t, r, j)
        regions += _gate_up(dst + "mlp.gate_up_proj.weight", src + "mlp.linear_fc1.weight", arch, t, r, j)
        regions += _columns(dst + "mlp.down_proj.weight", src + "mlp.linear_fc2.weight", arch,
                            arch.ffn_hidden_size, t, r, j)
        regions.append(whole(dst + "input_layernorm.weight", src + "input_layernorm.weight"))
        regions.append(whole(dst + "post_attention_layernorm.weight", src + "pre_mlp_layernorm.weight"))
    regions.append(whole("model.norm.weight", _FINAL_NORM))
    if not arch.tie_word_embeddings:
        regions += _vocab("lm_head.weight", _OUTPUT, arch, train_vocab, t, r, j)
    return regions


def source_ranks(regions: list[Region]) -> set[int]:
    """Training TP ranks whose shards the regions read (replicated tensors need none in particular)."""
    return {region.src_rank for region in regions if region.src_rank is not None}


def check_destinations(expected: Mapping[str, tuple[int, ...]], params: Mapping[str, torch.Tensor]) -> str | None:
    """Why vLLM's parameters cannot take the in-place copy (None when they can): every expected parameter present,
    a plain contiguous floating-point tensor of the expected shape, and no others."""
    problems = []
    missing = [name for name in expected if name not in params]
    extra = [name for name in params if name not in expected]
    if missing:
        problems.append(f"vLLM has no parameter(s) {missing[:3]}")
    if extra:
        problems.append(f"vLLM has unexpected parameter(s) {extra[:3]} (quantized or another architecture?)")
    for name, shape in expected.items():
        param = params.get(name)
        if param is None:
            continue
        if param.numel() == 0:
            problems.append(f"{name} is empty (vLLM's CPU backend packed it into its own GEMM format)")
        elif tuple(param.shape) != shape:
            problems.append(f"{name} has shape {list(param.shape)}, expected {list(shape)}")
        elif not param.dtype.is_floating_point or param.element_size() < 2:
            problems.append(f"{name} is {param.dtype} (quantized); the in-place copy writes unquantized weights")
        elif not param.is_contiguous():
            problems.append(f"{name} is not contiguous")
        if len(problems) >= 3:
            break
    return "; ".join(problems) or None


Pair = tuple[torch.Tensor, torch.Tensor | None]
Destinations = Mapping[str, torch.Tensor]
Shards = Mapping[str, Mapping[int, torch.Tensor]]


def _as_words(dst: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same bytes as 8-byte words when both sides have one dtype: a strided copy runs element by element
    (an index computation each), so bf16 moved as int64 takes a quarter of the steps; bit-exact (no arithmetic)."""
    if src.dtype != dst.dtype or dst.element_size() >= 8:
        return dst, src
    try:
        return dst.view(torch.int64), src.view(torch.int64)
    except RuntimeError:  # a row or offset not a whole number of words: element copy
        return dst, src


def bind(regions: list[Region], destinations: Destinations, shards: Shards) -> list[Pair]:
    """(destination view, source view or None for a zero fill) for every region.

    `shards[name][rank]` is training TP rank `rank`'s shard of megatron parameter `name` (contiguous); only the
    ranks the regions read need to be present."""
    pairs = []
    for region in regions:
        dst = region.dst_view.of(destinations[region.dst].detach())
        if region.src is None:
            pairs.append((dst, None))
            continue
        held = shards[region.src]
        if region.src_rank is None:
            tensor = next(iter(held.values()))
        elif region.src_rank in held:
            tensor = held[region.src_rank]
        else:
            raise KeyError(f"in-place sync: {region.src} of training TP rank {region.src_rank} is needed for "
                           f"{region.dst} but only rank(s) {sorted(held)} were given")
        if not tensor.is_contiguous():
            raise ValueError(f"in-place sync: megatron parameter {region.src} is not contiguous")
        pairs.append(_as_words(dst, region.src_view.of(tensor.detach())))
    return pairs


@torch.no_grad()
def copy_pairs(pairs: list[Pair]) -> None:
    for dst, src in pairs:
        if src is None:
            dst.zero_()
        else:
            dst.copy_(src)


def _identity(destinations: Destinations, shards: Shards) -> tuple:
    return tuple((t.data_ptr(), t.shape) for t in destinations.values()) + tuple(
        (t.data_ptr(), t.shape) for held in shards.values() for t in held.values())


class InplaceCopy:
    """A plan bound to tensors; calling it runs the copies.

    The views bound at the previous call are copied first; the tensors are looked up only afterwards, while a
    GPU works through the copies (finding megatron's and vLLM's parameters by name costs milliseconds of CPU,
    a fifth of the copies themselves at 8B). Only if a tensor moved since (a parameter re-allocated) are the
    views re-bound and the copies run again; the first round then went to storage nobody reads any more,
    kept alive by the old views."""

    def __init__(self, regions: list[Region]):
        self.regions = regions
        self._identity: tuple | None = None
        self._pairs: list[Pair] = []

    def __call__(self, destinations: Callable[[], Destinations], shards: Callable[[], Shards]) -> None:
        """`destinations()`: vLLM's parameters by name; `shards()`: megatron shards by name and training TP rank."""
        copy_pairs(self._pairs)
        dst, src = destinations(), shards()
        identity = _identity(dst, src)
        if identity != self._identity:
            self._pairs = bind(self.regions, dst, src)
            self._identity = identity
            copy_pairs(self._pairs)

    def nbytes(self, destinations: Destinations) -> int:
        """Bytes the copies write (zero fills included)."""
        return sum(r.dst_view.numel * destinations[r.dst].element_size() for r in self.regions)
