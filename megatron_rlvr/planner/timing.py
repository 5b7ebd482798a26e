"""Predicted time of one RLVR step: generate, weight sync, train. Each function returns its total and the
named parts it adds up, so the report shows where the time goes.

Generation (per vLLM engine of rollout_tp GPUs, engines in parallel):
    concurrency B = min(sequences per engine, max_num_seqs, KV tokens / (prompt + mean response / 2))
    decode steps  = (sequences / B) * mean response + (response cap - mean response)   [the longest tail]
    one step      = max(HBM: (weights + KV read) / (HBM BW * eff),  FLOPs: 2 N B / t / (peak * gen_mfu))
                    + 2 all-reduces per layer of B x h bf16 + per-step overhead (+ per-layer launches if eager)
    prefill       = prompt tokens * 2 N / (t * peak * gen_mfu)
Sync: every rollout GPU receives the full bf16 weights (broadcast, each rank keeps its shard):
    per-tensor    = tensors * overhead + gather + broadcast          (one tensor at a time)
    bucketed      = buckets * overhead + max(gather, broadcast)     (double-buffered)
Train: FLOPs per token forward = 2 N + 2 L s h_attn (causal attention over a sequence of s tokens);
    forward+backward = 3x forward, + 1x forward with full recomputation. Passes: the old-policy log-probs and
    the reference (forward), the value model (forward, then trained), ppo_epochs x policy forward+backward.
    time = FLOPs / (GPUs * peak * train_mfu) * (1 + (pp - 1) / micro-batches) + log-prob kernels + exposed
    communication (megatron: DP gradient reduce-scatter + weight all-gather per optimizer step; zero3: the
    per-micro-batch weight all-gathers and gradient reduce-scatters, overlapped with compute: max of both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_rlvr.planner.memory import kv_bytes_per_token_per_gpu
from megatron_rlvr.planner.specs import ClusterSpec, Efficiency, Layout, ModelSpec


@dataclass
class Phase:
    seconds: float
    parts: dict[str, float] = field(default_factory=dict)
    facts: dict[str, float] = field(default_factory=dict)
    """Intermediate quantities worth printing (concurrency, decode steps, FLOPs...)."""


def collective_bandwidth(cluster: ClusterSpec, group: int, eff: Efficiency) -> float:
    """Bus bandwidth (bytes/s) of a ring collective over `group` consecutive GPUs: NVLink inside a node;
    across nodes every GPU's own NIC carries one ring channel, so a node moves gpus_per_node NICs' worth,
    capped by NVLink."""
    if group <= cluster.gpus_per_node:
        return cluster.nvlink_gbps * 1e9 * eff.comm_efficiency
    per_node = min(cluster.nvlink_gbps, cluster.gpus_per_node * cluster.inter_gbps)
    return per_node * 1e9 * eff.comm_efficiency


def _latency(cluster: ClusterSpec, group: int, eff: Efficiency) -> float:
    scale = 0.5 if group <= cluster.gpus_per_node else 1.0
    return eff.collective_latency_us * 1e-6 * scale


def sequences(layout: Layout) -> int:
    return layout.prompts_per_step * layout.samples_per_prompt


def generate_time(model: ModelSpec, layout: Layout, cluster: ClusterSpec, eff: Efficiency, kv_tokens: int) -> Phase:
    tp = layout.rollout_tp
    engines = max(layout.rollout_gpus // tp, 1)
    per_engine = math.ceil(sequences(layout) / engines)
    mean_resp = layout.mean_response_len
    resident = layout.prompt_len + mean_resp / 2
    concurrency = max(1, min(per_engine, layout.rollout_max_seqs, int(kv_tokens // max(resident, 1))))
    steps = per_engine / concurrency * mean_resp + (layout.response_len - mean_resp)
    peak = cluster.bf16_tflops * 1e12
    hbm = cluster.hbm_tbps * 1e12 * eff.hbm_efficiency
    weights_read = 2 * model.params / tp
    kv_read = concurrency * resident * kv_bytes_per_token_per_gpu(model, tp)
    memory_s = (weights_read + kv_read) / hbm
    compute_s = 2 * model.matmul_params * concurrency / tp / (peak * eff.gen_mfu)
    comm_s = 0.0
    if tp > 1:
        message = concurrency * model.hidden * 2
        one = _latency(cluster, tp, eff) + 2 * (tp - 1) / tp * message / collective_bandwidth(cluster, tp, eff)
        comm_s = 2 * model.layers * one
    overhead_s = (eff.decode_overhead_ms + (eff.eager_layer_overhead_ms * model.layers if layout.rollout_eager
                                            else 0.0)) * 1e-3
    step_s = max(memory_s, compute_s) + comm_s + overhead_s
    prefill_s = per_engine * layout.prompt_len * 2 * model.matmul_params / (tp * peak * eff.gen_mfu)
    decode_s = steps * step_s
    return Phase(
        prefill_s + decode_s,
        {"prefill": prefill_s, "decode": decode_s},
        {"engines": engines, "sequences per engine": per_engine, "concurrent sequences": concurrency,
         "decode steps": steps, "step ms": step_s * 1e3, "step ms: HBM": memory_s * 1e3,
         "step ms: matmul": compute_s * 1e3, "step ms: TP all-reduce": comm_s * 1e3,
         "step ms: overhead": overhead_s * 1e3},
    )


def sync_time(model: ModelSpec, layout: Layout, cluster: ClusterSpec, eff: Efficiency) -> Phase:
    total = 2.0 * model.params
    if layout.placement == "colocated":
        # in place: each GPU copies its rollout shard from the training layout over NVLink
        link = eff.sync_gbps * 1e9 or cluster.nvlink_gbps * 1e9 * eff.comm_efficiency
        gather_s, broadcast_s = 0.0, total / layout.rollout_tp / link
    else:
        link = eff.sync_gbps * 1e9 or cluster.inter_gbps * 1e9 * eff.comm_efficiency
        broadcast_s = total / link
        if layout.train_backend == "zero3":
            gather_s = total / collective_bandwidth(cluster, layout.train_gpus, eff)
        else:  # each stage's TP group assembles its layers over NVLink, the stages in parallel
            gather_s = total / layout.pp / collective_bandwidth(cluster, layout.tp, eff) if layout.tp > 1 else 0.0
    if layout.sync == "per-tensor":
        messages = model.tensors
        seconds = messages * eff.message_overhead_ms * 1e-3 + gather_s + broadcast_s
    else:
        messages = math.ceil(total / (layout.bucket_mb * 2**20))
        seconds = messages * eff.message_overhead_ms * 1e-3 + max(gather_s, broadcast_s)
    return Phase(seconds, {"gather": gather_s, "transfer": broadcast_s,
                           "per-message overhead": messages * eff.message_overhead_ms * 1e-3},
                 {"messages": messages, "GB sent per rollout GPU": total / 1e9 /
                  (layout.rollout_tp if layout.placement == "colocated" else 1)})


def train_tokens_per_sequence(layout: Layout, eff: Efficiency) -> tuple[float, float]:
    """(tokens computed per sequence, attention length): padded without packing; with packing the actual
    tokens over the pack fill."""
    actual = layout.prompt_len + layout.mean_response_len
    if layout.packing:
        return actual / eff.pack_fill, actual
    padded = layout.max_prompt_len + layout.response_len
    return padded, padded


def micro_batches_per_rank(layout: Layout, eff: Efficiency) -> int:
    dp = layout.train_gpus if layout.train_backend == "zero3" else max(layout.dp, 1)
    per_rank = math.ceil(sequences(layout) / dp)
    if layout.packing:
        actual = layout.prompt_len + layout.mean_response_len
        return max(1, math.ceil(per_rank * actual / (layout.pack_tokens * eff.pack_fill)))
    return math.ceil(per_rank / layout.micro_batch_size)


def forward_flops_per_token(model: ModelSpec, attention_len: float) -> float:
    """2 N + 2 L s h_attn: matmuls plus causal attention (QK^T and AV, 2 s h_attn each, over s/2 keys on average)."""
    return 2 * model.matmul_params + 2 * model.layers * attention_len * model.heads * model.dim_head


def train_time(model: ModelSpec, layout: Layout, cluster: ClusterSpec, eff: Efficiency,
               value: ModelSpec | None) -> Phase:
    zero3 = layout.train_backend == "zero3"
    gpus = layout.train_gpus
    dp = gpus if zero3 else max(layout.dp, 1)
    tokens_per_seq, attn_len = train_tokens_per_sequence(layout, eff)
    rank_tokens = math.ceil(sequences(layout) / dp) * tokens_per_seq  # the busiest rank sets the pace
    tokens = rank_tokens * dp
    recompute = 1.0 if layout.recompute == "full" else 0.0
    train_pass = 3.0 + recompute  # forward + backward (2x) + recomputed forward, in forward units
    forward_passes = 1 + (1 if layout.kl_beta > 0 else 0)  # old-policy log-probs, reference
    policy_units = forward_passes + layout.ppo_epochs * train_pass
    value_units = (1 + layout.ppo_epochs * train_pass) if value else 0.0
    flops = tokens * (policy_units * forward_flops_per_token(model, attn_len)
                      + (value_units * forward_flops_per_token(value, attn_len) if value else 0.0))
    micro = micro_batches_per_rank(layout, eff)
    bubble = (layout.pp - 1) / micro if layout.pp > 1 else 0.0
    compute_s = flops / (gpus * cluster.bf16_tflops * 1e12 * eff.train_mfu)

    kernel_bps = cluster.hbm_tbps * 1e12 * eff.hbm_efficiency
    fused = layout.logprob_kernel == "fused"
    bytes_train = eff.logprob_bytes_fused if fused else eff.logprob_bytes_unfused
    bytes_forward = eff.logprob_forward_bytes_fused if fused else eff.logprob_forward_bytes_unfused
    logit_elems = rank_tokens * model.vocab / (1 if zero3 else layout.tp)
    logprob_s = logit_elems * (forward_passes * bytes_forward + layout.ppo_epochs * bytes_train) / kernel_bps

    parts = {"compute": compute_s, "pipeline bubble": compute_s * bubble, "log-prob kernels": logprob_s}
    if zero3:
        bus = collective_bandwidth(cluster, gpus, eff)

        def per_model(m: ModelSpec) -> float:  # one bf16 all-gather (or reduce-scatter) of a whole model
            return 2 * m.params * (gpus - 1) / gpus / bus

        collectives = micro * (forward_passes * per_model(model) + layout.ppo_epochs * 3 * per_model(model))
        if value:
            collectives += micro * (1 + layout.ppo_epochs * 3) * per_model(value)
        parts["exposed ZeRO-3 collectives"] = max(collectives - compute_s, 0.0)
        facts = {"ZeRO-3 collectives s": collectives}
    else:
        # per optimizer step: fp32 gradient reduce-scatter + bf16 weight all-gather over the DP group
        stage_bytes = 6.0 * model.params / (layout.tp * layout.pp) * (dp - 1) / dp
        dp_group = dp * layout.tp * layout.pp  # DP ranks sit tp*pp GPUs apart: across nodes when that >= a node
        bus = collective_bandwidth(cluster, dp_group if dp > 1 else 1, eff)
        parts["DP gradient sync"] = layout.ppo_epochs * stage_bytes / bus if dp > 1 else 0.0
        facts = {}
    facts.update({"tokens per step": tokens, "tokens per sequence": tokens_per_seq, "micro-batches per rank": micro,
                  "PFLOP per step": flops / 1e15})
    return Phase(sum(parts.values()), parts, facts)
