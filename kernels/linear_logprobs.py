"""Token log-probs and entropy straight from the last hidden states and the output-layer weight, without
materialising the `[T, V]` logits.

`logits = hidden @ weight.T` is formed a chunk of tokens at a time in a workspace of at most
`workspace_bytes` (the chunk's logits, in the hidden dtype), and reduced to per-token statistics by the same
row kernels as `token_logprobs`. Backward recomputes each chunk's logits, turns them into dL/dlogits in
place (row kernel) and applies

    dL/dhidden = dL/dlogits @ weight,        dL/dweight = sum over chunks of dL/dlogits^T @ hidden,

so memory stays O(T + workspace) on top of the inputs and their gradients. Cost: 3 matmuls of
`2 T V H` flops for the gradients plus 1 for the recompute (the floor is 3).

With a tensor-parallel `group`, `weight` is this rank's vocab shard and `hidden` is the same on every rank
(the input of a column-parallel output layer). The row statistics are merged with one all-gather as in
`vocab_parallel.py`; `dL/dhidden` is all-reduced over the group (each shard contributes a partial sum),
so do not also route `hidden` through megatron's `copy_to_tensor_model_parallel_region`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .backend import row_ops
from .token_logprobs import check_logits_and_labels, token_logprobs_backward
from .vocab_parallel import VocabShard, combine_row_stats, vocab_shard

DEFAULT_WORKSPACE_BYTES = 256 * 2**20


def _chunks(n_tokens: int, chunk_tokens: int):
    for start in range(0, n_tokens, chunk_tokens):
        yield slice(start, min(start + chunk_tokens, n_tokens))


def _optional_slice(tensor: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if tensor is None else tensor[rows]


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """`(log p_y, H) = f(hidden [T, H], weight [V_local, H])`; labels, shard, temperature are constants."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, shard: VocabShard, inv_temp: float, chunk_tokens: int):
        ops = row_ops(hidden)
        finalize = shard.group is None
        stats = torch.empty((3 if finalize else 4, hidden.shape[0]), dtype=torch.float32, device=hidden.device)
        for rows in _chunks(hidden.shape[0], chunk_tokens):
            logits = torch.mm(hidden[rows], weight.t())
            stats[:, rows] = ops.row_stats(logits, labels[rows], shard.start, shard.n_valid, inv_temp, finalize)
        logp, lse, ent = combine_row_stats(stats, labels, shard)
        ctx.save_for_backward(hidden, weight, labels, lse, ent)
        ctx.shard, ctx.inv_temp, ctx.chunk_tokens = shard, inv_temp, chunk_tokens
        ctx.set_materialize_grads(False)
        return logp.clone(), ent.clone()

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, labels, lse, ent = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        for rows in _chunks(hidden.shape[0], ctx.chunk_tokens):
            logits = torch.mm(hidden[rows], weight.t())
            grad_logits = token_logprobs_backward(
                logits,
                labels[rows],
                ctx.shard,
                ctx.inv_temp,
                lse[rows],
                ent[rows],
                _optional_slice(g_lp, rows),
                _optional_slice(g_ent, rows),
                out=logits,
            )
            if need_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), hidden[rows])
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
        workspace_bytes: bound on the per-chunk logits buffer; the chunk holds
            `max(1, workspace_bytes // (V_local * itemsize))` tokens.
        temperature, group, return_entropy, valid_vocab_size: as in `token_logprobs`.

    Returns:
        fp32 `log p_y` of shape `labels.shape` (and fp32 entropy of the same shape if `return_entropy`).
        Gradients flow to `hidden` (summed over `group`) and `weight` (accumulated in its dtype).
    """
    check_logits_and_labels(hidden, labels, temperature, "linear_token_logprobs")
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
    n_local = weight.shape[0]
    chunk_tokens = max(1, workspace_bytes // (n_local * hidden.element_size()))
    shard = vocab_shard(n_local, group, valid_vocab_size)
    logp, ent = LinearTokenLogprobsFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1).long().contiguous(),
        shard,
        1.0 / temperature,
        chunk_tokens,
    )
    logp = logp.view(labels.shape)
    return (logp, ent.view(labels.shape)) if return_entropy else logp
