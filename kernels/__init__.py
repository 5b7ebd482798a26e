"""Fused kernels for RLVR losses: token log-probs, entropy and KL over (vocab-parallel) logits, with Triton kernels
and plain-torch twins chosen in `backend.py`. The trainer's passes use `token_logprobs` (`models/forward.py`) and
`kl_estimate` (`algorithms/kl.py`); `linear_token_logprobs` where `model.fused_output_logprobs` is set.

- `token_logprobs`: log-probs (and entropy) of labels from `[..., V_local]` logits.
- `linear_token_logprobs`: the same from hidden states and the output weight, without a `[T, V]` buffer.
- `kl_estimate`: k1/k2/k3 per-token KL estimators.
"""

from .kl import KL_ESTIMATORS, kl_estimate
from .linear_logprobs import linear_token_logprobs
from .token_logprobs import token_logprobs

__all__ = ["KL_ESTIMATORS", "kl_estimate", "linear_token_logprobs", "token_logprobs"]
