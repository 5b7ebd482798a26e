"""Per-GPU memory of a layout: the training GPUs (worst pipeline stage) and the rollout GPUs.

Training, megatron backend with bf16 weights, fp32 main gradients and the distributed optimizer (megatron-core
docs, "Distributed Optimizer": 6 + 12/d bytes per parameter), for the P parameters of one pipeline stage:
    weights 2 P / t,  gradients 4 P / t,  Adam (fp32 master + m + v) 12 P / (t d)
ZeRO-3 backend over N GPUs (Rajbhandari et al. 2020, mixed-precision Adam, K = 12): (2 + 2 + 12) P / N,
plus the all-gathered weights of the layers in flight (two layers: the current and the prefetched one).

Activations per token per layer, bf16, attention through SDPA/flash (no s x s scores stored), Llama blocks:
    2h (attention norm input) + 2h (QKV input) + 2(h + 2 h_kv) (q, k, v) + 2h (attention output)
    + 2h (MLP norm input) + 2h (gate/up input) + 4f (gate, up) + 2f (down input)  =  12h + 4 h_kv + 6f
divided by t (sequence parallelism shards the norm regions too; Korthikanti et al. 2022 count 34h for GPT).
Full recomputation keeps only each layer's input (2h per token per layer) plus one layer's activations for
the recompute. With 1F1B pipeline stage s holds min(pp - s, micro-batches) micro-batches in flight.
The last stage also holds the logits at the loss: tokens x V / t x (bytes per logit of the log-prob path).

Every stage is evaluated with its own layer count (uneven splits: `models.stages.PipelineSplit`). A value
model on groups of its own (value_tp x value_pp over the same GPUs) adds its stage's states to each GPU; the
worst (policy stage, value stage) pair that shares a GPU is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_rlvr.models.stages import PipelineSplit
from megatron_rlvr.planner.specs import ClusterSpec, Efficiency, Layout, ModelSpec

GIB = float(2**30)
ROLLOUT_ACTIVATION_GIB = 2.0
"""vLLM's profiled activation peak (chunked prefill) kept out of the KV cache. ASSUMPTION."""


def activation_bytes_per_token_layer(model: ModelSpec) -> int:
    """12h + 4 h_kv + 6f bytes (see the module docstring)."""
    return 12 * model.hidden + 4 * model.kv_heads * model.dim_head + 6 * model.ffn


def stage_params(model: ModelSpec, layers: int, first: bool, last: bool, lm_head: bool = True) -> int:
    """Parameters on one pipeline stage: its `layers` layers + the embedding on the first stage + the final norm
    and LM head on the last (a value model's scalar head instead of the LM head: `lm_head=False`)."""
    params = layers * model.layer_params
    if first:
        params += model.embedding_params
    if last:
        head = 0 if model.tied_embeddings and not first else model.embedding_params
        params += model.hidden + (head if lm_head else model.hidden)
    return params


def micro_batch_tokens(layout: Layout) -> int:
    """Tokens in one micro-batch: the packing budget, else micro_batch_size sequences padded to
    max_prompt_len + response_len."""
    if layout.packing:
        return layout.pack_tokens
    return layout.micro_batch_size * (layout.max_prompt_len + layout.response_len)


@dataclass
class TrainMemory:
    weights: float
    grads: float
    optimizer: float
    reference: float
    value_model: float
    activations: float
    logits: float
    stage: str

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.reference + self.value_model + self.activations
                + self.logits)

    @property
    def resident(self) -> float:
        """What stays allocated between steps (everything but activations and logits)."""
        return self.weights + self.grads + self.optimizer + self.reference + self.value_model

    def items(self) -> list[tuple[str, float]]:
        return [("weights", self.weights), ("gradients", self.grads), ("optimizer", self.optimizer),
                ("reference model", self.reference), ("value model", self.value_model),
                ("activations", self.activations), ("logits", self.logits)]


def _activations(model: ModelSpec, layout: Layout, layers: int, in_flight: int, tp: int) -> float:
    tokens = micro_batch_tokens(layout)
    per_layer = tokens * activation_bytes_per_token_layer(model) / tp
    if layout.recompute == "full":
        return tokens * 2 * model.hidden / tp * layers * in_flight + per_layer
    return per_layer * layers * in_flight


