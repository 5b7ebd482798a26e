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
            p + "self_attn.q_proj.weight": (arch.num_heads * d, h),
            p + "self_attn.k_proj.weight": (arch.num_kv_heads * d, h),
            p + "self_attn.v_proj.weight": (arch.num_kv_heads * d, h),
            p + "self_attn.o_proj.weight": (h, arch.num_heads * d),
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


CASES = [(GQA, t, r) for t in (1, 2) for r in (1, 2, 4, 8)]
CASES += [(MHA_TIED, t, r) for t, r in ((1, 4), (4, 2), (2, 4), (4, 4))]


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
        InplaceCopy(regions)(lambda: params, lambda: shards)
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
    shards = {n: {r: t.float() for r, t in held.items()}
              for n, held in _megatron_shards(hf, GQA, 1, train_vocab).items()}
    params = {n: torch.empty(s, dtype=torch.bfloat16) for n, s in vllm_parameter_shapes(GQA, 2).items()}
    copy = InplaceCopy(plan_inplace(GQA, train_tp=1, train_vocab=train_vocab, rollout_tp=2, rollout_rank=1))
    copy(lambda: params, lambda: shards)
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
    copy(lambda: params, lambda: shards)
    name = "model.layers.0.mlp.down_proj.weight"
    stale = params[name]
    params[name] = torch.zeros_like(stale)
    copy(lambda: params, lambda: shards)
    assert torch.equal(params[name], hf[name])
    shards[name.replace("model.", "decoder.").replace("mlp.down_proj", "mlp.linear_fc2")] = {0: -hf[name]}
    copy(lambda: params, lambda: shards)
    assert torch.equal(params[name], -hf[name]), "a re-allocated source was not re-bound"


def _bench_worker(rank, world, cases):
    from megatron_rlvr.benchmarks import sync_inplace
    from megatron_rlvr.benchmarks.train import SIZES
    from megatron_rlvr.models.weights import gather_full_state
    from megatron_rlvr.parallel.state import init_model_parallel
    from megatron_rlvr.sync.transfer import to_hf

    hidden, layers, heads, kv, ffn, vocab = SIZES["tiny"]
    # vocab 100: vLLM pads it to 128, megatron to 128 as well, with different rows per rank
    arch = LlamaArch(vocab_size=100, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                     ffn_hidden_size=ffn, head_dim=hidden // heads)
    pg = init_model_parallel(1, 1, seed=11)
    model = sync_inplace.build_source(arch, torch.float32, pg)
    hf = {}
    for name, full in gather_full_state(model, arch, pg).items():
        hf.update({n: t.double().cpu() for n, t in to_hf(name, [full], arch).items()})
    out = []
    for rollout_tp, rollout_rank in cases:
        report = sync_inplace.measure(model, arch, pg, rollout_tp=rollout_tp, rollout_rank=rollout_rank, repeats=1)
        copy = InplaceCopy(plan_inplace(arch, train_tp=1, train_vocab=model.vocab_size, rollout_tp=rollout_tp,
                                        rollout_rank=rollout_rank))
        filled = {}
        for path in ("inplace", "old_path"):
            dest = sync_inplace.vllm_destinations(arch, rollout_tp, torch.float32, "cpu")
            for t in dest.values():
                t.fill_(float("nan"))
            if path == "inplace":
                sync_inplace.fill_inplace(copy, model, arch, pg, dest)
            else:
                sync_inplace.fill_old_path(model, arch, pg, dest, rollout_tp, rollout_rank)
            filled[path] = {n: t.double().cpu() for n, t in dest.items()}
        out.append((report, vllm_reference(hf, arch, rollout_tp, rollout_rank), filled))
    return out


def test_sync_inplace_bench_fills_vllm_layout():
    """`bench sync-inplace` at tiny shapes on CPU: both timed paths (in-place, and to_hf + loader-style copies) leave
    the destination equal to vLLM's layout of the model's weights, and the bytes it reports are the destination's.
    Rollout TP 1, and TP 4 > 2 KV heads, whose rank 3 holds a replicated KV head and mostly vocab padding."""
    from megatron_rlvr.testing.distributed import run_workers

    cases = [(1, 0), (4, 3)]
    results = run_workers(_bench_worker, 1, cases, timeout=300)[0]
    for (rollout_tp, rollout_rank), (report, reference, filled) in zip(cases, results):
        for path, params in filled.items():
            assert params.keys() == reference.keys()
            for name, expected in reference.items():
                assert torch.equal(params[name], expected), \
                    f"rollout TP {rollout_tp} rank {rollout_rank}, {path}: {name} differs from vLLM's layout"
        assert report["bytes"] == 4 * sum(t.numel() for t in reference.values())
        assert set(report["seconds"]) == {"device_copy", "inplace", "old_path"}
        assert all(s > 0 for s in report["seconds"].values())
