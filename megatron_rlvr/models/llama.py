"""Llama-architecture policy (and value) models as megatron-core `GPTModel`s.

`LlamaArch` is the architecture read from a HuggingFace `config.json`; `build_llama` turns it into a
megatron-core GPTModel for the calling rank's tensor/pipeline position. Implementations are chosen through
megatron-core's `ModuleSpec`s (`llama_layer_spec`): SDPA core attention and an RMSNorm that works under sequence
parallelism are plugged in as submodules, not as forks of megatron classes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_rlvr.models.attention import SDPAttention
from megatron_rlvr.models.norm import RMSNorm
from megatron_rlvr.models.stages import PipelineSplit
from megatron_rlvr.platform import current_platform

# a sequence-classification Llama (a reward model: trunk + `score` [1, h], no LM head) can start a PPO value model
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "LlamaForSequenceClassification")


@dataclasses.dataclass(frozen=True)
class LlamaArch:
    """The Llama hyper-parameters that determine weights and numerics (HF `LlamaConfig` names in comments)."""

    vocab_size: int  # vocab_size
    hidden_size: int  # hidden_size
    num_layers: int  # num_hidden_layers
    num_heads: int  # num_attention_heads
    num_kv_heads: int  # num_key_value_heads
    ffn_hidden_size: int  # intermediate_size
    head_dim: int  # head_dim (hidden_size // num_heads when absent)
    rms_norm_eps: float = 1e-5  # rms_norm_eps
    rope_theta: float = 10000.0  # rope_theta
    rope_scaling: dict | None = None  # rope_scaling (Llama-3 "llama3" type)
    tie_word_embeddings: bool = False  # tie_word_embeddings
    max_position_embeddings: int = 4096  # max_position_embeddings
    score_head: bool = False  # architectures == ["LlamaForSequenceClassification"]: `score.weight`, no `lm_head`

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> "LlamaArch":
        """Read a HF Llama config dict; unsupported architectures and missing fields are named in the error."""
        archs = config.get("architectures") or ["LlamaForCausalLM"]
        if archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{source}: architecture {archs[0]!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if config.get(flag):
                raise ValueError(f"{source}: {flag}=true is not supported (Llama has no linear biases)")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act={config['hidden_act']!r} is not supported; Llama uses 'silu'")
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        missing = [key for key in required if key not in config]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
        # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older configs `rope_scaling`
        rope_params = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_theta = config.get("rope_theta") or rope_params.get("rope_theta", 10000.0)
        rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"} or None
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rope_type == "default":
                rope_scaling = None
            elif rope_type != "llama3":
                raise ValueError(f"{source}: rope_scaling type {rope_type!r} is not supported; supported: llama3")
        heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            ffn_hidden_size=config["intermediate_size"],
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            score_head=archs[0] == "LlamaForSequenceClassification",
        )

    @classmethod
    def from_pretrained(cls, path: str) -> "LlamaArch":
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{path}: no config.json (expected a HuggingFace model directory)")
        with open(config_path) as f:
            return cls.from_hf_config(json.load(f), source=config_path)

    def padded_vocab_size(self, tp: int, multiple: int = 1) -> int:
        """Vocab rounded up so every TP rank holds an equal shard (and each shard a multiple of `multiple`)."""
        unit = tp * multiple
        return int(math.ceil(self.vocab_size / unit) * unit)

    def check_parallel(self, tp: int, pp: int, first_stage_layers: int | None = None,
                       last_stage_layers: int | None = None) -> None:
        """Refuse a TP/PP (and first/last stage layer counts) that cannot shard this architecture, naming the
        field and the sizes that fit."""
        for name, value in (("num_attention_heads", self.num_heads), ("num_key_value_heads", self.num_kv_heads)):
            if value % tp:
                fits = [d for d in range(1, value + 1) if value % d == 0]
                raise ValueError(f"tensor parallel size {tp} does not divide {name}={value}; use one of {fits}")
        PipelineSplit(self.num_layers, pp, first_stage_layers, last_stage_layers)

    def num_parameters(self) -> int:
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.vocab_size
        attn = h * self.head_dim * (self.num_heads * 2 + self.num_kv_heads * 2)
        layer = attn + 3 * h * f + 2 * h
        return self.num_layers * layer + v * h * (1 if self.tie_word_embeddings else 2) + h


def transformer_config(
    arch: LlamaArch,
    *,
    tp: int = 1,
    pp: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    recompute: bool = False,
    init_method_std: float = 0.02,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
) -> TransformerConfig:
    """megatron-core TransformerConfig for `arch`; fusion flags stay off (they need TransformerEngine/apex).

    `first_stage_layers` / `last_stage_layers`: an uneven pipeline split (`models.stages.PipelineSplit`, checked
    here); None: the even share."""
    split = PipelineSplit(arch.num_layers, pp, first_stage_layers, last_stage_layers)
    return TransformerConfig(
        num_layers=arch.num_layers,
        num_layers_in_first_pipeline_stage=split.first,
        num_layers_in_last_pipeline_stage=split.last,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        # initialise on the device that will hold the weights (megatron's default path assumes CUDA)
        use_cpu_initialization=current_platform().device_type == "cpu",
        init_method_std=init_method_std,
        variable_seq_lengths=True,  # rollouts have unequal lengths across micro-batches
        moe_token_dispatcher_type="alltoall",  # the default refuses variable_seq_lengths (dense: unused)
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )


def llama_layer_spec() -> ModuleSpec:
    """megatron-core's local GPT layer spec with SDPA core attention and our sequence-parallel-safe RMSNorm."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def _rope_inv_freq(arch: LlamaArch) -> torch.Tensor:
    """RoPE inverse frequencies with Llama-3 scaling applied from the config's own parameters.

    megatron-core's `rope_scaling` hard-codes Llama-3.1's low/high frequency factors and original context, so the
    frequencies are computed here from the HF fields (the formula of HF's `_compute_llama3_parameters`).
    """
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, arch.head_dim, 2, dtype=torch.float64) / arch.head_dim))
    if arch.rope_scaling is None:
        return inv_freq.float()
    rs = arch.rope_scaling
    factor = rs["factor"]
    low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    original = rs.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled).float()


