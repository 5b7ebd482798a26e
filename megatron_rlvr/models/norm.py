"""RMSNorm for megatron-core layer specs that also works under sequence parallelism.

megatron-core's torch-only norm (`WrappedTorchNorm`) refuses sequence parallelism, and its fused norm needs
apex. With sequence parallelism each TP rank normalises its own slice of the sequence, so the norm weight's
gradient is a partial sum: marking the weight `sequence_parallel` makes megatron-core's gradient finalisation
all-reduce it over the TP group.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), normalised in fp32 and cast back before the weight (as HF Llama)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)
