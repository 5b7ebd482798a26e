"""The no-vLLM rollout backend: KV-cached sampling with the trainer's megatron model (megatron-core's static
inference context and GPT inference wrapper).

- `sample_next` draws from softmax(logits / T) cut to the top-p nucleus and renormalised, and reports the drawn
  token's log-prob under it: checked against a float64 reference distribution.
- One rank, fp32 tiny model, prompts of unequal length (left-padded in one batch): greedy responses equal HF
  `generate` token for token and an uncached greedy loop over the full sequence; sampled responses' log-probs equal
  the trainer's recomputed temperature-scaled log-probs (1e-5); the KV cache holds memory after `generate` and
  none after `sleep` (its tensors are freed); a second call reuses the cache and repeats the same samples.
- TP=2 with sequence parallelism: every rank gets the same samples, grouped by prompt, ending at a stop token or
  at max_tokens, log-probs equal to the trainer's (1e-5); the model leaves `generate` in train mode with
  sequence parallelism back on.
- PP=2 (4 layers, tied embeddings, Llama-3 RoPE scaling): greedy equals HF `generate`, log-probs equal the
  trainer's.
- SmolLM2-135M-Instruct (converted from the GGUF): greedy in fp32 equals HF `generate` on chat prompts; in bf16
  the sampled log-probs stay within 1.0 (max; 0.43 measured) of the trainer's recomputed bf16 log-probs.
- `train` with `rollout.backend=megatron` runs GRPO steps end to end under torchrun (PP=2).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_rlvr.testing.distributed import free_port, run_workers
from tests.models.common import tiny_model_dir, worker_env
from tests.rollout.common import PROMPTS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EOS = 2  # the tiny models' eos_token_id


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


# ------------------------------------------------------------------------------------------------ helpers


def _build(model_dir, pg, tp=1, pp=1, dtype=torch.float32, sequence_parallel=False):
    from megatron_rlvr.models.llama import LlamaArch, build_llama, transformer_config
    from megatron_rlvr.models.weights import load_hf_into_model, read_hf_state

    arch = LlamaArch.from_pretrained(model_dir)
    config = transformer_config(arch, tp=tp, pp=pp, params_dtype=dtype, sequence_parallel=sequence_parallel)
    model = build_llama(arch, config, pg, pad_vocab_multiple=16)
    load_hf_into_model(model, read_hf_state(model_dir), arch, pg)
    return arch, model


def _engine(model_dir, model, arch, pg):
    from megatron_rlvr.rollout.megatron_engine import MegatronEngine, eos_token_ids

    return MegatronEngine(model, pg, arch, eos_token_ids(model_dir))


def _trainer_logprobs(model, pg, samples, vocab_size, temperature):
    """The trainer's log-probs of each sample's response tokens (every rank; from the last pipeline stage)."""
    from megatron_rlvr.models.forward import (
        broadcast_from_last_stage,
        forward_backward,
        split_micro_batches,
    )
    from tests.rollout.common import samples_batch

    tokens, _, mask = samples_batch(samples)
    with torch.no_grad():
        out = forward_backward(model, split_micro_batches(tokens, tokens.shape[0]), pg, valid_vocab_size=vocab_size,
                               temperature=temperature)
    logprobs = broadcast_from_last_stage(out[0]["logprobs"].float() if out else None, mask.shape, torch.float32, pg)
    return [logprobs[i][mask[i].bool()].tolist() for i in range(len(samples))]


def _max_diff(samples, reference) -> float:
    return max(max((abs(a - b) for a, b in zip(s.logprobs, ref)), default=0.0) for s, ref in zip(samples, reference))


def hf_greedy(model_dir, prompts, max_new_tokens, dtype=torch.float32) -> list[list[int]]:
    """HF transformers `generate` (greedy, one prompt at a time: no padding), new tokens only."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False,
                                 attention_mask=torch.ones(1, len(p), dtype=torch.long))
            out.append(ids[0, len(p):].tolist())
    return out


def _uncached_greedy(model, prompt, max_tokens, vocab_size) -> list[int]:
    """Greedy decoding by a full forward over the whole sequence for every token (TP = PP = 1, no cache)."""
    tokens = list(prompt)
    with torch.no_grad():
        model.eval()
        for _ in range(max_tokens):
            ids = torch.tensor([tokens])
            logits = model(ids, torch.arange(len(tokens))[None], None)[0, -1, :vocab_size]
            tokens.append(int(logits.argmax()))
            if tokens[-1] == EOS:
                break
        model.train()
    return tokens[len(prompt):]


