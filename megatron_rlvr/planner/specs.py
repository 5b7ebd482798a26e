"""Inputs of the layout planner: the model, the cluster, the layout, and the measured efficiencies.

Every field has a docstring; every efficiency default says where it comes from. Defaults labelled
ASSUMPTION are not measurements: replace them with the figures of `docs/benchmarks.md` (`megatron-rlvr bench
kernels | sync | train`) for the machine at hand.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

from megatron_rlvr.models.stages import PipelineSplit


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-style decoder: RMSNorm, grouped-query attention, SwiGLU MLP, untied embeddings by default."""

    name: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0
    """0 means hidden // heads."""
    tied_embeddings: bool = False

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        """q, k, v, o projections + gate, up, down + two RMSNorm weights."""
        attn = self.hidden * self.dim_head * (2 * self.heads + 2 * self.kv_heads)
        return attn + 3 * self.hidden * self.ffn + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        head = 0 if self.tied_embeddings else self.embedding_params
        return self.layers * self.layer_params + self.embedding_params + head + self.hidden

    @property
    def matmul_params(self) -> int:
        """Parameters touched by a matmul per token: every layer plus the LM head (the input embedding is a
        lookup). Forward FLOPs per token are 2 * this plus attention."""
        return self.layers * self.layer_params + self.embedding_params

    @property
    def tensors(self) -> int:
        """Tensors of an HF checkpoint: 9 per layer (q, k, v, o, gate, up, down, 2 norms) + embedding, final
        norm and (untied) LM head. A per-tensor weight sync sends this many messages."""
        return 9 * self.layers + 2 + (0 if self.tied_embeddings else 1)

    def kv_bytes_per_token(self) -> int:
        """bf16 K and V of one token over all layers, whole model (before tensor parallelism)."""
        return 2 * self.layers * self.kv_heads * self.dim_head * 2


# Llama 3.1 shapes (the models' config.json on the Hugging Face hub, meta-llama/Llama-3.1-*).
NAMED_MODELS: dict[str, ModelSpec] = {
    "8B": ModelSpec("Llama-3.1-8B", hidden=4096, ffn=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
    "70B": ModelSpec("Llama-3.1-70B", hidden=8192, ffn=28672, layers=80, heads=64, kv_heads=8, vocab=128256),
    "405B": ModelSpec("Llama-3.1-405B", hidden=16384, ffn=53248, layers=126, heads=128, kv_heads=8, vocab=128256),
}


def load_model(name_or_path: str) -> ModelSpec:
    """A named size (8B, 70B, 405B: Llama 3.1 shapes) or an HF config.json (a file or a directory with one)."""
    if name_or_path.upper() in NAMED_MODELS:
        return NAMED_MODELS[name_or_path.upper()]
    path = os.path.join(name_or_path, "config.json") if os.path.isdir(name_or_path) else name_or_path
    if not os.path.isfile(path):
        raise ValueError(
            f"model {name_or_path!r}: not a named size ({', '.join(NAMED_MODELS)}) and no config.json at {path}"
        )
    # The model code's reader validates the config (activation, RoPE type); imported here only, since it
    # pulls in megatron-core, which named sizes do not need.
    from megatron_rlvr.models.llama import LlamaArch

    with open(path) as handle:
        arch = LlamaArch.from_hf_config(json.load(handle), source=path)
    return ModelSpec(
        name=os.path.basename(os.path.dirname(os.path.abspath(path))) or path,
        hidden=arch.hidden_size,
        ffn=arch.ffn_hidden_size,
        layers=arch.num_layers,
        heads=arch.num_heads,
        kv_heads=arch.num_kv_heads,
        vocab=arch.vocab_size,
        head_dim=arch.head_dim,
        tied_embeddings=arch.tie_word_embeddings,
    )


@dataclass(frozen=True)
class ClusterSpec:
    """GPUs and links. Bandwidths are per GPU and per direction."""

    gpus: int
    gpus_per_node: int = 8
    memory_gib: float = 80.0
    """HBM per GPU."""
    reserved_gib: float = 4.0
    """Held back from every GPU: CUDA context, NCCL buffers, allocator fragmentation. ASSUMPTION."""
    nvlink_gbps: float = 450.0
    """Intra-node GB/s per direction (H100 SXM NVLink 4: 900 GB/s bidirectional)."""
    inter_gbps: float = 50.0
    """Inter-node GB/s per GPU (one 400 Gb/s InfiniBand NDR NIC per GPU = 50 GB/s)."""
    bf16_tflops: float = 989.0
    """Dense bf16 peak (H100 SXM datasheet, without sparsity)."""
    hbm_tbps: float = 3.35
    """HBM3 bandwidth (H100 SXM datasheet)."""

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / self.gpus_per_node)


