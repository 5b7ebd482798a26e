"""Shared pieces of the rollout and sync tests: a vLLM-compatible tiny model, worker env, trainer helpers."""

import os

import torch

from megatron_rlvr.models.tiny import save_tiny_llama

# vLLM's CPU attention supports head sizes that are multiples of 32 (the "tiny" default is 16)
VLLM_TINY = dict(head_dim=32)
PROMPTS = [[1, 10, 11, 12], [1, 20, 21], [1, 30, 31, 32, 33], [1, 40]]


def vllm_model_dir(tmp_path, seed: int = 0, **overrides) -> str:
    path = str(tmp_path / f"hf-tiny-vllm-{seed}")
    save_tiny_llama(path, "tiny", seed=seed, **{**VLLM_TINY, **overrides})
    return path


def worker_env() -> dict[str, str]:
    return {
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1"),
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }


def build_policy(model_dir: str, pg, tp: int, pp: int = 1, dtype: torch.dtype = torch.float32):
    """The tiny policy as a megatron model on this rank, loaded from the HF directory, with `dtype` parameters."""
    from megatron_rlvr.models.llama import LlamaArch, build_llama, transformer_config
    from megatron_rlvr.models.weights import load_hf_into_model, read_hf_state

    arch = LlamaArch.from_pretrained(model_dir)
    model = build_llama(arch, transformer_config(arch, tp=tp, pp=pp, params_dtype=dtype), pg, pad_vocab_multiple=16)
    load_hf_into_model(model, read_hf_state(model_dir), arch, pg)
    return arch, model


def samples_batch(samples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response tokens `[B, S]`, lengths, and a response mask aligned with tokens[:, 1:]."""
    seqs = [s.prompt_ids + s.response_ids for s in samples]
    width = max(len(q) for q in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width - 1)
    for i, (s, q) in enumerate(zip(samples, seqs)):
        tokens[i, : len(q)] = torch.tensor(q)
        mask[i, len(s.prompt_ids) - 1 : len(q) - 1] = 1.0
    return tokens, torch.tensor([len(q) for q in seqs]), mask


def trainer_logprobs(model, pg, samples, vocab_size: int) -> list[list[float]] | None:
    """The trainer's log-probs of each sample's response tokens (last pipeline stage; None elsewhere)."""
    from megatron_rlvr.models.forward import forward_backward, split_micro_batches

    tokens, lengths, mask = samples_batch(samples)
    with torch.no_grad():
        out = forward_backward(model, split_micro_batches(tokens, tokens.shape[0]), pg, valid_vocab_size=vocab_size)
    if not out:
        return None
    lp = out[0]["logprobs"]
    return [lp[i][mask[i].bool()].tolist() for i in range(len(samples))]


def policy_step(ddp, optimizer, pg, samples, vocab_size: int) -> None:
    """One optimizer step raising the log-likelihood of the samples' responses."""
    from megatron_rlvr.models.forward import forward_backward, split_micro_batches

    tokens, lengths, mask = samples_batch(samples)
    dp, dp_rank = pg.dp.size(), pg.dp.rank()
    mine = slice(dp_rank * len(samples) // dp, (dp_rank + 1) * len(samples) // dp)
    total = mask.sum()
    mbs = split_micro_batches(tokens[mine], len(samples), fields={"mask": mask[mine]}, lengths=lengths[mine])

    def loss_fn(logprobs, entropy, mb):
        return -(logprobs * mb.fields["mask"]).sum() / total, {}

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward(ddp, mbs, pg, valid_vocab_size=vocab_size, loss_fn=loss_fn)
    ok, _, _ = optimizer.step()
    assert ok, "optimizer step was skipped"