# ------------------------------------------------------------------------------------------------ one rank


def _one_rank_worker(rank, world, model_dir, prompts):
    import weakref

    from megatron_rlvr.parallel.state import init_model_parallel
    from megatron_rlvr.rollout import SamplingConfig

    pg = init_model_parallel(1, 1)
    arch, model = _build(model_dir, pg)
    engine = _engine(model_dir, model, arch, pg)
    greedy = engine.generate(prompts, SamplingConfig(n=2, temperature=0.0, max_tokens=10))
    uncached = [_uncached_greedy(model, p, 10, arch.vocab_size) for p in prompts]

    sampling = SamplingConfig(n=3, temperature=0.7, max_tokens=8, seed=5)
    sampled = engine.generate(prompts, sampling)
    cache_bytes = engine.kv_cache_bytes()
    cache_tensor = weakref.ref(next(iter(engine._context.key_value_memory_dict.values()))[0])
    again = engine.generate(prompts, sampling)  # the cache is reused (reset, not reallocated)
    reused = cache_tensor() is not None
    engine.sleep()
    released = (engine.kv_cache_bytes(), cache_tensor() is None)
    after_sleep = engine.generate(prompts, sampling)
    recomputed = _trainer_logprobs(model, pg, sampled, arch.vocab_size, 0.7)
    return {"greedy": greedy, "uncached": uncached, "sampled": sampled, "recomputed": recomputed,
            "cache_bytes": cache_bytes, "reused": reused, "released": released, "same_again": again == sampled,
            "same_after_sleep": after_sleep == sampled, "training": model.training}


def test_generate_one_rank_equals_hf_and_uncached(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "tiny")
    (r,) = run_workers(_one_rank_worker, 1, model_dir, PROMPTS, env=worker_env())
    hf = hf_greedy(model_dir, PROMPTS, 10)
    greedy = r["greedy"]
    assert [s.prompt_index for s in greedy] == [i for i in range(len(PROMPTS)) for _ in range(2)]
    for s in greedy:
        assert s.response_ids == hf[s.prompt_index], f"prompt {s.prompt_index}: greedy differs from HF generate"
        assert s.response_ids == r["uncached"][s.prompt_index], "KV-cached greedy differs from the uncached loop"
        assert s.finished == (s.response_ids[-1] == EOS)
    sampled, recomputed = r["sampled"], r["recomputed"]
    assert all(len(s.logprobs) == len(s.response_ids) == len(ref) for s, ref in zip(sampled, recomputed))
    assert _max_diff(sampled, recomputed) < 1e-5
    assert len({tuple(s.response_ids) for s in sampled}) > len(PROMPTS), "samples of a prompt are all identical"
    # 4 rows x 3 samples, longest prompt 5 + 8 tokens, 2 layers x (K, V) x 2 KV heads x 16 dims x fp32
    assert r["cache_bytes"] == 12 * 13 * 2 * 2 * 2 * 16 * 4
    assert r["reused"] and r["same_again"], "a second generate did not reuse the cache or changed the samples"
    assert r["released"] == (0, True), "sleep() did not free the KV cache"
    assert r["same_after_sleep"], "generation after sleep() differs"
    assert r["training"], "the model was left in eval mode"


# ------------------------------------------------------------------------------------------------ TP = 2


def _tp2_worker(rank, world, model_dir, prompts, stop_id):
    from megatron_rlvr.models.weights import unwrap
    from megatron_rlvr.parallel.state import init_model_parallel
    from megatron_rlvr.rollout import SamplingConfig

    pg = init_model_parallel(2, 1)
    arch, model = _build(model_dir, pg, tp=2, sequence_parallel=True)
    engine = _engine(model_dir, model, arch, pg)
    samples = engine.generate(prompts, SamplingConfig(n=3, temperature=0.7, max_tokens=6, stop_token_ids=(stop_id,),
                                                      seed=11))
    state = (model.training, unwrap(model).config.sequence_parallel)
    return samples, _trainer_logprobs(model, pg, samples, arch.vocab_size, 0.7), state


def test_generate_tp2_sequence_parallel(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "tiny")
    stop_id = 40  # frequent enough under the random tiny model to end some responses early
    (samples, recomputed, state), (other, _, _) = run_workers(_tp2_worker, 2, model_dir, PROMPTS, stop_id,
                                                              env=worker_env())
    assert samples == other, "ranks disagree on the samples"
    assert state == (True, True), "the model must come back in train mode with sequence parallelism on"
    assert [s.prompt_index for s in samples] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    for s in samples:
        assert s.prompt_ids == PROMPTS[s.prompt_index]
        if s.finished:
            assert s.response_ids[-1] in (stop_id, EOS) and len(s.response_ids) <= 6
        else:
            assert len(s.response_ids) == 6 and not set(s.response_ids) & {stop_id, EOS}
    assert _max_diff(samples, recomputed) < 1e-5
    assert {s.finished for s in samples} == {True, False}, "both ways of ending must occur for the test to cover them"


