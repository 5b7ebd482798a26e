"""Per-slice routing against vLLM's own weight loaders (no processes: vLLM's TP rank is set by hand).

For training TP t and rollout TP r, a rollout rank receives only the megatron shards of the senders whose shard
overlaps its vLLM slice (`slices_overlap`) and assembles full-shape HF tensors whose other regions hold NaN.
vLLM's loaders for that rank (QKV with GQA, gate/up, o_proj, down_proj) must then load exactly the parameters
they load from the true HF tensors, with no NaN: the routed regions cover what vLLM reads. Dropping any one
routed shard must leave NaN in a loaded parameter: every routed shard is needed.
"""

import contextlib
import dataclasses
import types

import pytest
import torch

from megatron_rlvr.models import hf_mapping
from megatron_rlvr.models.llama import LlamaArch
from megatron_rlvr.parallel.layout import slices_overlap
from megatron_rlvr.sync.slices import assemble, assembled_numel, route

ARCH = LlamaArch(vocab_size=50, hidden_size=16, num_layers=1, num_heads=8, num_kv_heads=4, ffn_hidden_size=24,
                 head_dim=4)


def _hf_layer(arch: LlamaArch, gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, d = arch.hidden_size, arch.head_dim
    shapes = {
        "model.layers.0.self_attn.q_proj.weight": (arch.num_heads * d, h),
        "model.layers.0.self_attn.k_proj.weight": (arch.num_kv_heads * d, h),
        "model.layers.0.self_attn.v_proj.weight": (arch.num_kv_heads * d, h),
        "model.layers.0.self_attn.o_proj.weight": (h, arch.num_heads * d),
        "model.layers.0.mlp.gate_proj.weight": (arch.ffn_hidden_size, h),
        "model.layers.0.mlp.up_proj.weight": (arch.ffn_hidden_size, h),
        "model.layers.0.mlp.down_proj.weight": (h, arch.ffn_hidden_size),
        "model.layers.0.input_layernorm.weight": (h,),
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "lm_head.weight": (arch.vocab_size, h),
    }
    return {name: torch.randn(shape, generator=gen, dtype=torch.float64) for name, shape in shapes.items()}


def _megatron_shards(hf, arch, tp, padded_vocab) -> dict[str, list[torch.Tensor]]:
    names = ["embedding.word_embeddings.weight", "output_layer.weight", "decoder.layers.0.input_layernorm.weight",
             "decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.0.self_attention.linear_proj.weight",
             "decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc2.weight"]
    out = {}
    for name in names:
        full = hf_mapping.hf_to_mcore_full(name, hf, arch, padded_vocab)
        out[name] = [hf_mapping.shard(name, full, tp, i) for i in range(tp)]
    return out


def _received(shards, arch, tp, senders) -> dict[str, torch.Tensor]:
    """What a rollout rank hands vLLM after receiving the shards of `senders`: NaN wherever nothing arrived."""
    out = {}
    for name, parts in shards.items():
        numel = max(assembled_numel(name, parts[0].numel(), tp), 1)
        buffer = torch.full((numel,), float("nan"), dtype=torch.float64)
        out.update(assemble(name, {i: parts[i] for i in senders}, arch, tp, buffer))
    return out


@contextlib.contextmanager
def _vllm_tp_rank(rank: int, size: int):
    """vLLM's layers read their TP rank and size from its TP group; a stand-in group is enough to build them."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    saved = parallel_state._TP
    parallel_state._TP = types.SimpleNamespace(rank_in_group=rank, world_size=size)
    try:
        with set_current_vllm_config(VllmConfig()):
            yield
    finally:
        parallel_state._TP = saved


def _vllm_load(hf, arch, rank, size) -> dict[str, torch.Tensor]:
    """The parameters vLLM TP rank `rank` of `size` loads from `hf` (its Llama layer loaders, as `load_weights`
    calls them)."""
    from vllm.model_executor.layers import linear

    h, d, p = arch.hidden_size, arch.head_dim, "model.layers.0."
    with _vllm_tp_rank(rank, size):
        kw = {"bias": False, "params_dtype": torch.float64}
        qkv = linear.QKVParallelLinear(h, d, arch.num_heads, arch.num_kv_heads, **kw)
        gate_up = linear.MergedColumnParallelLinear(h, [arch.ffn_hidden_size] * 2, **kw)
        o_proj = linear.RowParallelLinear(arch.num_heads * d, h, **kw)
        down = linear.RowParallelLinear(arch.ffn_hidden_size, h, **kw)
        for layer in (qkv, gate_up, o_proj, down):
            layer.weight.data.fill_(123.0)  # any value the loader leaves shows up as a mismatch
        for shard_id in ("q", "k", "v"):
            qkv.weight.weight_loader(qkv.weight, hf[f"{p}self_attn.{shard_id}_proj.weight"], shard_id)
        gate_up.weight.weight_loader(gate_up.weight, hf[f"{p}mlp.gate_proj.weight"], 0)
        gate_up.weight.weight_loader(gate_up.weight, hf[f"{p}mlp.up_proj.weight"], 1)
        o_proj.weight.weight_loader(o_proj.weight, hf[f"{p}self_attn.o_proj.weight"])
        down.weight.weight_loader(down.weight, hf[f"{p}mlp.down_proj.weight"])
    return {"qkv": qkv.weight.data, "gate_up": gate_up.weight.data, "o_proj": o_proj.weight.data,
            "down": down.weight.data}


@pytest.mark.parametrize(
    "train_tp,rollout_tp,kv_heads",
    [(1, 2, 4), (2, 2, 4), (2, 4, 4), (2, 8, 2), (4, 2, 4), (4, 8, 4), (2, 1, 4)],
    ids=["t1-r2", "t2-r2", "t2-r4", "t2-r8-kv-replicated", "t4-r2", "t4-r8-kv-replicated", "t2-r1"],
)
def test_routed_shards_cover_exactly_what_vllm_reads(train_tp, rollout_tp, kv_heads):
    arch = dataclasses.replace(ARCH, num_kv_heads=kv_heads)
    gen = torch.Generator().manual_seed(train_tp * 100 + rollout_tp * 10 + kv_heads)
    hf = _hf_layer(arch, gen)
    shards = _megatron_shards(hf, arch, train_tp, arch.padded_vocab_size(train_tp, 4))
    sliced = {name: parts for name, parts in shards.items() if route(name) == "slice"}
    for j in range(rollout_tp):
        senders = [i for i in range(train_tp) if slices_overlap(i, train_tp, j, rollout_tp)]
        want = _vllm_load(hf, arch, j, rollout_tp)
        got = _vllm_load(_received(sliced, arch, train_tp, senders), arch, j, rollout_tp)
        for module, tensor in want.items():
            assert not tensor.isnan().any()
            torch.testing.assert_close(got[module], tensor, rtol=0, atol=0, msg=f"rank {j}: {module}")
        # each routed shard is read by vLLM: without it some loaded parameter holds NaN
        for dropped in senders if len(senders) > 1 else []:
            partial = _vllm_load(_received(sliced, arch, train_tp, [i for i in senders if i != dropped]), arch, j,
                                 rollout_tp)
            assert any(t.isnan().any() for t in partial.values()), f"rank {j} does not need shard {dropped}"


@pytest.mark.parametrize("train_tp", [1, 2, 4])
def test_full_route_assembles_whole_tensors(train_tp):
    """Vocab tables (padded by megatron) from every shard come back as the HF tensors, padding dropped; a
    replicated norm comes from any one shard."""
    gen = torch.Generator().manual_seed(train_tp)
    hf = _hf_layer(ARCH, gen)
    shards = _megatron_shards(hf, ARCH, train_tp, ARCH.padded_vocab_size(train_tp, 16))
    assert ARCH.padded_vocab_size(train_tp, 16) > ARCH.vocab_size  # padding rows exist and must be dropped
    vocab = {name: parts for name, parts in shards.items() if route(name) == "full"}
    got = _received(vocab, ARCH, train_tp, range(train_tp))
    assert sorted(got) == ["lm_head.weight", "model.embed_tokens.weight"]
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, hf[name], rtol=0, atol=0)
    norm = "decoder.layers.0.input_layernorm.weight"
    only_last = _received({norm: shards[norm]}, ARCH, train_tp, [train_tp - 1])
    torch.testing.assert_close(only_last["model.layers.0.input_layernorm.weight"],
                               hf["model.layers.0.input_layernorm.weight"], rtol=0, atol=0)
