"""Moving weights between HF state dicts and a built (TP/PP-sharded) megatron model on the calling rank."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_rlvr.models import hf_mapping
from megatron_rlvr.models.llama import LlamaArch, ValueHead
from megatron_rlvr.models.stages import PipelineSplit

TIED_OUTPUT = "output_layer.weight"


def read_hf_state(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a HF safetensors directory (single file or sharded with an index)."""
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files (expected a HuggingFace model directory)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return state


def pipeline_split(model: torch.nn.Module) -> PipelineSplit:
    """The layers-per-stage split `model` was built with (read from its TransformerConfig)."""
    return PipelineSplit.from_config(unwrap(model).config)


def _full_name(local: str, arch: LlamaArch, pg: ProcessGroupCollection, split: PipelineSplit) -> str:
    name = hf_mapping.global_name(local, arch, pg.pp.size(), pg.pp.rank(), split)
    # a tied model's last PP stage holds a copy of the embedding as its output layer
    if name == TIED_OUTPUT and arch.tie_word_embeddings:
        return "embedding.word_embeddings.weight"
    return name


@torch.no_grad()
def load_hf_into_model(
    model: torch.nn.Module, hf: dict[str, torch.Tensor], arch: LlamaArch, pg: ProcessGroupCollection
) -> None:
    """Copy HF tensors into this rank's shard of `model` (exact: a copy, no arithmetic). A value head takes a
    reward model's `score.weight` [1, h] (LlamaForSequenceClassification), else keeps its own initialisation."""
    inner = unwrap(model)
    padded = inner.vocab_size
    tp, tp_rank = pg.tp.size(), pg.tp.rank()
    split = pipeline_split(inner)
    head = getattr(inner, "output_layer", None)
    for local, param in inner.named_parameters():
        if isinstance(head, ValueHead) and param is head.weight:
            if "score.weight" in hf:
                if hf["score.weight"].shape != param.shape:
                    raise ValueError(f"score.weight has shape {list(hf['score.weight'].shape)}; a value model "
                                     f"needs one output ({list(param.shape)}): a reward model with num_labels=1")
                param.copy_(hf["score.weight"])
            continue
        name = _full_name(local, arch, pg, split)
        full = hf_mapping.hf_to_mcore_full(name, hf, arch, padded)
        part = hf_mapping.shard(name, full, tp, tp_rank)
        if part.shape != param.shape:
            raise ValueError(f"parameter {local}: shard shape {list(part.shape)} != model shape {list(param.shape)}")
        param.copy_(part)


@torch.no_grad()
def gather_full_state(model: torch.nn.Module, arch: LlamaArch, pg: ProcessGroupCollection) -> dict[str, torch.Tensor]:
    """This PP stage's parameters as megatron full tensors (TP shards all-gathered), keyed by global name.

    Collective over the TP group; every TP rank gets the result.
    """
    return dict(iter_full_params(model, arch, pg))


def iter_full_params(model: torch.nn.Module, arch: LlamaArch, pg: ProcessGroupCollection, *, meta: bool = False):
    """(global name, megatron full tensor) of this PP stage's parameters, one at a time, so that at most one full
    tensor is alive (the streamed HF export). Collective over the TP group, in parameter order. `meta`: shapes
    and dtypes only (meta tensors), no communication."""
    tp = pg.tp.size()
    split = pipeline_split(model)
    head = getattr(unwrap(model), "output_layer", None)
    for local, param in unwrap(model).named_parameters():
        if local == TIED_OUTPUT and arch.tie_word_embeddings:
            continue  # the embedding (first stage) is the source of truth for a tied model
        name = _full_name(local, arch, pg, split)
        if tp == 1 or isinstance(head, ValueHead) and param is head.weight:  # a value head is replicated
            full = torch.empty_like(param, device="meta") if meta else param.detach().clone()
        elif meta:
            full = hf_mapping.unshard(name, [torch.empty_like(param, device="meta")] * tp)
        else:
            shards = [torch.empty_like(param) for _ in range(tp)]
            dist.all_gather(shards, param.detach().contiguous(), group=pg.tp)
            full = hf_mapping.unshard(name, shards)
        yield name, full


def full_state_to_hf(full: dict[str, torch.Tensor], arch: LlamaArch) -> dict[str, torch.Tensor]:
    hf: dict[str, torch.Tensor] = {}
    for name, tensor in full.items():
        hf.update(hf_mapping.mcore_full_to_hf(name, tensor, arch))
    return hf


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
