"""The in-place plan megatron shards -> vLLM parameters, against vLLM's layout built from HF tensors (float64).

Each case draws fresh random HF weights, makes megatron's shards of them with `models.hf_mapping` (QKV interleaved
per query group, fc1 = [gate_r; up_r], the trainer's vocab padding filled with NaN so that reading it shows), starts
every vLLM parameter of every rollout rank as NaN, runs the plan, and requires exact equality with
`vllm_reference` (a copy does no arithmetic): every element written, from the right place. The plan's regions add
up to exactly the parameters' elements, so each is written once.
"""

import dataclasses
import math

import pytest
import torch

from megatron_rlvr.models import hf_mapping
from megatron_rlvr.models.llama import LlamaArch
from megatron_rlvr.sync.vllm_layout import (
    InplaceCopy, check_destinations, plan_inplace, source_ranks, vllm_parameter_shapes,
)
from tests.sync.vllm_reference import vllm_reference

# GQA with 4 query heads per KV head; hidden != heads * head_dim; vocab 100 -> vLLM pads to 128
GQA = LlamaArch(vocab_size=100, hidden_size=24, num_layers=2, num_heads=8, num_kv_heads=2, ffn_hidden_size=40,
                head_dim=4)
# multi-head attention, tied embeddings; vocab 70 -> 128, so at rollout TP 4 the last rank holds padding only
MHA_TIED = LlamaArch(vocab_size=70, hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=4, ffn_hidden_size=24,
                     head_dim=8, tie_word_embeddings=True)
LLAMA_8B = LlamaArch(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                     ffn_hidden_size=14336, head_dim=128)


def _hf_state(arch: LlamaArch, gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, d = arch.hidden_size, arch.head_dim
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for layer in range(arch.num_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (arch.num_heads * d, h), p + "self_attn.k_proj.weight": (arch.num_kv_heads * d, h),
            p + "self_attn.v_proj.weight": (arch.num_kv_heads * d, h), p + "self_attn.o_proj.weight": (h, arch.num_heads * d),
            p + "mlp.gate_proj.weight": (arch.ffn_hidden_size, h), p + "mlp.up_proj.weight": (arch.ffn_hidden_size, h),
            p + "mlp.down_proj.weight": (h, arch.ffn_hidden_size),
        })
    return {name: torch.randn(shape, dtype=torch.float64, generator=gen) for name, shape in shapes.items()}


def _megatron_shards(hf, arch: LlamaArch, train_tp: int, train_vocab: int) -> dict[str, dict[int, torch.Tensor]]:
    shards = {}
    for name in hf_mapping.mcore_names(arch):
        full = hf_mapping.hf_to_mcore_full(name, hf, arch, train_vocab)
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            full[arch.vocab_size:] = float("nan")  # the trainer's padding rows must never be read
        shards[name] = {r: hf_mapping.shard(name, full, train_tp, r).contiguous() for r in range(train_tp)}
    return shards


CASES = [(GQA, t, r) for t in (1, 2) for r in (1, 2, 4, 8)] + [(MHA_TIED, t, r) for t, r in ((1, 4), (4, 2), (2, 4), (4, 4))]


@pytest.mark.parametrize("arch,train_tp,rollout_tp", CASES,
                         ids=[f"{'gqa' if a is GQA else 'mha-tied'}-train{t}-rollout{r}" for a, t, r in CASES])
def test_plan_fills_vllm_layout(arch, train_tp, rollout_tp):
    gen = torch.Generator().manual_seed(1000 * train_tp + rollout_tp)
    hf = _hf_state(arch, gen)
    train_vocab = arch.padded_vocab_size(train_tp, 16)
    shards = _megatron_shards(hf, arch, train_tp, train_vocab)
    shapes = vllm_parameter_shapes(arch, rollout_tp)
    for rank in range(rollout_tp):
        regions = plan_inplace(arch, train_tp=train_tp, train_vocab=train_vocab, rollout_tp=rollout_tp,
                               rollout_rank=rank)
        params = {name: torch.full(shape, float("nan"), dtype=torch.float64) for name, shape in shapes.items()}
        InplaceCopy(regions)(params, shards)
        reference = vllm_reference(hf, arch, rollout_tp, rank)
        assert params.keys() == reference.keys()
        for name, expected in reference.items():
            assert torch.equal(params[name], expected), f"rank {rank}/{rollout_tp}: {name} differs from vLLM's layout"
        assert sum(r.dst_view.numel for r in regions) == sum(p.numel() for p in params.values()), \
            "regions overlap: some elements are written more than once"


