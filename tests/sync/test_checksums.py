"""The exact sync check's checksums (`sync.checksums`), one process, against vLLM's layout built in plain torch.

For fresh random weights, the checksum of every vLLM parameter computed on the trainer's side (the plan's regions
over megatron's shards, cast to vLLM's dtype) equals the checksum of that parameter as vLLM's loaders lay it out
(`vllm_reference`), in fp32 and bf16, for several training/rollout TP pairs; and one flipped bit anywhere in any
parameter, or two elements swapped, changes that parameter's checksum.
"""

import pytest
import torch

from megatron_rlvr.sync import checksums
from megatron_rlvr.sync.checksums import tensor_checksum, window_checksum
from megatron_rlvr.sync.vllm_layout import plan_inplace
from tests.sync.test_vllm_layout import GQA, MHA_TIED, _hf_state, _megatron_shards
from tests.sync.vllm_reference import vllm_reference

CASES = [(GQA, 1, 1), (GQA, 2, 4), (GQA, 2, 2), (MHA_TIED, 2, 4)]


def _expected(arch, shards, train_tp, train_vocab, rollout_tp, j, dtype) -> dict[str, int]:
    out: dict[str, int] = {}
    for region in plan_inplace(arch, train_tp=train_tp, train_vocab=train_vocab, rollout_tp=rollout_tp,
                               rollout_rank=j):
        if region.src is None:
            continue  # a zero fill hashes to 0
        held = shards[region.src]
        tensor = held[region.src_rank if region.src_rank is not None else 0]
        out[region.dst] = out.get(region.dst, 0) + window_checksum(region.src_view.of(tensor), region.dst_view,
                                                                   dtype)
    return out


@pytest.mark.parametrize("trainer_dtype,vllm_dtype", [(torch.float32, torch.float32),
                                                      (torch.bfloat16, torch.bfloat16),
                                                      (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("arch,train_tp,rollout_tp", CASES)
def test_plan_checksums_match_vllm_layout(monkeypatch, arch, train_tp, rollout_tp, trainer_dtype, vllm_dtype):
    # small chunks: the regions are hashed in several steps, as the large tensors of a real model are
    monkeypatch.setattr(checksums, "_CHUNK_ELEMENTS", 50)
    gen = torch.Generator().manual_seed(7)
    hf = {name: t.to(trainer_dtype) for name, t in _hf_state(arch, gen).items()}
    train_vocab = -(-arch.vocab_size // (8 * train_tp)) * 8 * train_tp
    shards = _megatron_shards(hf, arch, train_tp, train_vocab)
    for j in range(rollout_tp):
        reference = {n: t.to(vllm_dtype) for n, t in vllm_reference(hf, arch, rollout_tp, j).items()}
        expected = _expected(arch, shards, train_tp, train_vocab, rollout_tp, j, vllm_dtype)
        held = {name: tensor_checksum(t) for name, t in reference.items()}
        assert held == {name: expected.get(name, 0) % checksums.PRIME for name in reference}, f"rollout rank {j}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_flipped_bit_or_a_swap_changes_the_checksum(dtype):
    gen = torch.Generator().manual_seed(11)
    reference = {n: t.to(dtype) for n, t in vllm_reference(_hf_state(GQA, gen), GQA, 2, 1).items()}
    bits = dtype.itemsize * 8
    as_int = {16: torch.int16, 32: torch.int32}[bits]
    for name, tensor in reference.items():
        before = tensor_checksum(tensor)
        for _ in range(3):
            corrupted = tensor.clone()
            flat = corrupted.view(-1).view(as_int)
            index = int(torch.randint(tensor.numel(), (1,), generator=gen))
            bit = int(torch.randint(bits, (1,), generator=gen))
            flat[index] ^= torch.tensor(1 << bit if bit < bits - 1 else -(1 << bit), dtype=torch.int64).to(as_int)
            assert tensor_checksum(corrupted) != before, f"{name}: bit {bit} of element {index} flipped unnoticed"
        swapped = tensor.clone().view(-1)
        a, b = 0, int(torch.nonzero(swapped != swapped[0])[0])
        swapped[a], swapped[b] = tensor.view(-1)[b], tensor.view(-1)[a]
        assert tensor_checksum(swapped.view(tensor.shape)) != before, f"{name}: two elements swapped unnoticed"
