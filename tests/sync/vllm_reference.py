"""vLLM's parameters of one rollout TP rank built from HF tensors in plain torch, the way vLLM's weight loaders lay
them out (`QKVParallelLinear`: q narrowed at rank j, k/v at shard rank j // KV-head replicas; `MergedColumnParallel`:
gate then up, each narrowed at j; `RowParallelLinear`: columns narrowed at j; `VocabParallelEmbedding`: vocab padded to
a multiple of 64, rows of shard j copied and the rest zero)."""

import torch


def vllm_reference(hf: dict[str, torch.Tensor], arch, rollout_tp: int, rank: int) -> dict[str, torch.Tensor]:
    h, d, r, j = arch.hidden_size, arch.head_dim, rollout_tp, rank
    heads, kv_heads, ffn, vocab = arch.num_heads, arch.num_kv_heads, arch.ffn_hidden_size, arch.vocab_size
    padded = (vocab + 63) // 64 * 64
    rows = padded // r
    kv_here = max(1, kv_heads // r)
    kv_shard = j // max(1, r // kv_heads)

    def vocab_shard(table):
        out = table.new_zeros(rows, h)
        lo, hi = j * rows, min((j + 1) * rows, vocab)
        if hi > lo:
            out[: hi - lo] = table[lo:hi]
        return out

    out = {"model.embed_tokens.weight": vocab_shard(hf["model.embed_tokens.weight"])}
    for layer in range(arch.num_layers):
        p = f"model.layers.{layer}."
        q = hf[p + "self_attn.q_proj.weight"].narrow(0, j * heads // r * d, heads // r * d)
        k = hf[p + "self_attn.k_proj.weight"].narrow(0, kv_shard * kv_here * d, kv_here * d)
        v = hf[p + "self_attn.v_proj.weight"].narrow(0, kv_shard * kv_here * d, kv_here * d)
        out[p + "self_attn.qkv_proj.weight"] = torch.cat([q, k, v])
        out[p + "self_attn.o_proj.weight"] = hf[p + "self_attn.o_proj.weight"].narrow(1, j * heads * d // r,
                                                                                       heads * d // r)
        gate = hf[p + "mlp.gate_proj.weight"].narrow(0, j * ffn // r, ffn // r)
        up = hf[p + "mlp.up_proj.weight"].narrow(0, j * ffn // r, ffn // r)
        out[p + "mlp.gate_up_proj.weight"] = torch.cat([gate, up])
        out[p + "mlp.down_proj.weight"] = hf[p + "mlp.down_proj.weight"].narrow(1, j * ffn // r, ffn // r)
        out[p + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
        out[p + "post_attention_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
    out["model.norm.weight"] = hf["model.norm.weight"]
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = vocab_shard(hf["lm_head.weight"])
    return out
