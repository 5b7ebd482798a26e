"""Per-token log-probs and losses through megatron-core's forward-backward schedule (any TP x PP x DP).

Sequences are right-padded `[B, S]` token batches. Token t's log-prob is log p(tokens[t+1] | tokens[:t+1]),
so a batch yields `[B, S-1]` log-probs aligned with `tokens[:, 1:]`. The vocab-parallel logits of the last
pipeline stage (`[b, s, V/TP]`, never gathered) go straight into the fused `token_logprobs` kernel.

`forward_backward` takes a `loss_fn(logprobs, entropy, micro_batch) -> (loss, stats)` whose `loss` is the
micro-batch's share of the GLOBAL loss (e.g. a sum of per-token terms already divided by the global token
count). The rescaling for megatron-core's micro-batch averaging and data-parallel gradient averaging happens
here, once, so gradients are those of the global loss whatever the TP/PP/DP layout and micro-batching.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_rlvr.models.weights import unwrap
from megatron_rlvr.platform import current_platform

LossFn = Callable[[torch.Tensor, Optional[torch.Tensor], "MicroBatch"], tuple[torch.Tensor, dict]]


@dataclasses.dataclass
class MicroBatch:
    """One micro-batch: right-padded tokens `[b, s]` and per-token tensors aligned with `tokens[:, 1:]`.

    A packed micro-batch holds its b sequences back to back in `tokens` `[1, T]` with `lengths` `[b]`; the
    model attends within each sequence only (RoPE positions restart per sequence), and `loss_fn` still sees
    log-probs in the padded `[b, max_len - 1]` layout, so losses are written once for both.
    """

    tokens: torch.Tensor
    fields: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    lengths: torch.Tensor | None = None
    """per-sequence lengths of a packed micro-batch (None: padded layout)"""
    rows: torch.Tensor | None = None
    """the batch rows this micro-batch holds, in its order (where per-row outputs go back to)"""

    @property
    def labels(self) -> torch.Tensor:
        return self.tokens[:, 1:]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """`[1, T-1]` per-position values of a packed micro-batch -> padded `[b, max_len-1]` (zeros past each end)."""
        lengths = self.lengths.tolist()
        out = packed.new_zeros(len(lengths), max(lengths) - 1)
        start = 0
        for row, length in enumerate(lengths):
            out[row, : length - 1] = packed[0, start : start + length - 1]
            start += length
        return out


def balanced_micro_batches(
    tokens: torch.Tensor, lengths: torch.Tensor, token_budget: int, fields: dict[str, torch.Tensor] | None = None
) -> list[MicroBatch]:
    """Packed micro-batches of at most `token_budget` tokens, as few as fit, with near-equal token counts.

    The rows are spread by the balanced partition (`data.partition`, the compiled one where built) over
    ceil(total / budget) micro-batches, one more until every part fits (a row longer than the budget gets a
    micro-batch of its own). Deterministic in the lengths, so the stages of a pipeline, which hold the same rows,
    cut the same micro-batches."""
    from megatron_rlvr.data.partition import partition

    fields = fields or {}
    sizes = [int(n) for n in lengths.tolist()]
    count = min(len(sizes), max(1, -(-sum(sizes) // token_budget)))
    while True:
        parts = partition(sizes, count)
        if count == len(sizes) or max(sum(sizes[i] for i in part) for part in parts) <= token_budget:
            break
        count += 1
    out = []
    for part in parts:
        idx = torch.tensor(part)
        lens = lengths[idx]
        width = int(lens.max())
        packed = torch.cat([tokens[r, : sizes[r]] for r in part]).unsqueeze(0)
        out.append(MicroBatch(packed, {k: v[idx, : width - 1] for k, v in fields.items()}, lens, idx))
    return out


def split_micro_batches(
    tokens: torch.Tensor, micro_batch_size: int, fields: dict[str, torch.Tensor] | None = None,
    lengths: torch.Tensor | None = None,
) -> list[MicroBatch]:
    """Cut a batch into micro-batches, trimming each to its longest sequence (less padding to compute)."""
    fields = fields or {}
    out = []
    for start in range(0, tokens.shape[0], micro_batch_size):
        sl = slice(start, start + micro_batch_size)
        width = tokens.shape[1] if lengths is None else int(lengths[sl].max())
        rows = torch.arange(tokens.shape[0])[sl]
        out.append(MicroBatch(tokens[sl, :width], {k: v[sl, : width - 1] for k, v in fields.items()}, rows=rows))
    return out


def micro_batches(
    tokens: torch.Tensor, lengths: torch.Tensor, *, micro_batch_size: int, max_tokens: int,
    fields: dict[str, torch.Tensor] | None = None,
) -> list[MicroBatch]:
    """The trainer's micro-batches: packed under `max_tokens` (`balanced_micro_batches`), or with
    `max_tokens` 0 padded rows, `micro_batch_size` at a time."""
    if max_tokens > 0:
        return balanced_micro_batches(tokens, lengths, max_tokens, fields)
    return split_micro_batches(tokens, micro_batch_size, fields, lengths)


def scatter_rows(outputs: list[torch.Tensor], mbs: list[MicroBatch], shape) -> torch.Tensor:
    """Per-micro-batch `[b, w]` outputs back into a `[B, W]` tensor in batch row order (zeros past each width)."""
    full = torch.zeros(shape, dtype=torch.float32, device=outputs[0].device if outputs else None)
    for out, mb in zip(outputs, mbs):
        full[mb.rows.to(full.device), : out.shape[1]] = out.float()
    return full


def _logits_to_logprobs(logits, labels, tp_group, valid_vocab, temperature, want_entropy, output_weight=None):
    """Token log-probs (and entropy) of `logits` `[b, s, V/TP]`; with `output_weight` (this rank's vocab shard of
    the output layer), `logits` are the last hidden states `[b, s, H]` and the log-probs come from them without
    the logits buffer (`linear_token_logprobs`)."""
    from megatron_rlvr.kernels import linear_token_logprobs, token_logprobs

    shape = labels.shape
    options = dict(temperature=temperature, group=tp_group if tp_group.size() > 1 else None,
                   return_entropy=want_entropy, valid_vocab_size=valid_vocab)
    if output_weight is not None:
        result = linear_token_logprobs(logits.reshape(-1, logits.shape[-1]), output_weight, labels.reshape(-1),
                                       **options)
    else:
        result = token_logprobs(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), **options)
    if want_entropy:
        return result[0].view(shape), result[1].view(shape)
    return result.view(shape), None


@contextlib.contextmanager
def _output_layer_returns_hidden(model, tp_group):
    """While the model runs, its output layer hands back the last hidden states `[s, b, H]` (gathered over the
    sequence-parallel ranks) instead of the logits, so `linear_token_logprobs` computes the log-probs from them
    and the output weight. The kernel sums dL/dhidden over TP itself, so the gather's backward only splits."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    layer = unwrap(model).output_layer

    def hidden_states(hidden, weight=None, runtime_gather_output=None):
        if layer.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False, group=tp_group)
        return hidden, None

    layer.forward = hidden_states
    try:
        yield
    finally:
        del layer.forward


