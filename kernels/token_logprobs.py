"""Fused token log-probs and entropy over (possibly vocab-parallel) logits.

For each token with logits `x [V]`, temperature `tau` and label `y`:

    log p_y = x_y / tau - logsumexp(x / tau),      H = -sum_j p_j log p_j,    p = softmax(x / tau).

Forward reads the logits once (one online pass per row, fp32 statistics) and, with a tensor-parallel
`group`, does one all-gather of 4 floats per token (`vocab_parallel.py`). Backward reads the logits once
more and writes dL/dlogits in the logits dtype, including the entropy term when the entropy reaches the
loss; it needs no collective. The formulas are in `triton_rows.py`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .backend import row_ops
from .vocab_parallel import VocabShard, combine_row_stats, label_is_valid, vocab_shard

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def token_logprobs_forward(
    logits: torch.Tensor, labels: torch.Tensor, shard: VocabShard, inv_temp: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(log p_y, lse, H)`, fp32 `[N]`, for `logits` `[N, V_local]` or `[B, S, V_local]` (unit column
    stride, see `as_rows`) and `labels [N]`."""
    stats = row_ops(logits).row_stats(
        logits, labels, shard.start, shard.n_valid, inv_temp, finalize=shard.group is None
    )
    return combine_row_stats(stats, labels, shard)


def token_logprobs_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    shard: VocabShard,
    inv_temp: float,
    lse: torch.Tensor,
    ent: torch.Tensor,
    g_lp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """dL/dlogits, contiguous `[N, V_local]`, from the forward's `lse`, `H` and upstream `g_lp`, `g_ent`
    (None: zero). `out` may alias 2-D `logits` (the gradient overwrites the logits it came from).
    """
    if g_lp is None:
        g_lp = torch.zeros_like(lse)
    else:
        g_lp = torch.where(label_is_valid(labels, shard), g_lp.float(), torch.zeros_like(lse)).contiguous()
    if g_ent is not None:
        g_ent = g_ent.float().contiguous()
    return row_ops(logits).logits_grad(
        logits, labels, shard.start, shard.n_valid, inv_temp, lse, ent, g_lp, g_ent, out=out
    )


class TokenLogprobsFunction(torch.autograd.Function):
    """`(log p_y, H) = f(logits)`, logits as in `as_rows`; labels, shard and temperature are constants."""

    @staticmethod
    def forward(ctx, logits, labels, shard: VocabShard, inv_temp: float):
        logp, lse, ent = token_logprobs_forward(logits, labels, shard, inv_temp)
        ctx.save_for_backward(logits, labels, lse, ent)
        ctx.shard = shard
        ctx.inv_temp = inv_temp
        # An output that does not reach the loss arrives as None, so its term is skipped in the kernel.
        ctx.set_materialize_grads(False)
        # logp and ent are rows of one buffer: separate them so callers may modify either in place.
        return logp.clone(), ent.clone()

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        logits, labels, lse, ent = ctx.saved_tensors
        grad = token_logprobs_backward(logits, labels, ctx.shard, ctx.inv_temp, lse, ent, g_lp, g_ent)
        return grad.view(logits.shape), None, None, None


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """`logits [..., V]` as `[N, V]`, or as `[B, S, V]` when that avoids a copy (e.g. a `[:, :-1]` slice of
    `[B, S+1, V]`): the kernels take any two row strides, but need unit column stride."""
    if logits.stride(-1) == 1:
        try:
            return logits.view(-1, logits.shape[-1])
        except RuntimeError:
            if logits.dim() == 3:
                return logits
    return logits.reshape(-1, logits.shape[-1]).contiguous()


def check_logits_and_labels(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, where: str, name: str = "logits"
) -> None:
    """Raise a clear error for inputs the kernels do not take (`name`: what `logits` is called there)."""
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{where}: {name} dtype {logits.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{where}: labels must be integer vocab ids, got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"{where}: labels on {labels.device} but {name} on {logits.device}; move them together")
    if not temperature > 0:
        raise ValueError(f"{where}: temperature must be > 0, got {temperature}")


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    group: dist.ProcessGroup | None = None,
    return_entropy: bool = False,
    valid_vocab_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label (and the entropy of each token's distribution), differentiable.

    Args:
        logits: `[..., V_local]` bf16/fp16/fp32. With `group`, rank r's contiguous vocab shard
            `[r V_local, (r+1) V_local)`.
        labels: `[...]` integer global vocab ids. Labels outside `[0, valid_vocab_size)` (e.g. -100
            padding) are ignored: their log-prob is 0 and passes no gradient.
        temperature: `tau`; the distribution is `softmax(logits / tau)`.
        group: tensor-parallel process group over which the vocab is sharded; every rank gets the
            full-vocab result.
        return_entropy: also return `H = -sum_j p_j log p_j`.
        valid_vocab_size: global vocab size without padding; columns at or past it are treated as -inf
            (megatron pads the vocab to a multiple of the TP size). Default: no padding.

    Returns:
        fp32 `log p_y` of shape `labels.shape`, and fp32 `H` of the same shape if `return_entropy`.
    """
    check_logits_and_labels(logits, labels, temperature, "token_logprobs")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"token_logprobs: labels shape {tuple(labels.shape)} must equal logits shape without the vocab "
            f"dim {tuple(logits.shape[:-1])}"
        )
    shard = vocab_shard(logits.shape[-1], group, valid_vocab_size)
    logp, ent = TokenLogprobsFunction.apply(
        as_rows(logits), labels.reshape(-1).long().contiguous(), shard, 1.0 / temperature
    )
    logp = logp.view(labels.shape)
    return (logp, ent.view(labels.shape)) if return_entropy else logp
