"""The PPO value model on tensor/pipeline groups of its own, beside a policy on megatron's global groups.

Real gloo processes. (1) Values of a value model at TP 2 next to a TP 1 x DP 2 policy equal the float64 HF
trunk's final hidden states times the head (rtol 1e-5), with and without sequence parallelism. (2) Training checkpoints of such a value model
(weights and the distributed optimizer's Adam state, written by `checkpoint.Checkpointer`) round-trip: a run
resumed from the checkpoint takes the same next step as the run that wrote it (bit-exact), and the saved weights
read back at another TP/PP equal the writer's. (3) `gather_rows` reassembles rows spread over DP ranks.
"""

import pytest
import torch
import torch.distributed as dist

from megatron_rlvr.config import config_from_dict
from megatron_rlvr.testing.distributed import run_workers
from tests.models.common import random_batch, tiny_model_dir, worker_env


def _env():
    # the policy steps here only feed the checkpoint: the kernels' torch twins spare the Triton interpreter
    return {**worker_env(), "MEGATRON_RLVR_KERNELS": "torch"}


def _cfg(model_dir, output_dir, **parallel):
    return config_from_dict({
        "output_dir": str(output_dir), "model": {"path": model_dir, "pad_vocab_multiple": 8},
        "parallel": parallel, "algorithm": {"advantage_estimator": "gae"},
        "train": {"value_optimizer": {"name": "adam", "lr": 0.01, "clip_grad": 0.0}},
    })


def _head(hidden: int) -> torch.Tensor:
    return torch.randn(1, hidden, generator=torch.Generator().manual_seed(5)) * 0.5


def _build(cfg):
    """Policy on megatron's global groups (as the colocated trainer), value model on its own."""
    from megatron_rlvr.models.value import build_value_model
    from megatron_rlvr.models.weights import unwrap
    from megatron_rlvr.parallel.groups import init_groups

    groups = init_groups(cfg, dist.get_world_size(), vllm=False)
    policy_pg, pg = groups.policy, groups.value
    value, optimizer = build_value_model(cfg, pg)
    head = unwrap(value).output_layer if unwrap(value).post_process else None
    if head is not None:
        with torch.no_grad():
            head.weight.copy_(_head(head.weight.shape[1]))
    return policy_pg, value, optimizer, pg


def _values(value, pg, tokens, lengths):
    from megatron_rlvr.models.forward import broadcast_from_last_stage, forward_backward, split_micro_batches

    with torch.no_grad():
        out = forward_backward(value, split_micro_batches(tokens, 2, lengths=lengths), pg, valid_vocab_size=1,
                               value_model=True)
    width = tokens.shape[1] - 1
    full = torch.cat([torch.nn.functional.pad(o["values"], (0, width - o["values"].shape[1])) for o in out]) \
        if out else None
    return broadcast_from_last_stage(full, (tokens.shape[0], width), torch.float32, pg)


def _values_worker(rank, world, model_dir, output_dir, tokens, lengths, parallel):
    cfg = _cfg(model_dir, output_dir, **parallel)
    policy_pg, value, _, pg = _build(cfg)
    assert pg is not policy_pg and pg.tp.size() != policy_pg.tp.size()
    return _values(value, pg, tokens, lengths)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sequence-parallel"])
