"""Token log-probs and entropy straight from the last hidden states and the output-layer weight, without
materialising the `[T, V]` logits.

`logits = hidden @ weight.T` is formed one block of `[tokens, vocab columns]` at a time in a workspace of
at most `workspace_bytes`. Blocks span all tokens and a slice of the vocab where the workspace allows (the
usual case: T=16384, V=128256, bf16 and 256 MiB give 16 vocab blocks of 8192 columns), else fewer tokens
and 128 columns. Forward reduces each block to partial row statistics with the `token_logprobs` row
kernel and merges them exactly as vocab shards are merged (`vocab_parallel.py`). Backward recomputes each
block, turns it into dL/dlogits in place with the row gradient kernel (it needs only each row's lse and
entropy, known from the forward), and applies

    dL/dhidden[rows] += dL/dlogits @ weight[cols],      dL/dweight[cols] += dL/dlogits^T @ hidden[rows].

With vocab blocks over all tokens, dL/dweight is written once per block and only the `[T, H]` dL/dhidden
is accumulated, so the extra memory traffic stays small. Cost: 4 matmuls of `2 T V H` flops (the forward,
the recompute and the two gradients; the floor is 3) plus two passes of the row kernels over the blocks.
Memory: O(T + workspace) on top of the inputs and their gradients.

With a tensor-parallel `group`, `weight` is this rank's vocab shard and `hidden` is the same on every rank
(the input of a column-parallel output layer). Row statistics are merged with one all-gather;
`dL/dhidden` is all-reduced over the group (each shard contributes a partial sum), so do not also route
`hidden` through megatron's `copy_to_tensor_model_parallel_region`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .backend import row_ops
from .token_logprobs import check_logits_and_labels, token_logprobs_backward
from .vocab_parallel import VocabShard, column_block, combine_partial_stats, merge_partial_stats, vocab_shard

DEFAULT_WORKSPACE_BYTES = 256 * 2**20
# Vocab blocks are multiples of this many columns (aligned rows for the matmuls and row kernels).
VOCAB_BLOCK_QUANTUM = 128


def block_shape(n_tokens: int, n_vocab: int, itemsize: int, workspace_bytes: int) -> tuple[int, int]:
    """(tokens, vocab columns) of one logits block that fits `workspace_bytes`: all tokens and as many
    columns as fit (a multiple of 128), or, past ~1M tokens at the default size, 128 columns and fewer
    tokens."""
    budget = max(workspace_bytes // itemsize, 1)
    if n_tokens * n_vocab <= budget:
        return max(n_tokens, 1), max(n_vocab, 1)
    columns = budget // n_tokens // VOCAB_BLOCK_QUANTUM * VOCAB_BLOCK_QUANTUM
    if columns > 0:
        return n_tokens, min(columns, n_vocab)
    columns = min(VOCAB_BLOCK_QUANTUM, n_vocab)
    return max(budget // columns, 1), columns


def _blocks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _slice_or_none(tensor: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if tensor is None else tensor[rows]


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """`(log p_y, H) = f(hidden [T, H], weight [V_local, H])`; labels, shard, temperature are constants."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, shard: VocabShard, inv_temp: float, block: tuple[int, int]):
        ops = row_ops(hidden)
        n_tokens, n_local = hidden.shape[0], weight.shape[0]
        token_block, vocab_block = block
        vocab_slices = list(_blocks(n_local, vocab_block))
        stats = torch.empty((4, n_tokens), dtype=torch.float32, device=hidden.device)
        for rows in _blocks(n_tokens, token_block):
            partials = torch.empty((len(vocab_slices), 4, rows.stop - rows.start), dtype=torch.float32,
                                   device=hidden.device)
            for k, cols in enumerate(vocab_slices):
                part = column_block(shard, cols.start, cols.stop - cols.start)
                logits = torch.mm(hidden[rows], weight[cols].t())
                partials[k] = ops.row_stats(logits, labels[rows], part.start, part.n_valid, inv_temp, False)
            stats[:, rows] = merge_partial_stats(partials)
        logp, lse, ent = combine_partial_stats(stats, labels, shard)
        ctx.save_for_backward(hidden, weight, labels, lse, ent)
        ctx.shard, ctx.inv_temp, ctx.block = shard, inv_temp, block
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, labels, lse, ent = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        token_block, vocab_block = ctx.block
        for i, rows in enumerate(_blocks(hidden.shape[0], token_block)):
            for k, cols in enumerate(_blocks(weight.shape[0], vocab_block)):
                logits = torch.mm(hidden[rows], weight[cols].t())
                grad_logits = token_logprobs_backward(
                    logits,
                    labels[rows],
                    column_block(ctx.shard, cols.start, cols.stop - cols.start),
                    ctx.inv_temp,
                    lse[rows],
                    ent[rows],
                    _slice_or_none(g_lp, rows),
                    _slice_or_none(g_ent, rows),
                    out=logits,
                )
                if need_hidden:
                    if k == 0:
                        torch.mm(grad_logits, weight[cols], out=grad_hidden[rows])
                    else:
                        grad_hidden[rows].addmm_(grad_logits, weight[cols])
                if need_weight:
                    if i == 0:
                        torch.mm(grad_logits.t(), hidden[rows], out=grad_weight[cols])
                    else:
                        grad_weight[cols].addmm_(grad_logits.t(), hidden[rows])
        if need_hidden and ctx.shard.group is not None:
            dist.all_reduce(grad_hidden, group=ctx.shard.group)
        return grad_hidden, grad_weight, None, None, None, None


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    group: dist.ProcessGroup | None = None,
    return_entropy: bool = False,
    valid_vocab_size: int | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs(hidden @ weight.T, labels, ...)` without the `[T, V_local]` logits buffer.

    Args:
        hidden: `[..., H]` last hidden states (bf16/fp16/fp32), identical on every rank of `group`.
        weight: `[V_local, H]` output-layer weight (this rank's vocab shard with `group`), same dtype.
        labels: `[...]` global vocab ids; outside `[0, valid_vocab_size)` they are ignored (log-prob 0).
        workspace_bytes: bound on the logits block buffer (see `block_shape`).
        temperature, group, return_entropy, valid_vocab_size: as in `token_logprobs`.

    Returns:
        fp32 `log p_y` of shape `labels.shape` (and fp32 entropy of the same shape if `return_entropy`).
        Gradients flow to `hidden` (summed over `group`; accumulated over vocab blocks in its dtype) and
        `weight`.
    """
    check_logits_and_labels(hidden, labels, temperature, "linear_token_logprobs", name="hidden")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"linear_token_logprobs: weight shape {tuple(weight.shape)} must be [V_local, {hidden.shape[-1]}] "
            f"for hidden of shape {tuple(hidden.shape)}"
        )
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(
            f"linear_token_logprobs: weight ({weight.dtype}, {weight.device}) and hidden ({hidden.dtype}, "
            f"{hidden.device}) must share dtype and device"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"linear_token_logprobs: labels shape {tuple(labels.shape)} must equal hidden shape without the "
            f"hidden dim {tuple(hidden.shape[:-1])}"
        )
    if workspace_bytes <= 0:
        raise ValueError(f"linear_token_logprobs: workspace_bytes must be > 0, got {workspace_bytes}")
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    block = block_shape(hidden_2d.shape[0], weight.shape[0], hidden.element_size(), workspace_bytes)
    logp, ent = LinearTokenLogprobsFunction.apply(
        hidden_2d,
        weight,
        labels.reshape(-1).long().contiguous(),
        vocab_shard(weight.shape[0], group, valid_vocab_size),
        1.0 / temperature,
        block,
    )
    logp = logp.view(labels.shape)
    return (logp, ent.view(labels.shape)) if return_entropy else logp
