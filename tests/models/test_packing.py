"""Packed micro-batches (balanced under a token budget, rows reordered) give the same log-probs and gradients as
the padded layout (fp32; TP=2 over gloo, with and without sequence parallelism). Tolerance: log-probs abs 1e-5;
gradients ||packed - padded|| / ||padded|| <= 1e-5 per tensor (fp32 token sums in another order)."""

import pytest
import torch

from megatron_rlvr.testing.distributed import run_workers
from tests.models.common import random_batch, tiny_model_dir, worker_env


def _packing_worker(rank, world, sequence_parallel, model_dir, tokens, lengths):
    from megatron_rlvr.models.forward import balanced_micro_batches, forward_backward, split_micro_batches
    from megatron_rlvr.models.llama import LlamaArch, build_llama, transformer_config
    from megatron_rlvr.models.weights import load_hf_into_model, read_hf_state
    from megatron_rlvr.parallel.state import init_model_parallel

    pg = init_model_parallel(world, 1)
    arch = LlamaArch.from_pretrained(model_dir)
    model = build_llama(arch, transformer_config(arch, tp=world, sequence_parallel=sequence_parallel), pg,
                        pad_vocab_multiple=16)
    load_hf_into_model(model, read_hf_state(model_dir), arch, pg)
    weights = torch.rand(tokens.shape[0], tokens.shape[1] - 1, generator=torch.Generator().manual_seed(3))

    def run(micro_batches):
        for p in model.parameters():
            p.grad = None
        outputs = []

        def loss_fn(logprobs, entropy, mb):
            outputs.append(logprobs.detach())
            return -(logprobs * mb.fields["w"]).sum(), {}

        forward_backward(model, micro_batches, pg, valid_vocab_size=arch.vocab_size, loss_fn=loss_fn)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        for name, param in model.named_parameters():
            if getattr(param, "sequence_parallel", False):  # per-rank partial sums over its sequence slice
                torch.distributed.all_reduce(grads[name], group=pg.tp)
        return outputs, grads

    mask = torch.arange(tokens.shape[1] - 1)[None, :] < (lengths[:, None] - 1)
    fields = {"w": weights * mask}
    padded_lp, padded_grads = run(split_micro_batches(tokens, 2, fields=fields, lengths=lengths))
    packs = balanced_micro_batches(tokens, lengths, token_budget=24, fields=fields)
    assert all(int(p.lengths.sum()) <= 24 or len(p.lengths) == 1 for p in packs), "a micro-batch over the budget"
    packed_lp, packed_grads = run(packs)
    assert len(packs) < tokens.shape[0], "nothing was packed together"
    return padded_lp, packed_lp, padded_grads, packed_grads, [p.rows.tolist() for p in packs]


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_packed_equals_padded(tmp_path, sequence_parallel):
    model_dir = tiny_model_dir(tmp_path, "tiny")
    tokens, lengths = random_batch(model_dir, batch=6, max_len=11, seed=5)
    results = run_workers(_packing_worker, 2, sequence_parallel, model_dir, tokens, lengths, env=worker_env())
    for padded_lp, packed_lp, padded_grads, packed_grads, pack_rows in results:
        assert sorted(r for rows in pack_rows for r in rows) == list(range(6))
        padded = torch.cat([torch.nn.functional.pad(x, (0, 10 - x.shape[1])) for x in padded_lp])
        packed = torch.zeros(6, 10)
        for x, rows in zip(packed_lp, pack_rows):  # balanced packing reorders rows
            packed[rows, : x.shape[1]] = x
        for row, length in enumerate(lengths.tolist()):
            torch.testing.assert_close(packed[row, : length - 1], padded[row, : length - 1], rtol=0, atol=1e-5)
        for name, grad in padded_grads.items():
            # fp32 sums over tokens in another order: compare at the scale of the tensor
            rel = ((packed_grads[name] - grad).norm() / grad.norm()).item()
            assert rel <= 1e-5, f"{name}: relative gradient difference {rel:.2e}"
