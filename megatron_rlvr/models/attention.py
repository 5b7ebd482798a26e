"""Core attention for megatron-core layer specs: `torch.nn.functional.scaled_dot_product_attention`.

Plugged in as the `core_attention` submodule of megatron-core's `SelfAttention` spec. It takes megatron's
`[s, b, heads, head_dim]` layout, lets SDPA pick its fused kernel (flash / memory-efficient on GPU), handles
grouped-query attention without materialising repeated keys, and supports packed sequences: with
`packed_seq_params` (cu_seqlens of the packed sequences) attention is causal within each sequence and never
crosses a sequence boundary, through the platform's variable-length kernel (`Platform.varlen_attention`: flash-attn
or torch's varlen attention on a GPU, SDPA per sequence on the CPU), so no `[T, T]` mask is built.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_rlvr.platform import current_platform


def cached_causal_mask(sq: int, sk: int, device) -> torch.Tensor:
    """Boolean `[sq, sk]` mask, True where allowed, for the last `sq` of `sk` positions (a KV-cached step)."""
    rows = torch.arange(sk - sq, sk, device=device)
    return rows[:, None] >= torch.arange(sk, device=device)[None, :]


class SDPAttention(MegatronModule):
    """Causal self-attention through SDPA, a drop-in `core_attention` for megatron-core's SelfAttention."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism (context_parallel_size must be 1)")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        # megatron's sharded_state_dict falls back to the global TP group for modules without one
        self.tp_group = pg_collection.tp
        tp_size = pg_collection.tp.size()
        self.heads = divide(config.num_attention_heads, tp_size)
        self.groups = divide(config.num_query_groups, tp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """query `[sq, b, heads, d]`, key/value `[sk, b, groups, d]` -> context `[sq, b, heads*d]`.

        `attention_mask`, when given, is megatron's boolean mask (True = masked out), broadcastable to
        `[b, heads, sq, sk]`; without it attention is causal (with sq < sk, as in a KV-cached decode step, the
        queries are the last sq positions).
        """
        if attention_bias is not None:
            raise ValueError("SDPAttention does not take an attention bias")
        if packed_seq_params is not None:  # packed sequences (THD): [t, heads, d], attention within each sequence
            if query.dim() == 4:
                query, key, value = (x.squeeze(1) for x in (query, key, value))
            context = current_platform().varlen_attention(
                query, key, value, packed_seq_params.cu_seqlens_q, int(packed_seq_params.max_seqlen_q),
                scale=self.softmax_scale, dropout_p=self.dropout if self.training else 0.0)
            return context.reshape(context.shape[0], 1, self.heads * self.head_dim)
        if query.dim() == 3:  # a THD batch of one without sequence boundaries
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # SDPA wants [b, heads, s, d]
        mask = None
        causal = True
        if attention_mask is not None:
            mask = ~attention_mask
            causal = False
        elif q.shape[2] != k.shape[2]:
            # queries that continue a KV cache (megatron's inference context): query i sits at key position
            # sk - sq + i, so the causal mask is aligned to the bottom right, not SDPA's top-left
            mask = cached_causal_mask(q.shape[2], k.shape[2], q.device)
            causal = False
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=self.heads != self.groups,
        )
        sq, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.heads * self.head_dim)
