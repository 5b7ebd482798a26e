"""Shared pieces of the model tests: tiny HF checkpoints, random batches, the float64 HF reference."""

import os

import torch

from megatron_rlvr.models.tiny import save_tiny_llama


def worker_env() -> dict[str, str]:
    return {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1"), "TOKENIZERS_PARALLELISM": "false"}


def tiny_model_dir(tmp_path, name: str = "tiny", seed: int = 0, **overrides) -> str:
    path = str(tmp_path / f"hf-{name}-{seed}")
    save_tiny_llama(path, name, seed=seed, **overrides)
    return path


def random_batch(model_dir: str, batch: int, max_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random token rows of unequal lengths (>= 3), padding id 0; the longest has max_len."""
    from megatron_rlvr.models.llama import LlamaArch

    vocab = LlamaArch.from_pretrained(model_dir).vocab_size
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, max_len + 1, (batch,), generator=gen)
    lengths[0] = max_len
    tokens = torch.randint(1, vocab, (batch, max_len), generator=gen)
    for row, length in enumerate(lengths.tolist()):
        tokens[row, length:] = 0
    return tokens, lengths


def hf_reference_logprobs(model_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    """float64 HF Llama log-probs `[B, S-1]` of tokens[:, 1:] (right padding cannot affect earlier tokens)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(tokens).logits[:, :-1]
    return torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
