"""Advantage estimators, registered by name.

Every estimator is `fn(token_level_rewards [B, T], response_mask [B, T], **inputs) -> (advantages, returns)`,
both `[B, T]` and zero where the mask is 0. `token_level_rewards` holds the verifier score on the last response
token plus any per-token terms (a KL penalty); outcome-level estimators use a sequence's score
s_i = sum_t r_it m_it. Group ids (one per sequence, any hashable or an integer tensor) mark the samples drawn
from the same prompt; groups may be of unequal size and must have at least two samples.
"""

import inspect

import torch

from .masked import GroupIds, group_mean_std, masked_whiten
from .registry import get_advantage_estimator, register_advantage_estimator


def _reverse_scan(x: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """y_t = x_t + discount * y_next(t) at masked-in positions, where next(t) is the next masked-in position.

    Masked-out positions carry y_next(t) through, so a token the policy did not produce (padding, or text spliced
    into the response) neither receives credit nor breaks the recursion between the tokens around it.
    The step is written as y_t = y_{t+1} + m_t * (x_t + (discount - 1) * y_{t+1}) over time-major rows, two
    kernels per position, because the loop over T is launch-bound on a GPU.
    """
    x_t = x.t().contiguous()
    mask_t = mask.t().to(x.dtype).contiguous()
    out = torch.empty_like(x_t)
    running = torch.zeros_like(x_t[0])
    for t in reversed(range(x_t.shape[0])):
        step = torch.add(x_t[t], running, alpha=discount - 1.0)
        running = torch.addcmul(running, mask_t[t], step, out=out[t])
    return out.t()


def _outcome_scores(token_level_rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    return (token_level_rewards * response_mask).sum(-1)


def _per_token(seq_values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    return seq_values.unsqueeze(-1) * response_mask


@register_advantage_estimator("gae")
def gae_advantages(token_level_rewards, response_mask, *, values, gamma: float = 1.0, lam: float = 1.0,
                   whiten: bool = True):
    """Generalized advantage estimation (Schulman et al., 2016), the PPO estimator.

        delta_t = r_t + gamma * V_{t+1} - V_t          (V past the last response token is 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                            (value-model target)

    then A is whitened over the batch's response tokens when `whiten`. The estimator only sees the value tensor
    `values [B, T]` (the value head's output at each response position), so the value model may be smaller
    than the policy or differently parallelised: only the shape has to match the rewards.
    """
    if values.shape != token_level_rewards.shape:
        raise ValueError(
            f"GAE: values {tuple(values.shape)} must match token_level_rewards {tuple(token_level_rewards.shape)} "
            "(one value per response token; slice the value model's output to the response positions)"
        )
    mask = response_mask.to(values.dtype)
    values = values.detach()
    next_values = torch.zeros_like(values)
    next_values[:, :-1] = _reverse_scan(values, mask, 0.0)[:, 1:]
    deltas = token_level_rewards + gamma * next_values - values
    advantages = _reverse_scan(deltas, mask, gamma * lam) * mask
    returns = (advantages + values) * mask
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


@register_advantage_estimator("grpo")
def grpo_advantages(token_level_rewards, response_mask, *, group_ids: GroupIds, norm_by_std: bool = True,
                    eps: float = 1e-6):
    """Group-relative advantage (GRPO, Shao et al., 2024), the same for every token of a response:

        A_i = (s_i - mean_g(s)) / (std_g(s) + eps)     with norm_by_std
        A_i =  s_i - mean_g(s)                         without (Dr.GRPO)

    mean_g and std_g are over the sequences sharing i's group id; std is Bessel-corrected (torch.std).
    A group whose rewards are all equal gets A = 0. Returns equal advantages (there is no value model).
    """
    scores = _outcome_scores(token_level_rewards, response_mask)
    mean, std, _ = group_mean_std(scores, group_ids, min_group_size=2)
    centred = scores - mean
    seq_adv = centred
    if norm_by_std:
        # all-equal groups have centred == 0 exactly; keep them 0 whatever eps is
        seq_adv = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    advantages = _per_token(seq_adv, response_mask)
    return advantages, advantages


@register_advantage_estimator("dr_grpo")
def dr_grpo_advantages(token_level_rewards, response_mask, *, group_ids: GroupIds):
    """Dr.GRPO (Liu et al., 2025): A_i = s_i - mean_g(s), no division by the group std.

    Its other half, no per-sequence length normalisation, is the loss aggregation `seq-mean-token-sum-norm`.
    """
    return grpo_advantages(token_level_rewards, response_mask, group_ids=group_ids, norm_by_std=False)


@register_advantage_estimator("rloo")
def rloo_advantages(token_level_rewards, response_mask, *, group_ids: GroupIds):
    """REINFORCE leave-one-out (Ahmadian et al., 2024): the baseline of sample i is the mean of the others,

        A_i = s_i - (sum_{j in g, j != i} s_j) / (n_g - 1) = n_g / (n_g - 1) * (s_i - mean_g(s))
    """
    scores = _outcome_scores(token_level_rewards, response_mask)
    mean, _, count = group_mean_std(scores, group_ids, min_group_size=2)
    seq_adv = scores - (mean * count - scores) / (count - 1)
    advantages = _per_token(seq_adv, response_mask)
    return advantages, advantages


@register_advantage_estimator("reinforce_plus_plus")
def reinforce_plus_plus_advantages(token_level_rewards, response_mask, *, gamma: float = 1.0):
    """REINFORCE++ (Hu, 2025): discounted return-to-go, whitened over the batch's response tokens.

        G_t = r_t + gamma * G_{t+1}        A = (G - mean(G)) / std(G)

    Returns G (unwhitened). The statistics are over the local batch.
    """
    mask = response_mask.to(token_level_rewards.dtype)
    returns = _reverse_scan(token_level_rewards, mask, gamma) * mask
    return masked_whiten(returns, mask), returns


@register_advantage_estimator("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline_advantages(token_level_rewards, response_mask, *, group_ids: GroupIds):
    """REINFORCE++ with a group-mean baseline: A'_i = s_i - mean_g(s) on every token of response i, then
    A = (A' - mean(A')) / std(A') over the batch's response tokens. Returns A' (before whitening).
    """
    scores = _outcome_scores(token_level_rewards, response_mask)
    mean, _, _ = group_mean_std(scores, group_ids, min_group_size=2)
    mask = response_mask.to(scores.dtype)
    centred = _per_token(scores - mean, mask)
    return masked_whiten(centred, mask), centred


def compute_advantages(name: str, token_level_rewards, response_mask, **inputs):
    """Run the estimator registered as `name`, passing it only the `inputs` its signature names.

    The trainer can hand every estimator the same inputs (values, group_ids, gamma, lam, ...); a None input
    counts as not given (so an estimator default applies), and a required one that is missing raises a
    ValueError naming it.
    """
    fn = get_advantage_estimator(name)
    params = inspect.signature(fn).parameters
    accepted = {k: v for k, v in inputs.items() if k in params and v is not None}
    missing = [
        p.name for p in params.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty and p.name not in accepted
    ]
    if missing:
        raise ValueError(f"advantage estimator {name!r} needs {', '.join(missing)}, which the caller did not pass")
    return fn(token_level_rewards, response_mask, **accepted)