def test_plan_converts_dtype_in_the_copy():
    """fp32 trainer -> bf16 vLLM: the one copy also rounds, to what rounding the reference gives."""
    hf = _hf_state(GQA, torch.Generator().manual_seed(7))
    train_vocab = GQA.padded_vocab_size(1, 16)
    shards = {n: {r: t.float() for r, t in held.items()} for n, held in _megatron_shards(hf, GQA, 1, train_vocab).items()}
    params = {n: torch.empty(s, dtype=torch.bfloat16) for n, s in vllm_parameter_shapes(GQA, 2).items()}
    InplaceCopy(plan_inplace(GQA, train_tp=1, train_vocab=train_vocab, rollout_tp=2, rollout_rank=1))(params, shards)
    for name, expected in vllm_reference(hf, GQA, 2, 1).items():
        assert torch.equal(params[name], expected.float().to(torch.bfloat16)), name


def test_llama_8b_plan_is_one_copy_per_region():
    """Training TP 1 -> vLLM TP 1 at Llama-3.1-8B's shape: q, k, v, o, gate, up, down and two norms per layer, the two
    vocab tables and the final norm; 291 copies moving every parameter once (vocab 128256 needs no padding)."""
    regions = plan_inplace(LLAMA_8B, train_tp=1, train_vocab=128256, rollout_tp=1, rollout_rank=0)
    assert len(regions) == 9 * 32 + 3
    assert all(r.src is not None for r in regions)
    assert sum(r.dst_view.numel for r in regions) == LLAMA_8B.num_parameters()
    shapes = vllm_parameter_shapes(LLAMA_8B, 1)
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (6144, 4096)
    assert sum(math.prod(s) for s in shapes.values()) == LLAMA_8B.num_parameters()


def test_source_ranks():
    """Which training shards a vLLM rank reads: equal TP sizes read their own, larger rollout TP reads one."""
    def ranks(t, r, j):
        return source_ranks(plan_inplace(GQA, train_tp=t, train_vocab=GQA.padded_vocab_size(t, 16), rollout_tp=r,
                                         rollout_rank=j))

    assert [ranks(2, 2, j) for j in range(2)] == [{0}, {1}]
    assert [ranks(2, 4, j) for j in range(4)] == [{0}, {0}, {1}, {1}]
    assert ranks(2, 1, 0) == {0, 1}
    assert ranks(1, 8, 5) == {0}


def test_check_destinations_names_the_problem():
    shapes = vllm_parameter_shapes(GQA, 2)
    good = {n: torch.zeros(s) for n, s in shapes.items()}
    assert check_destinations(shapes, good) is None
    qkv = "model.layers.1.self_attn.qkv_proj.weight"
    assert "is empty" in check_destinations(shapes, {**good, qkv: torch.zeros(0)})
    assert "expected [24, 24]" in check_destinations(shapes, {**good, qkv: torch.zeros(20, 24)})
    assert "quantized" in check_destinations(shapes, {**good, qkv: torch.zeros(shapes[qkv], dtype=torch.int8)})
    missing = dict(good)
    del missing["lm_head.weight"]
    assert "no parameter(s) ['lm_head.weight']" in check_destinations(shapes, missing)


def test_sizes_that_cannot_shard_are_refused():
    three_kv_heads = dataclasses.replace(GQA, num_heads=12, num_kv_heads=3)
    with pytest.raises(ValueError, match="rollout TP 4 and num_key_value_heads=3: one must divide the other"):
        plan_inplace(three_kv_heads, train_tp=1, train_vocab=112, rollout_tp=4, rollout_rank=0)
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by tensor parallel size 4"):
        plan_inplace(GQA, train_tp=4, train_vocab=128, rollout_tp=1, rollout_rank=0)


def test_rebinds_when_a_parameter_is_reallocated():
    """The bound views are reused between syncs; a parameter re-allocated since (vLLM rebuilt it) gets re-bound."""
    hf = _hf_state(GQA, torch.Generator().manual_seed(3))
    shards = _megatron_shards(hf, GQA, 1, 112)
    copy = InplaceCopy(plan_inplace(GQA, train_tp=1, train_vocab=112, rollout_tp=1, rollout_rank=0))
    params = {n: torch.zeros(s, dtype=torch.float64) for n, s in vllm_parameter_shapes(GQA, 1).items()}
    copy(params, shards)
    name = "model.layers.0.mlp.down_proj.weight"
    params[name] = torch.zeros_like(params[name])
    copy(params, shards)
    assert torch.equal(params[name], hf[name])