CLUSTER_PRESETS: dict[str, dict] = {
    "h100-80g": dict(gpus_per_node=8, memory_gib=80.0, nvlink_gbps=450.0, inter_gbps=50.0, bf16_tflops=989.0,
                     hbm_tbps=3.35),
}


@dataclass(frozen=True)
class Layout:
    """Where the policy trains and generates, and what one RLVR step processes."""

    placement: str = "split"
    """split: trainer and rollout engines on disjoint GPUs, weights broadcast between them; colocated: both on
    every GPU, taking turns, weights resharded in place."""
    train_gpus: int = 0
    """GPUs that train (split). 0: all GPUs not given to rollout. Colocated: all GPUs."""
    tp: int = 1
    pp: int = 1
    dp: int = 0
    """0: train_gpus // (tp * pp)."""
    pp_first_layers: int = 0
    """Layers on the first pipeline stage, which also holds the embedding (0: the even share); the layers not on
    the first/last stage split evenly over the others (megatron-core's uneven pipeline)."""
    pp_last_layers: int = 0
    """Layers on the last pipeline stage, which also holds the final norm, LM head and logits (0: the even share)."""
    train_backend: str = "megatron"
    """megatron: TP/PP/DP with the distributed optimizer (optimizer states sharded over DP). zero3: DeepSpeed
    ZeRO stage 3 / FSDP over all training GPUs (weights, grads and optimizer states sharded, weights
    all-gathered for every micro-batch); needs tp = pp = 1."""
    rollout_tp: int = 1
    rollout_gpus: int = 0
    """GPUs that generate (split). Colocated: all GPUs."""
    rollout_eager: bool = False
    """vLLM enforce_eager: no CUDA graphs, every decode step pays the kernel launches of every layer."""
    rollout_max_seqs: int = 256
    """vLLM max_num_seqs (its default): the most sequences one engine decodes at once."""
    rollout_memory_fraction: float = 0.9
    """vLLM gpu_memory_utilization (its default): share of GPU memory for weights + KV cache."""
    value_model: str = ""
    """Size or config.json of the PPO value model, trained on the training GPUs beside the policy; '' for none."""
    value_tp: int = 0
    """megatron backend: the value model's TP on groups of its own over the training GPUs (0: the policy's tp)."""
    value_pp: int = 0
    """megatron backend: the value model's PP (0: the policy's pp); an even split of its layers."""
    kl_beta: float = 0.05
    """> 0 keeps a frozen reference model and runs its forward pass every step."""
    prompts_per_step: int = 512
    samples_per_prompt: int = 1
    prompt_len: int = 256
    """Mean prompt tokens."""
    max_prompt_len: int = 0
    """Longest prompt (fixed-shape padding without packing). 0: 2 * prompt_len."""
    response_len: int = 2048
    """Generation cap in tokens."""
    mean_response_len: int = 0
    """Mean generated tokens. 0: response_len (the worst case)."""
    ppo_epochs: int = 1
    """Optimizer passes over each rollout batch (PPO K)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch without packing."""
    packing: bool = False
    """Pack sequences into micro-batches of pack_tokens tokens (no padding), balanced over DP ranks."""
    pack_tokens: int = 16384
    grad_dtype: str = "fp32"
    """megatron backend: main-gradient dtype (fp32: megatron-core's accumulate/reduce in fp32; bf16 halves it)."""
    recompute: str = "full"
    """Activation recomputation: none (store every layer's activations) or full (store layer inputs only)."""
    sync: str = "bucketed"
    """per-tensor: one message per tensor, gather then broadcast in turn; bucketed: flat buckets of
    bucket_mb, the gather of bucket i+1 overlapping the broadcast of bucket i."""
    bucket_mb: int = 512
    logprob_kernel: str = "fused"
    """fused: the Triton log-prob/entropy kernels (no fp32 copy of the logits); unfused: torch
    float() + log_softmax + gather."""

    def policy_split(self, model: ModelSpec) -> PipelineSplit:
        """The policy's layers per pipeline stage (ValueError when the split is impossible)."""
        return PipelineSplit(model.layers, self.pp, self.pp_first_layers or None, self.pp_last_layers or None)

    @property
    def value_dims(self) -> tuple[int, int]:
        """(TP, PP) of the value model."""
        return self.value_tp or self.tp, self.value_pp or self.pp

    def resolved(self, cluster: ClusterSpec) -> "Layout":
        """Fills the derived defaults (0 fields) for this cluster."""
        changes: dict = {}
        if self.placement == "colocated":
            changes.update(train_gpus=cluster.gpus, rollout_gpus=cluster.gpus)
        else:
            rollout = self.rollout_gpus or max(cluster.gpus - self.train_gpus, 0)
            changes.update(rollout_gpus=rollout, train_gpus=self.train_gpus or max(cluster.gpus - rollout, 0))
        train_gpus = changes["train_gpus"]
        if not self.dp and self.tp * self.pp and train_gpus % (self.tp * self.pp) == 0:
            changes["dp"] = train_gpus // (self.tp * self.pp)
        if not self.max_prompt_len:
            changes["max_prompt_len"] = 2 * self.prompt_len
        if not self.mean_response_len:
            changes["mean_response_len"] = self.response_len
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions and rates: the measured inputs of the model, each with its source."""

    train_mfu: float = 0.37
    """Model FLOPs utilisation of forward+backward on the training GPUs, as a fraction of `bf16_tflops`.
    MEASURED: `megatron-rlvr bench train --size 1b --seq-len 4096 --micro-batch 2 --micro-batches 2` on one
    H100 ran 370 model TFLOP/s = 0.37 of the 989 TFLOP/s datasheet peak (docs/benchmarks.md; the 8B with full
    recompute: 357 TFLOP/s). Single GPU: TP/DP communication at scale is not in this figure (Megatron-LM's
    published H100 weak-scaling runs keep 41-47% MFU at scale with overlapped communication)."""
    gen_mfu: float = 0.5
    """Fraction of bf16 peak reached by prefill and batched-decode matmuls. ASSUMPTION."""
    hbm_efficiency: float = 0.8
    """Fraction of HBM bandwidth reached by memory-bound kernels (decode weight streaming, log-probs): the
    `kernel GB/s` of `megatron-rlvr bench kernels` over the datasheet figure. ASSUMPTION (copy kernels on
    H100 reach 80-90%)."""
    comm_efficiency: float = 0.8
    """Fraction of link bandwidth reached by large NCCL collectives (nccl-tests bus bandwidth). ASSUMPTION."""
    collective_latency_us: float = 25.0
    """Fixed cost of one small collective across nodes (half of it within a node). ASSUMPTION."""
    sync_gbps: float = 0.0
    """Achieved trainer -> rollout broadcast GB/s per receiving GPU: `megatron-rlvr bench sync`. 0: link
    bandwidth x comm_efficiency (inter-node for split, NVLink for colocated)."""
    message_overhead_ms: float = 2.0
    """Host cost of one weight-sync message (Python, RPC to the engine, kernel launches). ASSUMPTION."""
    decode_overhead_ms: float = 3.0
    """Scheduler + sampling time of one decode step with CUDA graphs. ASSUMPTION."""
    eager_layer_overhead_ms: float = 0.15
    """Extra launch time per layer per decode step without CUDA graphs (vLLM enforce_eager). ASSUMPTION."""
    pack_fill: float = 0.95
    """Share of a packed micro-batch's token budget that holds tokens; DP balance of the packs is taken as
    perfect (`megatron-rlvr bench partition`: Karmarkar-Karp max/mean rank tokens ~1.0000 at 64k
    sequences over 240 ranks). ASSUMPTION."""
    logprob_bytes_unfused: float = 32.0
    """HBM bytes moved per logit by a log-prob forward+backward in torch: float() (2 read + 4 write),
    log_softmax (max, sum, write: 12), its backward (8), the bf16 gradient (6)."""
    logprob_forward_bytes_unfused: float = 18.0
    """The forward-only share of logprob_bytes_unfused (old-policy and reference log-probs)."""
    logprob_bytes_fused: float = 6.0
    """Fused kernel: one bf16 read forward, one bf16 read + one bf16 gradient write backward."""
    logprob_forward_bytes_fused: float = 2.0
    """Fused kernel, forward only: one bf16 read of the logits."""
    logit_activation_bytes_unfused: float = 10.0
    """Bytes per logit alive at the loss: bf16 logits + fp32 copy + fp32 log-softmax kept for backward."""
    logit_activation_bytes_fused: float = 2.0
    """Fused kernel: only the bf16 logits (and a per-row log-sum-exp)."""


__all__ = [
    "CLUSTER_PRESETS", "ClusterSpec", "Efficiency", "Layout", "ModelSpec", "NAMED_MODELS", "load_model",
]
