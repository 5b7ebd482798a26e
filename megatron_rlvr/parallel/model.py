"""Where a built model becomes trainable: data-parallel wrapping, the distributed optimizer, gradient hooks.

Tensor and pipeline parallelism are decided when the model is built (`models.llama.build_llama` under the
`ProcessGroupCollection` of `parallel.state.init_model_parallel`); data parallelism, the (optionally
distributed) optimizer and megatron-core's gradient finalisation are applied here, in this order.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_rlvr.config import OptimizerConfig


def make_trainable(
    model: torch.nn.Module,
    pg: ProcessGroupCollection,
    optim: OptimizerConfig,
    *,
    use_distributed_optimizer: bool = False,
) -> tuple[DistributedDataParallel, object]:
    """Wrap `model` in megatron-core DDP and build its optimizer; gradients reduce in fp32.

    `use_distributed_optimizer` shards the optimizer state over the data-parallel group (megatron-core's
    distributed optimizer). Warm-up (`optim.warmup_steps`) is the training loop's, which sets the lr per step."""
    config = model.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model, pg_collection=pg)
    # the pipeline schedule calls these: skip DP grad sync until the last micro-batch, then finalise grads
    # (DP all-reduce, sequence-parallel norm grads over TP, tied embedding grads over the embedding group)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = partial(finalize_model_grads, pg_collection=pg)
    opt_config = MegatronOptimizerConfig(
        optimizer=optim.name,
        lr=optim.lr,
        min_lr=optim.lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        use_distributed_optimizer=use_distributed_optimizer,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
    )
    # use_gloo_process_groups: extra CPU-side groups megatron wants only without explicit groups
    with _training_ranks_as_world(pg):
        optimizer = get_megatron_optimizer(opt_config, [ddp], use_gloo_process_groups=False, pg_collection=pg)
    return ddp, optimizer


def _training_ranks_as_world(pg: ProcessGroupCollection):
    """megatron-core's optimizer factory all-gathers parameter-group keys over the default group (the world):
    when the model's grid covers only part of the world (split layout), let its ranks be the world meanwhile."""
    if pg.intra_dist_opt.size() == dist.get_world_size():
        return contextlib.nullcontext()
    from megatron_rlvr.parallel.layout import group_as_world

    return group_as_world(pg.intra_dist_opt)
