"""Per-token estimators of KL(pi || pi_ref) from sampled-token log-probs (Schulman, "Approximating KL
Divergence", 2020).

With `d = log pi(y) - log pi_ref(y)` for a token y sampled from pi and `r = -d`:

    k1 = d                                 unbiased, high variance, can be negative
    k2 = d^2 / 2                           biased, low variance, >= 0
    k3 = exp(r) - 1 - r                    unbiased, low variance, >= 0

Gradients w.r.t. `log pi(y)`: `dk1 = 1`, `dk2 = d`, `dk3 = 1 - exp(r)`. These are elementwise on `[T]`
tensors, so plain torch ops (autograd gives the exact gradients above) cost nothing next to the
`[T, V]` log-prob kernels. k3 is evaluated as `expm1(r) - r`, which keeps its precision for small `r`.
"""

from __future__ import annotations

from typing import Callable

import torch


def _k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


def _k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio.square()


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    r = -log_ratio
    return torch.expm1(r) - r


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Elementwise KL estimate `kind` in {"k1", "k2", "k3"} (see the module docstring) of policy `logp`
    against reference `ref_logp`; differentiable w.r.t. both."""
    try:
        estimator = KL_ESTIMATORS[kind]
    except KeyError:
        raise ValueError(f"kl_estimate: unknown kind {kind!r}; known kinds: {', '.join(KL_ESTIMATORS)}") from None
    if logp.shape != ref_logp.shape:
        raise ValueError(f"kl_estimate: logp shape {tuple(logp.shape)} != ref_logp shape {tuple(ref_logp.shape)}")
    return estimator(logp - ref_logp)