# ------------------------------------------------------------------------------------------------ PP = 2


def _pp2_worker(rank, world, model_dir, prompts):
    from megatron_rlvr.parallel.state import init_model_parallel
    from megatron_rlvr.rollout import SamplingConfig

    pg = init_model_parallel(1, 2)
    arch, model = _build(model_dir, pg, pp=2)
    engine = _engine(model_dir, model, arch, pg)
    greedy = engine.generate(prompts, SamplingConfig(n=1, temperature=0.0, max_tokens=10))
    sampled = engine.generate(prompts, SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=3))
    return greedy, sampled, _trainer_logprobs(model, pg, sampled, arch.vocab_size, 1.0)


def test_generate_pp2_equals_hf(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "tiny-tied")
    results = run_workers(_pp2_worker, 2, model_dir, PROMPTS, env=worker_env())
    (greedy, sampled, recomputed), (greedy_other, sampled_other, _) = results
    assert greedy == greedy_other and sampled == sampled_other, "pipeline stages disagree on the samples"
    hf = hf_greedy(model_dir, PROMPTS, 10)
    assert [s.response_ids for s in greedy] == hf
    assert _max_diff(sampled, recomputed) < 1e-5


# ------------------------------------------------------------------------------------------------ SmolLM2


def _smollm2_worker(rank, world, model_dir, prompts):
    from megatron_rlvr.parallel.state import init_model_parallel
    from megatron_rlvr.rollout import SamplingConfig

    pg = init_model_parallel(1, 1)
    arch, model = _build(model_dir, pg)
    greedy = _engine(model_dir, model, arch, pg).generate(prompts, SamplingConfig(n=1, temperature=0.0, max_tokens=8))
    del model
    arch, model = _build(model_dir, pg, dtype=torch.bfloat16)
    sampled = _engine(model_dir, model, arch, pg).generate(prompts, SamplingConfig(n=1, temperature=1.0, max_tokens=8))
    return greedy, sampled, _trainer_logprobs(model, pg, sampled, arch.vocab_size, 1.0)


def test_smollm2_greedy_equals_hf_and_bf16_logprobs(smollm2_hf):
    smollm2_dir = smollm2_hf  # the session's fp32 conversion (tests/conftest.py)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    questions = ["What is 12 times 7?", "Write one word that rhymes with cat."]
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  return_dict=True)["input_ids"]) for q in questions]
    # the kernels' plain-torch twins: the Triton interpreter over a 49k vocab takes minutes (kernels: tests/kernels)
    env = {**worker_env(), "TRITON_INTERPRET": "0"}
    (greedy, sampled, recomputed), = run_workers(_smollm2_worker, 1, smollm2_dir, prompts, env=env, timeout=1200)
    assert [s.response_ids for s in greedy] == hf_greedy(smollm2_dir, prompts, 8)
    diffs = [abs(a - b) for s, ref in zip(sampled, recomputed) for a, b in zip(s.logprobs, ref)]
    # measured on CPU: max 0.43 over 16 tokens (bf16 logits; the KV-cached and the full forward round differently)
    assert max(diffs) < 1.0, f"bf16 sampled vs recomputed log-probs: max {max(diffs):.4f}"


# ------------------------------------------------------------------------------------------------ train


def test_train_grpo_with_megatron_backend(tmp_path):
    from megatron_rlvr.metrics import read_metrics
    from tests.trainer.common import job_env, overrides, tiny_job

    job = tiny_job(tmp_path)
    args = overrides(job, tmp_path / "out", **{"rollout.backend": "megatron", "parallel.pipeline_parallel": 2,
                                               "train.steps": 2, "checkpoint.interval": 0})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "megatron_rlvr.cli", "train", *args]
    proc = subprocess.run(cmd, check=False, env=job_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, f"train failed:\n{(proc.stdout + proc.stderr)[-6000:]}"
    rows = read_metrics(str(tmp_path / "out"))
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["timing/generate_s"] > 0 and r["tokens_per_s"] > 0, json.dumps(r)
        assert 0.0 <= r["reward_mean"] <= 1.0