def output_weight(model) -> torch.Tensor:
    """This rank's vocab shard of the output layer's weight (the input embedding's when they are tied)."""
    gpt = unwrap(model)
    return gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights \
        else gpt.output_layer.weight


def forward_backward(
    model: torch.nn.Module,
    micro_batches: list[MicroBatch],
    pg: ProcessGroupCollection,
    *,
    valid_vocab_size: int,
    loss_fn: LossFn | None = None,
    forward_only: bool = False,
    temperature: float = 1.0,
    want_entropy: bool = False,
    value_model: bool = False,
    fused_output: bool = False,
) -> list[dict]:
    """Run the schedule over `micro_batches`; returns, on the last PP stage, one dict per micro-batch.

    Without `loss_fn` (forward only) each dict holds `logprobs` `[b, s-1]` (or `values` `[b, s-1]` for a value
    model). With it, the dicts are the `stats` returned by `loss_fn`, and gradients are accumulated into the
    model (call the optimizer afterwards). Other PP stages get an empty list. `fused_output`: log-probs straight
    from the last hidden states and the output weight (`model.fused_output_logprobs`), no `[b, s, V/TP]` logits.
    """
    num_mb = len(micro_batches)
    dp = pg.dp.size()
    last_stage = pg.pp.rank() == pg.pp.size() - 1
    fused = fused_output and not value_model and last_stage
    weight = output_weight(model) if fused else None

    def loss_func(mb: MicroBatch, output: torch.Tensor):
        if value_model:
            values = output[:, :-1, 0].float()
            if mb.lengths is not None:
                values = mb.unpack(values)
            if loss_fn is None:
                return values.sum() * 0, torch.tensor(1), {"values": values.detach()}
            loss, stats = loss_fn(values, None, mb)
        else:
            logprobs, entropy = _logits_to_logprobs(
                output[:, :-1], mb.labels, pg.tp, valid_vocab_size, temperature, want_entropy or loss_fn is None,
                weight,
            )
            if mb.lengths is not None:
                logprobs = mb.unpack(logprobs)
                entropy = mb.unpack(entropy) if entropy is not None else None
            if loss_fn is None:
                return logprobs.sum() * 0, torch.tensor(1), {"logprobs": logprobs.detach(), "entropy": entropy.detach()}
            loss, stats = loss_fn(logprobs, entropy, mb)
        # megatron divides by the micro-batch count and DDP averages over DP ranks: undo both so the gradient
        # is that of the global loss the loss_fn contributions add up to
        return loss * (num_mb * dp), torch.tensor(1), stats

    # sequence parallelism splits the sequence over TP ranks: pad it to a multiple of TP (right padding
    # cannot change earlier tokens under causal attention) and drop the padded positions from the output
    multiple = pg.tp.size() if unwrap(model).config.sequence_parallel else 1

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        b, s = mb.tokens.shape
        pad = -s % multiple
        tokens = torch.nn.functional.pad(mb.tokens, (0, pad))
        run = _output_layer_returns_hidden(model, pg.tp) if fused else contextlib.nullcontext()
        if mb.lengths is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand(b, -1)
            with run:
                output = model(tokens, position_ids, None)
        else:
            # the padding (if any) is one more sequence, so attention and RoPE stay within each real one
            lengths = torch.cat([mb.lengths, mb.lengths.new_full((1,), pad)]) if pad else mb.lengths
            position_ids = torch.cat([torch.arange(int(n)) for n in lengths]).unsqueeze(0).to(tokens.device)
            cu = torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(lengths, 0).to(torch.int32)])
            cu = cu.to(tokens.device)
            params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                     max_seqlen_q=int(lengths.max()), max_seqlen_kv=int(lengths.max()))
            with run:
                output = model(tokens, position_ids, None, packed_seq_params=params)
        return output, lambda out, mb=mb: loss_func(mb, out[:, :s])

    schedule = get_forward_backward_func(pp_size=pg.pp.size())
    max_len = max(mb.tokens.shape[1] for mb in micro_batches)
    results = schedule(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=model,
        num_microbatches=num_mb,
        seq_length=max_len,
        micro_batch_size=max(mb.tokens.shape[0] for mb in micro_batches),
        forward_only=forward_only or loss_fn is None,
        pg_collection=pg,
        p2p_communicator=P2PCommunicator(pp_group=pg.pp, config=unwrap(model).config),
    )
    return list(results) if last_stage else []


def broadcast_from_last_stage(tensor: torch.Tensor | None, shape, dtype, pg: ProcessGroupCollection) -> torch.Tensor:
    """Give every PP stage the last stage's tensor (e.g. log-probs needed by all ranks of a DP replica)."""
    if pg.pp.size() == 1:
        return tensor
    src = dist.get_global_rank(pg.pp, pg.pp.size() - 1)
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype, device=current_platform().device())
    dist.broadcast(tensor, src=src, group=pg.pp)
    return tensor
