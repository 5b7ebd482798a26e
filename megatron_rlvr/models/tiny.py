"""Tiny Llama models and a character-level tokenizer, built locally (nothing is downloaded).

Used by the tests and by the embedded CPU demo: `save_tiny_llama(path, ...)` writes a HuggingFace model directory
(config.json, model.safetensors with random weights, tokenizer.json, tokenizer_config.json with a chat template)
that transformers, vLLM and our converter all load.
"""

from __future__ import annotations

import json
import os
import string

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
PAD, BOS, EOS = SPECIAL_TOKENS[:3]
CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n"

# Tulu-style chat template over the special tokens above.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

TINY_CONFIGS = {
    # 2 layers, GQA 4 heads / 2 KV heads, untied: the default test model
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, tie_word_embeddings=False),
    # 4 layers and tied embeddings with Llama-3 rope scaling, to cover PP=2 with shared embeddings
    "tiny-tied": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, tie_word_embeddings=True,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # the demo policy: small enough to learn arithmetic on 2 CPU cores in minutes
    "demo": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=384, tie_word_embeddings=False),
}


def build_char_tokenizer():
    """A character-level `PreTrainedTokenizerFast` with the special tokens and chat template above."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=PAD
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(name: str = "tiny", vocab_size: int | None = None, **overrides) -> dict:
    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny config {name!r}; known: {', '.join(TINY_CONFIGS)}")
    config = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=vocab_size or len(SPECIAL_TOKENS) + len(CHARACTERS),
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=512,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
        attention_bias=False,
        mlp_bias=False,
    )
    config.update(TINY_CONFIGS[name])
    config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    config.update(overrides)
    return config


def save_tiny_llama(path: str, name: str = "tiny", seed: int = 0, std: float = 0.2, **overrides) -> dict:
    """Write a HF Llama directory with random weights (N(0, std), norms around 1) and the char tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = tiny_llama_config(name, **overrides)
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, std)
    model.save_pretrained(path, safe_serialization=True)
    build_char_tokenizer().save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)
