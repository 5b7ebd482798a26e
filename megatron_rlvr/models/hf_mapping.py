"""HuggingFace Llama <-> megatron-core GPTModel parameter names and layouts.

Three views of one weight:
- HF: `model.layers.{L}.self_attn.q_proj.weight`, ... (separate q/k/v, gate/up).
- megatron *full*: the TP=1 megatron tensor, e.g. `decoder.layers.{L}.self_attention.linear_qkv.weight` with the
  per-query-group interleave `[q heads of g | k_g | v_g]` for g = 0..G-1, and `linear_fc1 = [gate ; up]`.
- megatron *shard*: TP rank r's slice. QKV: rank r holds whole query groups, so shards concatenate along dim 0
  into the full tensor. `linear_fc1` on rank r is `[gate_r ; up_r]`, so shards must NOT be concatenated naively.
  Row-parallel weights (`linear_proj`, `linear_fc2`) split along dim 1; vocab tables along dim 0 (after padding
  the vocab to the padded size; padded rows are zero and stripped on export).

Layer indices here are global; `stage_layers` gives a pipeline stage's range (even, or the uneven split of
`models.stages.PipelineSplit`) and `local_name` the name inside that stage's model.
"""

from __future__ import annotations

import re

import torch

from megatron_rlvr.models.llama import LlamaArch
from megatron_rlvr.models.stages import PipelineSplit

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# megatron per-layer suffix -> HF per-layer suffixes (fused weights map to several)
_LAYER_MAP = {
    "input_layernorm.weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
}
_GLOBAL_MAP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight")
_COLUMN = ("self_attention.linear_qkv.weight", "mlp.linear_fc1.weight")  # split on dim 0 (fc1 per half)
_ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")  # split on dim 1


def mcore_names(arch: LlamaArch) -> list[str]:
    """All megatron full parameter names of the model (global layer indices)."""
    names = ["embedding.word_embeddings.weight"]
    for layer in range(arch.num_layers):
        names += [f"decoder.layers.{layer}.{suffix}" for suffix in _LAYER_MAP]
    names.append("decoder.final_layernorm.weight")
    if not arch.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def hf_names(arch: LlamaArch) -> list[str]:
    names = []
    for name in mcore_names(arch):
        names += hf_sources(name)
    return names


def hf_sources(name: str) -> tuple[str, ...]:
    """HF names that make up megatron full parameter `name`."""
    if name in _GLOBAL_MAP:
        return (_GLOBAL_MAP[name],)
    match = _LAYER.match(name)
    if not match or match.group(2) not in _LAYER_MAP:
        raise KeyError(f"no HF equivalent for megatron parameter {name!r}")
    layer, suffix = match.groups()
    return tuple(f"model.layers.{layer}.{hf}" for hf in _LAYER_MAP[suffix])


def _suffix(name: str) -> str:
    match = _LAYER.match(name)
    return match.group(2) if match else name


def hf_to_mcore_full(name: str, hf: dict[str, torch.Tensor], arch: LlamaArch, padded_vocab: int) -> torch.Tensor:
    """Build megatron full parameter `name` from HF tensors (qkv interleave, gate/up fusion, vocab padding)."""
    parts = [hf[src] for src in hf_sources(name)]
    suffix = _suffix(name)
    if suffix == "self_attention.linear_qkv.weight":
        q, k, v = parts
        g, d, h = arch.num_kv_heads, arch.head_dim, arch.hidden_size
        per_group = arch.num_heads // g
        return torch.cat([q.view(g, per_group * d, h), k.view(g, d, h), v.view(g, d, h)], dim=1).reshape(-1, h)
    if suffix == "mlp.linear_fc1.weight":
        return torch.cat(parts, dim=0)
    (tensor,) = parts
    if name in _VOCAB and tensor.shape[0] < padded_vocab:
        pad = tensor.new_zeros(padded_vocab - tensor.shape[0], tensor.shape[1])
        tensor = torch.cat([tensor, pad], dim=0)
    return tensor


def mcore_full_to_hf(name: str, full: torch.Tensor, arch: LlamaArch) -> dict[str, torch.Tensor]:
    """Inverse of `hf_to_mcore_full`: HF tensors of one megatron full parameter (vocab padding stripped)."""
    sources = hf_sources(name)
    suffix = _suffix(name)
    if suffix == "self_attention.linear_qkv.weight":
        g, d, h = arch.num_kv_heads, arch.head_dim, arch.hidden_size
        per_group = arch.num_heads // g
        grouped = full.view(g, (per_group + 2) * d, h)
        q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
        return dict(zip(sources, (q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h))))
    if suffix == "mlp.linear_fc1.weight":
        gate, up = full.chunk(2, dim=0)
        return dict(zip(sources, (gate, up)))
    if name in _VOCAB:
        full = full[: arch.vocab_size]
    return {sources[0]: full}


