"""Plain-torch twin of `triton_rows.py`, used where Triton cannot run (see `backend.row_ops`).

Same functions, signatures, formulas and output layouts as the Triton kernels (the formulas are in that
module's docstring); the row is upcast to fp32 as a whole instead of streamed block by block.
"""

from __future__ import annotations

import torch

# Same sentinel as the Triton kernels: the running max of a shard with no valid column.
NEG_BIG = -1.0e30


def _scaled(logits: torch.Tensor, n_valid: int, inv_temp: float) -> torch.Tensor:
    return logits.reshape(-1, logits.shape[-1])[:, :n_valid].float() * inv_temp


def _label_columns(labels: torch.Tensor, vocab_start: int, n_valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    local = labels - vocab_start
    has_label = (local >= 0) & (local < n_valid)
    return local.clamp(0, max(n_valid - 1, 0)), has_label


def row_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    n_valid: int,
    inv_temp: float,
    finalize: bool,
) -> torch.Tensor:
    """See `triton_rows.row_stats`."""
    z = _scaled(logits, n_valid, inv_temp)
    n_rows = z.shape[0]
    if n_valid == 0:
        m = torch.full((n_rows,), NEG_BIG, dtype=torch.float32, device=logits.device)
    else:
        m = z.amax(dim=-1).clamp_min(NEG_BIG)
    e = torch.exp(z - m[:, None])
    shifted = torch.where(e > 0, z - m[:, None], torch.zeros_like(z))
    s0 = e.sum(dim=-1)
    s1 = (shifted * e).sum(dim=-1)
    local, has_label = _label_columns(labels, vocab_start, n_valid)
    if n_valid == 0:
        z_y = torch.zeros_like(m)
    else:
        z_y = torch.where(has_label, z.gather(1, local[:, None]).squeeze(1), torch.zeros_like(m))
    if not finalize:
        return torch.stack([m, s0, s1, z_y])
    lse = m + torch.log(s0)
    logp = torch.where(has_label, z_y - lse, torch.zeros_like(lse))
    return torch.stack([logp, lse, torch.log(s0) - s1 / s0])


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
    """See `triton_rows.logits_grad`."""
    logp = _scaled(logits, n_valid, inv_temp) - lse[:, None]
    p = torch.exp(logp)
    g = -g_lp[:, None] * p
    if g_ent is not None:
        g -= g_ent[:, None] * p * (torch.where(p > 0, logp, torch.zeros_like(logp)) + ent[:, None])
    local, has_label = _label_columns(labels, vocab_start, n_valid)
    if n_valid > 0:
        g.scatter_add_(1, local[:, None], torch.where(has_label, g_lp, torch.zeros_like(g_lp))[:, None])
    if out is None:
        out = torch.empty((g.shape[0], logits.shape[-1]), dtype=logits.dtype, device=logits.device)
    out[:, n_valid:] = 0
    out[:, :n_valid] = g * inv_temp
    return out