def test_values_on_own_groups_match_hf(tmp_path, sequence_parallel):
    from transformers import LlamaForCausalLM

    model_dir = tiny_model_dir(tmp_path, "tiny", num_hidden_layers=4)
    tokens, lengths = random_batch(model_dir, batch=4, max_len=10, seed=3)
    parallel = {"tensor_parallel": 1, "value_tensor_parallel": 2, "value_pipeline_parallel": 1,
                "sequence_parallel": sequence_parallel}
    got = run_workers(_values_worker, 2, model_dir, tmp_path / "out", tokens, lengths, parallel, env=worker_env())
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        hidden = hf.model(tokens).last_hidden_state[:, :-1]
    ref = (hidden @ _head(hidden.shape[-1]).double().t()).squeeze(-1)
    for rank_values in got:
        for row, length in enumerate(lengths.tolist()):
            g, r = rank_values[row, : length - 1].double(), ref[row, : length - 1]
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def _train_step(model, optimizer, pg, tokens, lengths, *, vocab=1, value_model=True):
    """One optimizer step: values regressed on a ramp, or the policy's mean token log-likelihood."""
    from megatron_rlvr.models.forward import forward_backward, split_micro_batches

    mask = (torch.arange(tokens.shape[1] - 1)[None, :] < (lengths[:, None] - 1)).float()
    target = torch.linspace(-1, 1, tokens.shape[1] - 1).expand_as(mask)
    dp, dp_rank = pg.dp.size(), pg.dp.rank()
    mine = slice(dp_rank * tokens.shape[0] // dp, (dp_rank + 1) * tokens.shape[0] // dp)
    fields = {"mask": mask[mine], "target": target[mine]}
    mbs = split_micro_batches(tokens[mine], 1, fields=fields, lengths=lengths[mine])

    def loss_fn(out, _, mb):
        f = mb.fields
        per_token = (out - f["target"]) ** 2 if value_model else -out
        return (per_token * f["mask"]).sum() / mask.sum(), {}

    model.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward(model, mbs, pg, valid_vocab_size=vocab, loss_fn=loss_fn, value_model=value_model)
    ok, _, _ = optimizer.step()
    assert ok


def _stage_state(value):
    from megatron_rlvr.models.weights import unwrap

    return {k: v.detach().clone() for k, v in unwrap(value).state_dict().items() if not k.endswith("_extra_state")}


def _policy(cfg, pg):
    from megatron_rlvr.models.llama import LlamaArch, build_llama, transformer_config
    from megatron_rlvr.models.weights import load_hf_into_model, read_hf_state
    from megatron_rlvr.parallel.model import make_trainable

    arch = LlamaArch.from_pretrained(cfg.model.path)
    model = build_llama(arch, transformer_config(arch, tp=pg.tp.size(), pp=pg.pp.size()), pg, pad_vocab_multiple=8)
    load_hf_into_model(model, read_hf_state(cfg.model.path), arch, pg)
    return make_trainable(model, pg, cfg.train.optimizer, use_distributed_optimizer=True)


def _checkpoint_worker(rank, world, model_dir, output_dir, tokens, lengths, parallel, resume):
    from megatron_rlvr.checkpoint import Checkpointer, latest_checkpoint
    from megatron_rlvr.models.llama import LlamaArch
    from megatron_rlvr.models.weights import gather_full_state

    cfg = _cfg(model_dir, output_dir, use_distributed_optimizer=True, **parallel)
    policy_pg, value, optimizer, pg = _build(cfg)
    policy, policy_optimizer = _policy(cfg, policy_pg)
    layout = {"world": world, "tp": policy_pg.tp.size(), "pp": policy_pg.pp.size(),
              "value_tp": pg.tp.size(), "value_pp": pg.pp.size()}
    checkpointer = Checkpointer(str(output_dir / "checkpoints"), {"policy": policy, "value": value},
                                {"policy": policy_optimizer, "value": optimizer}, layout)
    if resume:
        checkpointer.load(latest_checkpoint(str(output_dir / "checkpoints")))
    else:
        vocab = LlamaArch.from_pretrained(model_dir).vocab_size
        _train_step(policy, policy_optimizer, policy_pg, tokens, lengths, vocab=vocab, value_model=False)
        _train_step(value, optimizer, pg, tokens, lengths)
        checkpointer.save(1, {})
    saved = _stage_state(value)
    full = gather_full_state(value, LlamaArch.from_pretrained(model_dir), pg)
    _train_step(value, optimizer, pg, tokens, lengths)
    return saved, _stage_state(value), full


def _reader_worker(rank, world, model_dir, output_dir, parallel):
    """The saved value weights read back by a model at another TP/PP, gathered to full tensors."""
    from megatron_rlvr.checkpoint import latest_checkpoint
    from megatron_rlvr.models.convert import load_model_checkpoint
    from megatron_rlvr.models.llama import LlamaArch
    from megatron_rlvr.models.weights import gather_full_state

    _, value, _, pg = _build(_cfg(model_dir, output_dir, **parallel))
    load_model_checkpoint(value, f"{latest_checkpoint(str(output_dir / 'checkpoints'))}/value")
    return gather_full_state(value, LlamaArch.from_pretrained(model_dir), pg)


def test_value_checkpoint_round_trip_with_own_tp(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "tiny", num_hidden_layers=4)
    tokens, lengths = random_batch(model_dir, batch=4, max_len=10, seed=4)
    parallel = {"tensor_parallel": 1, "value_tensor_parallel": 2, "value_pipeline_parallel": 1}
    out = tmp_path / "out"
    written = run_workers(_checkpoint_worker, 2, model_dir, out, tokens, lengths, parallel, False, env=_env())
    resumed = run_workers(_checkpoint_worker, 2, model_dir, out, tokens, lengths, parallel, True, env=_env())
    for rank, ((saved, after, _), (loaded, after_resume, _)) in enumerate(zip(written, resumed)):
        for name in saved:
            assert torch.equal(saved[name], loaded[name]), f"rank {rank}: {name} not restored"
            # Adam's moments drive the second step: equal results need the optimizer state back too
            assert torch.equal(after[name], after_resume[name]), f"rank {rank}: {name} diverged after resume"
    saved, after, full = written[0]
    assert sum(not torch.equal(saved[n], after[n]) for n in saved) >= len(saved) - 1, "the step moved nothing"

    other = {"tensor_parallel": 1, "value_tensor_parallel": 1, "value_pipeline_parallel": 2}
    read = run_workers(_reader_worker, 2, model_dir, out, other, env=_env())
    from megatron_rlvr.models.llama import LlamaArch
    from megatron_rlvr.models.weights import full_state_to_hf

    arch = LlamaArch.from_pretrained(model_dir)
    merged = full_state_to_hf({**read[0], **read[1]}, arch)  # vocab padding (it differs with TP) stripped
    expected = full_state_to_hf(full, arch)
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), f"{name} read back at TP 1 x PP 2 differs from the TP 2 save"


def _gather_worker(rank, world, rows, width, total):
    from megatron_rlvr.models.value import gather_rows

    index = list(range(rank, total, world))  # rank r holds rows r, r + world, ...
    local = torch.stack([torch.arange(width - rank, dtype=torch.float32) + 100 * i for i in index])
    return gather_rows(local, index, total, dist.group.WORLD)


def test_gather_rows_reassembles_rows_of_unequal_width():
    total, width = 6, 5
    results = run_workers(_gather_worker, 2, None, width, total)
    expected = torch.zeros(total, width)
    for row in range(total):
        rank = row % 2
        expected[row, : width - rank] = torch.arange(width - rank, dtype=torch.float32) + 100 * row
    for got in results:
        assert torch.equal(got, expected)
