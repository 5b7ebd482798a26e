"""The PPO value model on tensor/pipeline groups of its own, over the policy's training ranks.

Tülu 3's 405B run trains a 126-layer policy beside an 8B (32-layer) value model; on the policy's groups one PP
would have to divide both layer counts. Here the value model gets its own TP x PP x DP grid
(`parallel.value_tensor_parallel`, `parallel.value_pipeline_parallel`) over the same ranks: a second
`ProcessGroupCollection` (`parallel.groups.value_groups`) that its model, DDP, optimizer and
forward/backward schedule (`models.forward.forward_backward(..., pg=value_pg)`) are given.

Its data-parallel ranks are not the policy's, so each value-DP rank takes its own share of the prompt groups
(`prompt_share`, balanced by tokens), and `gather_rows` gives every training rank the rows the others computed (values to the
policy ranks for the advantages; returns back to the value ranks for their update).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_rlvr.config import JobConfig


def value_model_path(cfg: JobConfig) -> str:
    return cfg.model.value_path or cfg.model.path


def build_value_model(cfg: JobConfig, pg: ProcessGroupCollection):
    """(value model (DDP-wrapped stage), its optimizer) on the value model's grid `pg` (`parallel.Groups.value`).

    The trunk is the HF Llama at `model.value_path` (the policy's weights when empty); the scalar head starts at
    zero. The value model uses an even pipeline split of its own layers."""
    from megatron_rlvr.models.gguf import DTYPES
    from megatron_rlvr.models.llama import LlamaArch, build_llama, transformer_config
    from megatron_rlvr.models.weights import load_hf_into_model, read_hf_state
    from megatron_rlvr.parallel.model import make_trainable

    path = value_model_path(cfg)
    arch = LlamaArch.from_pretrained(path)
    config = transformer_config(arch, tp=pg.tp.size(), pp=pg.pp.size(), sequence_parallel=cfg.parallel.sequence_parallel,
                                params_dtype=DTYPES[cfg.model.dtype], recompute=cfg.model.recompute)
    model = build_llama(arch, config, pg, pad_vocab_multiple=cfg.model.pad_vocab_multiple, value_head=True)
    load_hf_into_model(model, read_hf_state(path), arch, pg)
    model, optimizer = make_trainable(model, pg, cfg.train.value_optimizer,
                                      use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    return model, optimizer


def prompt_share(pg: ProcessGroupCollection, samples, prompts_per_step: int) -> list[int]:
    """The prompt indices of a step that this rank's data-parallel replica (of `pg`'s grid) works on: whole
    prompt groups, as many per replica, spread by the balanced partition of their tokens (prompt + responses;
    `data.partition`, the compiled one where built) so the replicas get near-equal work. Every rank computes the
    same partition from the same samples."""
    from megatron_rlvr.data.partition import partition

    tokens = [0] * prompts_per_step
    for sample in samples:
        if not 0 <= sample.prompt_index < prompts_per_step:
            raise ValueError(f"sample of prompt {sample.prompt_index} outside the step's {prompts_per_step} prompts")
        tokens[sample.prompt_index] += len(sample.prompt_ids) + len(sample.response_ids)
    return partition(tokens, pg.dp.size(), equal_size=True)[pg.dp.rank()]


def gather_rows(local: torch.Tensor, index: Sequence[int], total: int, group) -> torch.Tensor:
    """Every rank of `group` holds some rows of a `[total, W]` tensor (`local[i]` is row `index[i]`); returns the
    whole tensor on every rank, narrower rows padded with zeros on the right. Collective over `group` (a
    data-parallel group: its ranks hold disjoint rows; rows no rank holds stay zero)."""
    if local.dim() != 2 or local.shape[0] != len(index):
        raise ValueError(f"gather_rows: local has shape {list(local.shape)} but {len(index)} row indices")
    size = torch.tensor([local.shape[0], local.shape[1]], dtype=torch.long, device=local.device)
    sizes = [torch.empty_like(size) for _ in range(group.size())]
    dist.all_gather(sizes, size, group=group)
    rows, width = (max(int(s[i]) for s in sizes) for i in range(2))
    padded = local.new_zeros(rows, width)
    padded[: local.shape[0], : local.shape[1]] = local
    where = torch.full((rows,), -1, dtype=torch.long, device=local.device)
    where[: len(index)] = torch.as_tensor(list(index), dtype=torch.long, device=local.device)
    parts = [torch.empty_like(padded) for _ in range(group.size())]
    places = [torch.empty_like(where) for _ in range(group.size())]
    dist.all_gather(parts, padded, group=group)
    dist.all_gather(places, where, group=group)
    out = local.new_zeros(total, width)
    for part, place in zip(parts, places):
        keep = place >= 0
        out[place[keep]] = part[keep]
    return out
