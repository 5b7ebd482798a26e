"""Fused kernels for RLVR losses: token log-probs, entropy, KL and the clipped policy loss over
(vocab-parallel) logits, with Triton kernels and plain-torch twins chosen in `backend.py`.

- `token_logprobs`: log-probs (and entropy) of labels from `[..., V_local]` logits.
- `linear_token_logprobs`: the same from hidden states and the output weight, without a `[T, V]` buffer.
- `kl_estimate`: k1/k2/k3 per-token KL estimators.
- `fused_policy_loss`: PPO/GRPO clipped loss with KL and entropy terms, straight from the logits.
"""

from .kl import KL_ESTIMATORS, kl_estimate
from .linear_logprobs import linear_token_logprobs
from .policy_loss import fused_policy_loss
from .token_logprobs import token_logprobs

__all__ = ["KL_ESTIMATORS", "fused_policy_loss", "kl_estimate", "linear_token_logprobs", "token_logprobs"]
