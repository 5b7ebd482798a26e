"""A step's sampled responses as the trainer's tensors: rows `[prompt | response | pad]` and per-token tensors in
the log-prob frame, where position t scores token t+1, so response token j of a row whose prompt has P tokens
sits at position P - 1 + j."""

from __future__ import annotations

import dataclasses

import torch

from megatron_rlvr.platform import current_platform


@dataclasses.dataclass
class RolloutBatch:
    """This DP rank's rows `[prompt | response | pad]` and per-token tensors in the log-prob frame `[B, S-1]`."""

    tokens: torch.Tensor  # [B, S] int64
    lengths: torch.Tensor  # [B] prompt + response tokens
    mask: torch.Tensor  # [B, S-1] float, 1 on response tokens
    rewards: torch.Tensor  # [B] shaped reward per sequence
    group_ids: list[int]  # prompt index of each row (GRPO groups)
    fields: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def token_rewards(self) -> torch.Tensor:
        """The sequence reward on its last response token."""
        out = torch.zeros_like(self.mask)
        last = (self.mask * torch.arange(1, self.mask.shape[1] + 1, device=self.mask.device)).argmax(-1)
        out[torch.arange(out.shape[0], device=out.device), last] = self.rewards.to(out.dtype)
        return out * self.mask

    def rows(self, index: torch.Tensor) -> "RolloutBatch":
        return RolloutBatch(self.tokens[index], self.lengths[index], self.mask[index], self.rewards[index],
                            [self.group_ids[i] for i in index.tolist()],
                            {k: v[index] for k, v in self.fields.items()})


def pack_rollouts(samples, rewards: list[float], pad_id: int) -> RolloutBatch:
    """`samples` (`rollout.base.Sample`) and their shaped rewards as a batch on the platform's device; the
    engine's sampling log-probs travel as the field `rollout_logprobs`."""
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    width = max(lengths)
    tokens = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width - 1))
    rollout_logprobs = torch.zeros((len(samples), width - 1))
    for row, sample in enumerate(samples):
        prompt = len(sample.prompt_ids)
        tokens[row, : lengths[row]] = torch.tensor(list(sample.prompt_ids) + list(sample.response_ids))
        mask[row, prompt - 1: lengths[row] - 1] = 1.0
        rollout_logprobs[row, prompt - 1: lengths[row] - 1] = torch.tensor(sample.logprobs, dtype=torch.float32)
    device = current_platform().device()
    return RolloutBatch(tokens.to(device), torch.tensor(lengths), mask.to(device),
                        torch.tensor(rewards, dtype=torch.float32, device=device), [s.prompt_index for s in samples],
                        {"rollout_logprobs": rollout_logprobs.to(device)})