def build_llama(
    arch: LlamaArch,
    config: TransformerConfig,
    pg_collection: ProcessGroupCollection,
    *,
    pad_vocab_multiple: int = 1,
    padded_vocab_size: int | None = None,
    value_head: bool = False,
) -> GPTModel:
    """The calling rank's stage of the model: embeddings on the first PP stage, output layer on the last.

    With `value_head=True` the output layer has a single column (a scalar value per token) instead of the vocab,
    for a PPO value model; it is replicated across TP ranks and never tied to the embedding.
    `padded_vocab_size` fixes the padded vocab (a checkpoint's) instead of deriving it from `pad_vocab_multiple`.
    """
    pp_rank, pp_size = pg_collection.pp.rank(), pg_collection.pp.size()
    layer = llama_layer_spec()
    num_local = get_num_layers_to_build(config, pp_rank=pp_rank)
    block_spec = TransformerBlockSubmodules(layer_specs=[layer] * num_local, layer_norm=RMSNorm)
    tp = pg_collection.tp.size()
    vocab = padded_vocab_size or arch.padded_vocab_size(tp, pad_vocab_multiple)
    if vocab % tp or vocab < arch.vocab_size:
        raise ValueError(
            f"padded vocab size {vocab} must be >= vocab_size={arch.vocab_size} and divisible by tensor parallel "
            f"size {tp}; convert the checkpoint with a pad multiple that {tp} divides"
        )
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=vocab,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp_size - 1,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings and not value_head,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        pg_collection=pg_collection,
    )
    model.rotary_pos_emb.inv_freq = _rope_inv_freq(arch).to(model.rotary_pos_emb.inv_freq.device)
    if value_head and model.post_process:
        model.output_layer = ValueHead(arch.hidden_size, config.params_dtype,
                                       sequence_parallel=config.sequence_parallel, tp_group=pg_collection.tp)
    # the pieces built outside megatron's initialisation (norms, RoPE frequencies, value head) follow it
    return model.to(current_platform().device())


class ValueHead(torch.nn.Module):
    """Scalar value per token: `[s, b, h] -> [s, b, 1]`, same call signature as megatron's output layer.

    Replicated over the TP group. Under sequence parallelism each TP rank holds `s / tp` positions of the final
    hidden states: they are gathered first (as megatron's column-parallel output layer does), and in backward
    each rank keeps its own positions' gradient (a split, not a reduce-scatter: every rank computed the same
    values, so summing their gradients would scale them by tp)."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, *, sequence_parallel: bool = False, tp_group=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype))
        self.sequence_parallel = sequence_parallel
        self.tp_group = tp_group

    def forward(self, hidden: torch.Tensor, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False,
                                                          group=self.tp_group)
        return hidden @ self.weight.t(), None
