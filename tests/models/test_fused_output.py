"""`model.fused_output_logprobs`: log-probs and entropy straight from the last hidden states and the output weight
(`linear_token_logprobs`) equal those of the output layer's logits (`token_logprobs`), forward and gradients, over
gloo: TP 2 with and without sequence parallelism on packed micro-batches, and PP 2 with tied embeddings (the last
stage's copy of the embedding is the output weight). fp32 tolerances: log-probs and entropy abs 1e-5; gradients
||fused - logits|| / ||logits|| <= 1e-5 per tensor (the same sums in another order). bf16: log-probs within 0.05
(the blocks of logits are rounded where the logits path rounds the whole tensor), mean gap below 0.01."""

import pytest
import torch

from megatron_rlvr.testing.distributed import run_workers
from tests.models.common import random_batch, tiny_model_dir, worker_env


def _worker(rank, world, tp, pp, sequence_parallel, dtype, model_dir, tokens, lengths):
    from megatron_rlvr.models.forward import balanced_micro_batches, forward_backward
    from megatron_rlvr.models.llama import LlamaArch, build_llama, transformer_config
    from megatron_rlvr.models.weights import load_hf_into_model, read_hf_state
    from megatron_rlvr.parallel.state import init_model_parallel

    pg = init_model_parallel(tp, pp)
    arch = LlamaArch.from_pretrained(model_dir)
    model = build_llama(arch, transformer_config(arch, tp=tp, pp=pp, sequence_parallel=sequence_parallel,
                                                 params_dtype=dtype), pg, pad_vocab_multiple=16)
    load_hf_into_model(model, read_hf_state(model_dir), arch, pg)
    gen = torch.Generator().manual_seed(3)
    mask = (torch.arange(tokens.shape[1] - 1)[None, :] < (lengths[:, None] - 1)).float()
    fields = {"w": torch.rand(tokens.shape[0], tokens.shape[1] - 1, generator=gen) * mask,
              "e": torch.rand(tokens.shape[0], tokens.shape[1] - 1, generator=gen) * mask}

    import megatron_rlvr.kernels as kernels

    fused_calls = []
    linear = kernels.linear_token_logprobs
    kernels.linear_token_logprobs = lambda *a, **k: fused_calls.append(a[0].shape) or linear(*a, **k)

    def run(fused):
        for p in model.parameters():
            p.grad = None
        outputs = []
        fused_calls.clear()

        def loss_fn(logprobs, entropy, mb):
            outputs.append((mb.rows.tolist(), logprobs.detach(), entropy.detach()))
            return -(logprobs * mb.fields["w"]).sum() - (entropy * mb.fields["e"]).sum(), {}

        forward_backward(model, balanced_micro_batches(tokens, lengths, 24, fields), pg,
                         valid_vocab_size=arch.vocab_size, loss_fn=loss_fn, temperature=0.7, want_entropy=True,
                         fused_output=fused)
        # the fused path took the hidden states [tokens, H] (on the last stage), the other never called it
        assert all(shape[-1] == arch.hidden_size for shape in fused_calls) and bool(fused_calls) == (
            fused and pg.pp.rank() == pp - 1)
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        for name, param in model.named_parameters():
            if getattr(param, "sequence_parallel", False) and name in grads:
                torch.distributed.all_reduce(grads[name], group=pg.tp)
        return outputs, grads

    return run(False), run(True)


def _check(results, lengths, *, atol, mean_atol, grad_rel):
    checked = 0
    for (plain_out, plain_grads), (fused_out, fused_grads) in results:
        assert [rows for rows, *_ in plain_out] == [rows for rows, *_ in fused_out]
        for (rows, lp, ent), (_, flp, fent) in zip(plain_out, fused_out):
            for i, row in enumerate(rows):
                n = int(lengths[row]) - 1
                for a, b in ((lp[i, :n], flp[i, :n]), (ent[i, :n], fent[i, :n])):
                    gap = (a - b).abs()
                    assert gap.max() <= atol and gap.mean() <= mean_atol, f"row {row}: gap {gap.max():.2e}"
                    checked += 1
        assert plain_grads.keys() == fused_grads.keys() and plain_grads
        for name, grad in plain_grads.items():
            rel = ((fused_grads[name] - grad).norm() / grad.norm()).item()
            assert rel <= grad_rel, f"{name}: relative gradient difference {rel:.2e}"
    assert checked, "no last-stage output was compared"


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_fused_output_equals_logits_tp2(tmp_path, sequence_parallel):
    model_dir = tiny_model_dir(tmp_path, "tiny")
    tokens, lengths = random_batch(model_dir, batch=6, max_len=11, seed=5)
    results = run_workers(_worker, 2, 2, 1, sequence_parallel, torch.float32, model_dir, tokens, lengths,
                          env=worker_env())
    _check(results, lengths, atol=1e-5, mean_atol=1e-5, grad_rel=1e-5)


def test_fused_output_equals_logits_pp2_tied(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "tiny-tied")
    tokens, lengths = random_batch(model_dir, batch=6, max_len=11, seed=7)
    results = run_workers(_worker, 2, 1, 2, False, torch.float32, model_dir, tokens, lengths, env=worker_env())
    _check(results, lengths, atol=1e-5, mean_atol=1e-5, grad_rel=1e-5)


def test_fused_output_bf16(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "tiny")
    tokens, lengths = random_batch(model_dir, batch=6, max_len=11, seed=9)
    results = run_workers(_worker, 2, 2, 1, True, torch.bfloat16, model_dir, tokens, lengths, env=worker_env())
    _check(results, lengths, atol=0.05, mean_atol=0.01, grad_rel=0.05)
