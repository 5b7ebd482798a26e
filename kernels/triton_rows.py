"""Triton kernels for the per-row softmax statistics behind token log-probs and entropy, and their gradient.

Notation for one row (one token) of a vocab shard: `x_j` the logits, `z_j = x_j / tau` with temperature
`tau`, `y` the label. Columns at or past `n_valid` (vocab padding) count as `z_j = -inf`.

`row_stats` makes ONE pass over the row and keeps an online (running max `m`, `s0 = sum_j exp(z_j - m)`,
`s1 = sum_j (z_j - m) exp(z_j - m)`, label logit `z_y`) in fp32. When the running max moves from `m` to
`m'`, with `a = exp(m - m')`: `s0' = a s0` and `s1' = a (s1 + (m - m') s0)`. Keeping `s1` relative to the
max avoids the cancellation of `lse - E[z]` for large logits. From the statistics:

    lse = m + log s0,    log p_y = z_y - lse,    H = -sum_j p_j log p_j = log s0 - s1 / s0.

`logits_grad` reads the row once more and writes, in the logits dtype,

    dL/dx_j = (1/tau) * ( g_lp (1[j = y] - p_j)  -  g_H p_j (log p_j + H) ),    p_j = exp(z_j - lse),

for the upstream gradients `g_lp = dL/dlog p_y` and `g_H = dL/dH` of the row. Row offsets are int64, so
tensors with more than 2^31 elements are addressed correctly.

Both functions have a plain-torch twin with the same signature in `torch_rows.py`; `backend.row_ops`
picks one.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Running-max sentinel: finite, so that empty shards merge without inf - inf, and far below any logit.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _row_offset(row, n_inner, outer_stride, inner_stride):
    outer = row // n_inner
    return outer * outer_stride + (row - outer * n_inner) * inner_stride


@triton.jit
def _row_stats_kernel(
    logits_ptr,
    n_inner,
    outer_stride,
    inner_stride,
    labels_ptr,
    out_ptr,
    n_rows,
    n_valid,
    vocab_start,
    inv_temp,
    FINALIZE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, n_inner, outer_stride, inner_stride)
    m = NEG_BIG
    s0 = 0.0
    s1 = 0.0
    for start in range(0, n_valid, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < n_valid, other=float("-inf"))
        z = x.to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        e = tl.exp(z - m_new)
        # (z - m') * e is -inf * 0 for masked or -inf logits; those terms are 0.
        shifted = tl.where(e > 0.0, z - m_new, 0.0)
        alpha = tl.exp(m - m_new)
        s1 = alpha * (s1 + (m - m_new) * s0) + tl.sum(shifted * e, axis=0)
        s0 = alpha * s0 + tl.sum(e, axis=0)
        m = m_new

    local = tl.load(labels_ptr + row) - vocab_start
    has_label = (local >= 0) & (local < n_valid)
    z_y = tl.load(row_ptr + tl.where(has_label, local, 0), mask=has_label, other=0.0).to(tl.float32) * inv_temp
    z_y = tl.where(has_label, z_y, 0.0)
    if FINALIZE:
        lse = m + tl.log(s0)
        tl.store(out_ptr + row, tl.where(has_label, z_y - lse, 0.0))
        tl.store(out_ptr + n_rows + row, lse)
        tl.store(out_ptr + 2 * n_rows + row, tl.log(s0) - s1 / s0)
    else:
        tl.store(out_ptr + row, m)
        tl.store(out_ptr + n_rows + row, s0)
        tl.store(out_ptr + 2 * n_rows + row, s1)
        tl.store(out_ptr + 3 * n_rows + row, z_y)


@triton.jit
def _logits_grad_kernel(
    logits_ptr,
    n_inner,
    outer_stride,
    inner_stride,
    grad_ptr,
    grad_row_stride,
    labels_ptr,
    lse_ptr,
    ent_ptr,
    g_lp_ptr,
    g_ent_ptr,
    n_cols,
    n_valid,
    vocab_start,
    inv_temp,
    HAS_ENT_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, n_inner, outer_stride, inner_stride)
    grad_row_ptr = grad_ptr + row * grad_row_stride
    local = tl.load(labels_ptr + row) - vocab_start
    lse = tl.load(lse_ptr + row)
    g_lp = tl.load(g_lp_ptr + row)
    if HAS_ENT_GRAD:
        ent = tl.load(ent_ptr + row)
        g_ent = tl.load(g_ent_ptr + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < n_valid, other=float("-inf"))
        logp = x.to(tl.float32) * inv_temp - lse
        p = tl.exp(logp)
        g = tl.where(cols == local, g_lp, 0.0) - g_lp * p
        if HAS_ENT_GRAD:
            g -= g_ent * p * (tl.where(p > 0.0, logp, 0.0) + ent)
        tl.store(grad_row_ptr + cols, (g * inv_temp).to(grad_ptr.dtype.element_ty), mask=cols < n_cols)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_config(n_cols: int, kernel: str) -> dict:
    """Block size and warps for a row of `n_cols` logits in `kernel` ("stats" or "grad").

    On a GPU both kernels are bound by memory bandwidth. Measured on an H100 (T=16384, V=128256, bf16):
    4096-column blocks run the stats pass at 1.02x the time of one read of the logits with 4 warps (8
    warps: 1.15x, the per-block reductions then cost more than they hide), and the gradient pass at 1.05x
    its read+write floor with 16 warps. The interpreter runs each block as numpy operations, so small
    blocks keep tests fast and exercise rows of several blocks.
    """
    if _interpreting():
        return {"BLOCK_V": min(64, triton.next_power_of_2(max(n_cols, 1))), "num_warps": 1}
    block = min(4096, triton.next_power_of_2(max(n_cols, 1)))
    if kernel == "stats":
        return {"BLOCK_V": block, "num_warps": 4}
    return {"BLOCK_V": block, "num_warps": 16 if block >= 4096 else 4}


def _row_layout(logits: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows, rows per outer index, outer stride, inner stride) of `[N, V]` or `[B, S, V]` logits."""
    if logits.dim() == 2:
        return logits.shape[0], max(logits.shape[0], 1), 0, logits.stride(0)
    return logits.shape[0] * logits.shape[1], max(logits.shape[1], 1), logits.stride(0), logits.stride(1)


