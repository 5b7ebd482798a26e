"""The no-vLLM rollout backend: sampling with the trainer's megatron model.

- `sample_next` draws from softmax(logits / T) cut to the top-p nucleus and renormalised, and reports the drawn
  token's log-prob under it: checked against a float64 reference distribution.
- On 2 ranks (TP=2) `generate` returns the same samples on every rank, grouped by prompt, ending at a stop token
  or at max_tokens, with log-probs equal to the trainer's recomputed temperature-scaled log-probs (1e-4).
"""

import torch

from megatron_rlvr.testing.distributed import run_workers
from tests.models.common import tiny_model_dir, worker_env
from tests.rollout.common import PROMPTS, samples_batch


def test_sample_next_top_p_matches_reference():
    from megatron_rlvr.rollout.megatron_engine import sample_next

    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3
    temperature, top_p = 0.8, 0.7
    tokens, logprobs = sample_next(logits, temperature, top_p, torch.Generator().manual_seed(1))
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    for row in range(logits.shape[0]):
        order = probs[row].argsort(descending=True)
        cumulative = probs[row][order].cumsum(0)
        nucleus = order[: int((cumulative < top_p).sum()) + 1]  # smallest prefix reaching top_p
        assert int(tokens[row]) in nucleus.tolist(), f"row {row}: token outside the top-p nucleus"
        expected = torch.log(probs[row, tokens[row]] / probs[row, nucleus].sum())
        assert abs(float(logprobs[row]) - float(expected)) < 1e-5
    greedy, greedy_lp = sample_next(logits, 0.0, 1.0, torch.Generator())
    assert torch.equal(greedy, logits.argmax(-1))
    torch.testing.assert_close(greedy_lp.double(), torch.log_softmax(logits.double(), -1).max(-1).values, atol=1e-5, rtol=0)


def _generate_worker(rank, world, model_dir, prompts, stop_id):
    from megatron_rlvr.models.forward import forward_backward, split_micro_batches
    from megatron_rlvr.parallel.layout import init_layout, make_layout
    from megatron_rlvr.rollout import SamplingConfig, build_rollout_engine
    from tests.rollout.common import build_policy

    groups = init_layout(make_layout("colocated", world, train_tp=2, rollout_tp=2))
    arch, model = build_policy(model_dir, groups.pg, 2)
    engine = build_rollout_engine("megatron", groups, model_dir, model=model)
    sampling = SamplingConfig(n=3, temperature=0.7, max_tokens=6, stop_token_ids=(stop_id,), seed=11)
    samples = engine.generate(prompts, sampling)
    tokens, _, mask = samples_batch(samples)
    with torch.no_grad():
        out = forward_backward(model, split_micro_batches(tokens, tokens.shape[0]), groups.pg,
                               valid_vocab_size=arch.vocab_size, temperature=0.7)
    recomputed = [out[0]["logprobs"][i][mask[i].bool()].tolist() for i in range(len(samples))]
    return samples, recomputed


def test_generate_tp2(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "tiny")
    stop_id = 40  # frequent enough under the random tiny model to end some responses early
    results = run_workers(_generate_worker, 2, model_dir, PROMPTS, stop_id, env=worker_env())
    (samples, recomputed), (other, _) = results
    assert samples == other, "ranks disagree on the samples"
    assert [s.prompt_index for s in samples] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    for s, ref in zip(samples, recomputed):
        assert s.prompt_ids == PROMPTS[s.prompt_index]
        assert len(s.logprobs) == len(s.response_ids) == len(ref)
        if s.finished:
            assert s.response_ids[-1] in (stop_id, 2) and len(s.response_ids) <= 6
        else:
            assert len(s.response_ids) == 6 and not set(s.response_ids) & {stop_id, 2}
        assert max(abs(a - b) for a, b in zip(s.logprobs, ref)) < 1e-4
    assert len({tuple(s.response_ids) for s in samples}) > len(PROMPTS), "samples of a prompt are all identical"
    assert {s.finished for s in samples} == {True, False}, "both ways of ending must occur for the test to cover them"