def _states(params: float, shard_model: int, shard_optimizer: int, grad_bytes: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes: bf16 weights and gradients over shard_model GPUs, fp32 master
    weights and Adam moments over shard_optimizer GPUs."""
    return 2 * params / shard_model, grad_bytes * params / shard_model, 12 * params / shard_optimizer


def train_memory(model: ModelSpec, layout: Layout, eff: Efficiency, value: ModelSpec | None,
                 micro_batches: int) -> TrainMemory:
    """The worst stage's bytes per training GPU; `micro_batches` per DP rank and pass sets the 1F1B depth."""
    logit_bytes = eff.logit_activation_bytes_fused if layout.logprob_kernel == "fused" \
        else eff.logit_activation_bytes_unfused
    if layout.train_backend == "zero3":
        world = layout.train_gpus
        weights, grads, optimizer = _states(model.params, world, world, 2)
        weights += 2 * 2 * model.layer_params  # current + prefetched layer, gathered
        reference = 2 * model.params / world if layout.kl_beta > 0 else 0.0
        value_states = 16 * value.params / world if value else 0.0
        acts = _activations(model, layout, model.layers, 1, 1)
        if value:
            acts = max(acts, _activations(value, layout, value.layers, 1, 1))
        logits = micro_batch_tokens(layout) * model.vocab * logit_bytes
        return TrainMemory(weights, grads, optimizer, reference, value_states, acts, logits, "all ranks")
    tp, pp, dp = layout.tp, layout.pp, max(layout.dp, 1)
    grad_bytes = 4 if layout.grad_dtype == "fp32" else 2
    policy = _stage_memory(model, layout.policy_split(model), tp, dp, grad_bytes, micro_batches, layout)
    value_stages = None
    if value:
        vtp, vpp = layout.value_dims
        vdp = max(layout.train_gpus // (vtp * vpp), 1)
        # a value-DP rank's share of the sequences: micro-batches scale with dp / vdp
        value_micro = max(1, math.ceil(micro_batches * dp / vdp))
        value_stages = _stage_memory(value, PipelineSplit(value.layers, vpp), vtp, vdp, grad_bytes, value_micro,
                                     layout, lm_head=False)
    worst = None
    for p_stage, v_stage in _stages_sharing_a_gpu(layout, bool(value)):
        states, acts = policy[p_stage]
        reference = states[0] if layout.kl_beta > 0 else 0.0  # frozen bf16 copy of the policy stage's weights
        value_states, value_acts = (sum(value_stages[v_stage][0]), value_stages[v_stage][1]) if value else (0.0, 0.0)
        logits = micro_batch_tokens(layout) * model.vocab / tp * logit_bytes if p_stage == pp - 1 else 0.0
        # the value model's passes run after the policy's: activations of one of them at a time
        memory = TrainMemory(*states, reference, value_states, max(acts, value_acts), logits,
                             _stage_name(p_stage, pp, v_stage if value and layout.value_dims != (tp, pp) else None))
        if worst is None or memory.total > worst.total:
            worst = memory
    return worst


def _stage_memory(model: ModelSpec, split: PipelineSplit, tp: int, dp: int, grad_bytes: int, micro_batches: int,
                  layout: Layout, lm_head: bool = True) -> list[tuple[tuple[float, float, float], float]]:
    """Per pipeline stage: ((weights, gradients, optimizer) bytes, activation bytes) on one GPU. With 1F1B stage
    s holds min(pp - s, micro-batches) micro-batches in flight."""
    out = []
    for rank, layers in enumerate(split.counts()):
        params = stage_params(model, layers, rank == 0, rank == split.pp - 1, lm_head)
        in_flight = min(split.pp - rank, micro_batches)
        out.append((_states(params, tp, tp * dp, grad_bytes), _activations(model, layout, layers, in_flight, tp)))
    return out


def _stages_sharing_a_gpu(layout: Layout, with_value: bool) -> set[tuple[int, int]]:
    """(policy stage, value stage) pairs held by one training GPU: megatron's rank order puts PP outermost, so
    rank r is on stage r // (tp * dp) of each model's grid."""
    policy_block = layout.tp * max(layout.dp, 1)
    if not with_value:
        return {(stage, 0) for stage in range(layout.pp)}
    vtp, vpp = layout.value_dims
    value_block = vtp * max(layout.train_gpus // (vtp * vpp), 1)
    return {(min(r // policy_block, layout.pp - 1), min(r // value_block, vpp - 1)) for r in range(layout.train_gpus)}


def _stage_name(policy_stage: int, pp: int, value_stage: int | None) -> str:
    name = "only stage" if pp == 1 else {0: "first stage", pp - 1: "last stage"}.get(
        policy_stage, f"stage {policy_stage}")
    return name if value_stage is None else f"{name}, value model stage {value_stage}"


def kv_bytes_per_token_per_gpu(model: ModelSpec, rollout_tp: int) -> float:
    """K and V of one token on one GPU of a TP group: h_kv / tp heads each, at least one (vLLM replicates
    KV heads when tp exceeds their number)."""
    heads_per_gpu = max(1.0, model.kv_heads / rollout_tp)
    return 2 * model.layers * heads_per_gpu * model.dim_head * 2


@dataclass
class RolloutMemory:
    weights: float
    kv_cache: float
    activations: float
    train_resident: float
    kv_tokens: int
    """Tokens the KV cache of one engine holds."""

    @property
    def total(self) -> float:
        return self.weights + max(self.kv_cache, 0.0) + self.activations + self.train_resident

    def items(self) -> list[tuple[str, float]]:
        items = [("weights", self.weights), ("KV cache", self.kv_cache), ("activations", self.activations)]
        if self.train_resident:
            items.append(("training state kept resident", self.train_resident))
        return items


def rollout_memory(model: ModelSpec, layout: Layout, cluster: ClusterSpec, train: TrainMemory) -> RolloutMemory:
    """Bytes per rollout GPU. The KV cache gets what is left of rollout_memory_fraction of the GPU after the
    weights and the activation peak; colocated, the training state (weights, grads, optimizer, reference,
    value model) stays resident and is taken off first."""
    weights = 2 * model.params / layout.rollout_tp
    activations = ROLLOUT_ACTIVATION_GIB * GIB
    if layout.placement == "colocated":
        resident = train.resident
        budget = (cluster.memory_gib - cluster.reserved_gib) * GIB - resident
    else:
        resident = 0.0
        budget = layout.rollout_memory_fraction * cluster.memory_gib * GIB
    kv = budget - weights - activations
    kv_tokens = int(max(kv, 0.0) // kv_bytes_per_token_per_gpu(model, layout.rollout_tp))
    return RolloutMemory(weights, kv, activations, resident, kv_tokens)
