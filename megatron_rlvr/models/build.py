"""The models of an RLVR job on a training rank: the policy (trainable), the frozen reference and the PPO value
model, each built from its HF directory on the groups `parallel.init_groups` made."""

from __future__ import annotations

import dataclasses

import torch

from megatron_rlvr.config import JobConfig
from megatron_rlvr.models.gguf import DTYPES
from megatron_rlvr.parallel.check import policy_stage_layers


@dataclasses.dataclass
class Models:
    policy: torch.nn.Module  # DDP-wrapped GPTModel stage
    optimizer: object
    reference: torch.nn.Module | None = None
    value: torch.nn.Module | None = None
    value_optimizer: object | None = None
    value_pg: object | None = None
    """the value model's ProcessGroupCollection (its own TP x PP x DP grid, or the policy's)"""


def build_model(cfg: JobConfig, path: str, pg, *, frozen: bool = False):
    """This rank's stage of the causal Llama at `path` with its HF weights, on the policy's pipeline split; (model,
    arch). The PPO value model is built by `models.value.build_value_model`, on its own grid."""
    from megatron_rlvr.models.llama import LlamaArch, build_llama, transformer_config
    from megatron_rlvr.models.weights import load_hf_into_model, read_hf_state

    arch = LlamaArch.from_pretrained(path)
    if arch.score_head:
        raise ValueError(f"{path} is a reward model (LlamaForSequenceClassification, no LM head): it can start the "
                         "value model (model.value_path), not the policy; point model.path at a LlamaForCausalLM")
    par = cfg.parallel
    first, last = policy_stage_layers(par)
    config = transformer_config(arch, tp=par.tensor_parallel, pp=par.pipeline_parallel,
                                sequence_parallel=par.sequence_parallel, params_dtype=DTYPES[cfg.model.dtype],
                                recompute=cfg.model.recompute and not frozen, first_stage_layers=first,
                                last_stage_layers=last)
    model = build_llama(arch, config, pg, pad_vocab_multiple=cfg.model.pad_vocab_multiple)
    load_hf_into_model(model, read_hf_state(path), arch, pg)
    if frozen:
        model.eval()
        model.requires_grad_(False)
    return model, arch


def build_models(cfg: JobConfig, groups) -> tuple[Models | None, object]:
    """(policy + reference + value on this rank, the policy's architecture) on `groups` (`parallel.Groups`);
    (None, architecture) on a rank that does not train."""
    from megatron_rlvr.models.llama import LlamaArch
    from megatron_rlvr.models.value import build_value_model
    from megatron_rlvr.parallel.model import make_trainable

    if not groups.trains:  # a rollout-only rank of the split layout: vLLM loads the weights itself
        return None, LlamaArch.from_pretrained(cfg.model.path)
    pg = groups.policy
    policy, arch = build_model(cfg, cfg.model.path, pg)
    policy, optimizer = make_trainable(policy, pg, cfg.train.optimizer,
                                       use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    models = Models(policy, optimizer)
    if cfg.algorithm.kl_coef > 0:
        models.reference, _ = build_model(cfg, cfg.model.path, pg, frozen=True)
    if groups.value is not None:
        models.value, models.value_optimizer = build_value_model(cfg, groups.value)
        models.value_pg = groups.value
    return models, arch