def shard(name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """TP rank `rank`'s slice of megatron full parameter `name`."""
    suffix = _suffix(name)
    if suffix == "mlp.linear_fc1.weight":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    if suffix in _COLUMN or name in _VOCAB:
        return full.chunk(tp, dim=0)[rank]
    if suffix in _ROW:
        return full.chunk(tp, dim=1)[rank]
    return full


def unshard(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Megatron full parameter from the TP shards of all ranks, in rank order (inverse of `shard`)."""
    suffix = _suffix(name)
    if suffix == "mlp.linear_fc1.weight":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if suffix in _COLUMN or name in _VOCAB:
        return torch.cat(shards, dim=0)
    if suffix in _ROW:
        return torch.cat(shards, dim=1)
    return shards[0]


def stage_layers(arch: LlamaArch, pp: int, pp_rank: int, split: PipelineSplit | None = None) -> range:
    """Global layer indices on stage `pp_rank`: `split` (e.g. `PipelineSplit.from_config(model.config)`) or, when
    None, the even split of the architecture's layers over `pp` stages."""
    if split is None:
        return PipelineSplit(arch.num_layers, pp).layers(pp_rank)
    if (split.num_layers, split.pp) != (arch.num_layers, pp):
        raise ValueError(
            f"pipeline split of {split.num_layers} layers over pp={split.pp} does not match the model's "
            f"num_hidden_layers={arch.num_layers} at pp={pp}"
        )
    return split.layers(pp_rank)


def local_name(name: str, arch: LlamaArch, pp: int, pp_rank: int, split: PipelineSplit | None = None) -> str | None:
    """Name of global parameter `name` inside PP stage `pp_rank`'s model, or None if the stage lacks it.

    With tied embeddings and PP > 1 the last stage keeps its own copy of the embedding as `output_layer.weight`
    (megatron-core keeps the two in sync through the embedding group).
    """
    match = _LAYER.match(name)
    if match:
        layers = stage_layers(arch, pp, pp_rank, split)
        layer = int(match.group(1))
        return f"decoder.layers.{layer - layers.start}.{match.group(2)}" if layer in layers else None
    first, last = pp_rank == 0, pp_rank == pp - 1
    if name == "embedding.word_embeddings.weight":
        return name if first else None
    if name == "decoder.final_layernorm.weight":
        return name if last else None
    if name == "output_layer.weight":
        return name if last else None
    raise KeyError(name)


def global_name(local: str, arch: LlamaArch, pp: int, pp_rank: int, split: PipelineSplit | None = None) -> str:
    """Inverse of `local_name` for the parameters a stage holds."""
    match = _LAYER.match(local)
    if match:
        start = stage_layers(arch, pp, pp_rank, split).start
        return f"decoder.layers.{int(match.group(1)) + start}.{match.group(2)}"
    return local


def check_hf_state(hf: dict[str, torch.Tensor], arch: LlamaArch, source: str) -> None:
    """Every tensor the architecture needs is present with the right shape; the error names the tensor."""
    h, d = arch.hidden_size, arch.head_dim
    expected = {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if arch.score_head:
        expected["score.weight"] = (1, h)
    elif not arch.tie_word_embeddings:
        expected["lm_head.weight"] = (arch.vocab_size, h)
    for layer in range(arch.num_layers):
        p = f"model.layers.{layer}."
        expected.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (arch.num_heads * d, h),
            p + "self_attn.k_proj.weight": (arch.num_kv_heads * d, h),
            p + "self_attn.v_proj.weight": (arch.num_kv_heads * d, h),
            p + "self_attn.o_proj.weight": (h, arch.num_heads * d),
            p + "mlp.gate_proj.weight": (arch.ffn_hidden_size, h),
            p + "mlp.up_proj.weight": (arch.ffn_hidden_size, h),
            p + "mlp.down_proj.weight": (h, arch.ffn_hidden_size),
        })
    for name, shape in expected.items():
        if name not in hf:
            raise ValueError(f"{source}: missing tensor {name!r} (expected shape {list(shape)})")
        if tuple(hf[name].shape) != shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {list(hf[name].shape)}, but config.json implies {list(shape)}"
            )
    extra = sorted(set(hf) - set(expected) - {"lm_head.weight"})
    extra = [n for n in extra if not n.endswith("rotary_emb.inv_freq")]
    if extra:
        raise ValueError(f"{source}: unexpected tensor(s) {extra[:5]} for a Llama with this config.json")