def row_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    n_valid: int,
    inv_temp: float,
    finalize: bool,
) -> torch.Tensor:
    """Per-row statistics of `logits` `[N, V_local]` or `[B, S, V_local]` (rows N = B S, any row strides,
    unit column stride) in one pass; see the module docstring.

    Returns fp32 `[3, N]` rows (log p_y, lse, H) when `finalize` (the shard is the whole vocab), else
    `[4, N]` rows (m, s0, s1, z_y) to be merged across vocab shards. `labels [N]` are global ids; a label
    outside `[vocab_start, vocab_start + n_valid)` has z_y = 0 and, when finalized, log p_y = 0.
    """
    n_rows, n_inner, outer_stride, inner_stride = _row_layout(logits)
    out = torch.empty((3 if finalize else 4, n_rows), dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return out
    _row_stats_kernel[(n_rows,)](
        logits,
        n_inner,
        outer_stride,
        inner_stride,
        labels,
        out,
        n_rows,
        n_valid,
        vocab_start,
        inv_temp,
        FINALIZE=finalize,
        **launch_config(n_valid, "stats"),
    )
    return out


def logits_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    n_valid: int,
    inv_temp: float,
    lse: torch.Tensor,
    ent: torch.Tensor,
    g_lp: torch.Tensor,
    g_ent: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """dL/dlogits, contiguous `[N, V_local]` in the logits dtype, from the row results (lse, H) and the
    upstream gradients; `logits` as in `row_stats`.

    `g_lp [N]` must already be 0 on rows whose label is ignored; `g_ent=None` skips the entropy term.
    `out` may be 2-D `logits` itself: each element is read before the same thread overwrites it.
    """
    n_rows, n_inner, outer_stride, inner_stride = _row_layout(logits)
    n_cols = logits.shape[-1]
    if out is None:
        out = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if n_rows == 0:
        return out
    _logits_grad_kernel[(n_rows,)](
        logits,
        n_inner,
        outer_stride,
        inner_stride,
        out,
        out.stride(0),
        labels,
        lse,
        ent,
        g_lp,
        g_lp if g_ent is None else g_ent,
        n_cols,
        n_valid,
        vocab_start,
        inv_temp,
        HAS_ENT_GRAD=g_ent is not None,
        **launch_config(n_cols, "grad"),
    )
    return out
