"""PPO's value path in the trainer (algorithm.advantage_estimator=gae), on the tiny model and the test sampler.

The jobs run `trainer.train` in `run_workers` processes with `trainer.update_value` wrapped, so a test sees exactly
the mini-batch the trainer fed the value update, and the value model before and after it:

- the value model learns: per step, its loss on the same rollout batch falls over the PPO epochs, its predictions
  move toward the returns, its head and trunk change, and metrics.jsonl carries the update's own value loss;
- the wiring: the mask covers response token j of a row with a P-token prompt at log-prob-frame position P - 1 + j,
  the value there is V(prompt + response[:j]) from a plain forward of the row alone, and returns and advantages
  equal a float64 GAE over the verifier reward and the k1 KL penalty;
- a checkpoint restores the value weights and the value optimizer's state exactly; the value lr warms up like the
  policy's.

Two more guard fixed value-path bugs: under sequence parallelism the values equal those without it (the head once
saw one sequence shard only), and a reward model (LlamaForSequenceClassification) starts the value model with its
score head.
"""

import copy
import dataclasses
import re

import pytest
import torch

from megatron_rlvr.metrics import read_metrics
from megatron_rlvr.testing.distributed import run_workers
from tests.trainer.common import overrides, tiny_job, worker_env

# the untrained tiny model writes a digit in about half of its responses: unequal rewards from the first step
DIGIT_REWARD = {"reward.verified_reward": 0.0, "reward.format_pattern": "'[0-9]'", "reward.format_reward": 1.0}
PPO = {"algorithm.advantage_estimator": "gae", "algorithm.kl_coef": 0.05, "algorithm.kl_mode": "reward",
       "algorithm.kl_estimator": "k1", "checkpoint.interval": 0, **DIGIT_REWARD}


def ppo_args(job: dict, output_dir, **extra) -> list[str]:
    return overrides(job, output_dir, **{**PPO, **extra})


# ------------------------------------------------------------------------------------------------ in the workers


def plain_values(model, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`[B, S-1]` float64: the value head's output at every position of each row, from a forward of the row alone
    (no padding, no micro-batching, no schedule); position t is V(tokens[:t+1])."""
    from megatron_rlvr.models.weights import unwrap

    gpt = unwrap(model)
    out = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.float64)
    with torch.no_grad():
        for row, length in enumerate(lengths.tolist()):
            values = gpt(tokens[row: row + 1, :length], torch.arange(length).unsqueeze(0), None)
            out[row, : length - 1] = values[0, : length - 1, 0].double()
    return out


def _trunk_weight(model) -> torch.Tensor:
    from megatron_rlvr.models.weights import unwrap

    return unwrap(model).decoder.layers[0].self_attention.linear_qkv.weight.detach().clone()


def _record_training(rank, world, args):
    """Train with `update_value` (and the sampler) wrapped; returns the samples of each step and, per value update,
    its mini-batch, the value model's plain predictions before and after it, its stats and lr."""
    from megatron_rlvr import trainer
    from megatron_rlvr.checkpoint import _optimizers
    from megatron_rlvr.metrics import mean_stats
    from megatron_rlvr.config import config_from_dict
    from megatron_rlvr.models.weights import unwrap
    from tests.trainer.sampling import loop_sampler

    samples, calls = [], []
    update_value = trainer.update_value

    def recording_update_value(models, batch, pg, cfg):
        entry = {"tokens": batch.tokens.cpu(), "lengths": batch.lengths.cpu(), "mask": batch.mask.cpu(),
                 "rewards": batch.rewards.cpu(), **{k: v.cpu() for k, v in batch.fields.items()},
                 "before": plain_values(models.value, batch.tokens, batch.lengths),
                 "head_before": unwrap(models.value).output_layer.weight.detach().clone(),
                 "trunk_before": _trunk_weight(models.value),
                 "value_lr": _optimizers(models.value_optimizer)[0].param_groups[0]["lr"],
                 "policy_lr": _optimizers(models.optimizer)[0].param_groups[0]["lr"]}
        stats = update_value(models, batch, pg, cfg)
        entry.update(stats=mean_stats(stats) if stats else None,
                     after=plain_values(models.value, batch.tokens, batch.lengths),
                     head_after=unwrap(models.value).output_layer.weight.detach().clone(),
                     trunk_after=_trunk_weight(models.value))
        calls.append(entry)
        return stats

    def recording_sampler(*factory_args):
        engine = loop_sampler(*factory_args)
        generate = engine.generate

        def recording_generate(prompt_ids, sampling):
            out = generate(prompt_ids, sampling)
            samples.append(out)
            return out

        engine.generate = recording_generate
        return engine

    trainer.update_value = recording_update_value
    trainer.train(config_from_dict({}, args), rollout_factory=recording_sampler)
    return {"samples": samples, "calls": calls}


def _snapshot(model, optimizer=None) -> dict:
    """Copies of the model's tensors and (when given) the optimizer's state, flattened to {path: leaf}."""
    from megatron_rlvr.checkpoint import optimizer_state
    from megatron_rlvr.models.weights import unwrap

    out = {"weights": {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()
                       if isinstance(v, torch.Tensor)}}
    if optimizer is not None:
        out["optimizer"] = {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                            for k, v in flat_leaves(optimizer_state(optimizer)).items()}
    return out


def _record_checkpoints(rank, world, args):
    """Train with `Checkpointer.save` / `load` wrapped: the value model and value optimizer as saved (by step), the
    value model just before a resume loads it (its optimizer has no state yet), and both just after."""
    from megatron_rlvr import checkpoint
    from megatron_rlvr.config import config_from_dict
    from megatron_rlvr.trainer import train
    from tests.trainer.sampling import loop_sampler

    record = {"saved": {}, "before_load": None, "after_load": None}
    save, load = checkpoint.Checkpointer.save, checkpoint.Checkpointer.load

    def recording_save(self, step, trainer_state):
        path = save(self, step, trainer_state)
        record["saved"][step] = _snapshot(self.models["value"], self.optimizers["value"])
        return path

    def recording_load(self, directory):
        record["before_load"] = _snapshot(self.models["value"])
        state = load(self, directory)
        record["after_load"] = _snapshot(self.models["value"], self.optimizers["value"])
        return state

    checkpoint.Checkpointer.save, checkpoint.Checkpointer.load = recording_save, recording_load
    train(config_from_dict({}, args), rollout_factory=loop_sampler)
    return record


# ------------------------------------------------------------------------------------------------ float64 references


def digit_reward(tokenizer, response_ids) -> float:
    return 1.0 if re.search("[0-9]", tokenizer.decode(response_ids, skip_special_tokens=True)) else 0.0


def reference_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list, list]:
    """Textbook GAE over one response, in float64: delta_j = r_j + gamma V_{j+1} - V_j (V past the end = 0),
    A_j = delta_j + gamma lam A_{j+1}, R_j = A_j + V_j."""
    advantages, running = [0.0] * len(rewards), 0.0
    for j in reversed(range(len(rewards))):
        next_value = values[j + 1] if j + 1 < len(values) else 0.0
        running = rewards[j] + gamma * next_value - values[j] + gamma * lam * running
        advantages[j] = running
    return advantages, [a + v for a, v in zip(advantages, values)]


def sample_of_row(samples, tokens: torch.Tensor, length: int):
    row = tokens[:length].tolist()
    return next(s for s in samples if list(s.prompt_ids) + list(s.response_ids) == row)


def flat_leaves(obj, prefix: str = "") -> dict:
    """Nested dicts / lists / tuples -> {path: leaf}."""
    if isinstance(obj, dict):
        return {k: v for key, item in obj.items() for k, v in flat_leaves(item, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, item in enumerate(obj) for k, v in flat_leaves(item, f"{prefix}/{i}").items()}
    return {prefix: obj}


def same_leaves(a: dict, b: dict) -> list[str]:
    """Paths where two flattened states differ (tensors compared exactly)."""
    if a.keys() != b.keys():
        return sorted(a.keys() ^ b.keys())
    differ = []
    for key, x in a.items():
        y = b[key]
        equal = torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y
        if not equal:
            differ.append(key)
    return differ


# ------------------------------------------------------------------------------------------------ tests


def squared_error(call: dict, key: str) -> float:
    """sum over response tokens of (V - R)^2 for the value model's plain predictions `key` ("before" / "after")."""
    return float((((call[key] - call["returns"].double()) * call["mask"].double()) ** 2).sum())


def test_ppo_job_trains_the_value_model(tmp_path):
    steps, epochs = 3, 4
    # no Adam momentum for the value model: every update is then a step down its current batch's loss (with
    # momentum, the previous batch's direction can outweigh the new gradient and hide a broken update)
    args = ppo_args(tiny_job(tmp_path), tmp_path / "out", **{
        "train.steps": steps, "algorithm.ppo_epochs": epochs, "train.value_optimizer.lr": 1e-3,
        "train.value_optimizer.adam_beta1": 0.0})
    ranks = run_workers(_record_training, 2, args, timeout=240, env=worker_env())

    metrics = read_metrics(str(tmp_path / "out"))
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for rank in ranks:
        assert len(rank["calls"]) == steps * epochs, "one value update per PPO epoch and mini-batch"
    for step, record in enumerate(metrics):
        assert 0.0 <= record["critic/vf_clipfrac"] <= 1.0
        # metrics.jsonl carries the update's own loss: each rank's share of the global loss, added over the
        # ranks, averaged over this step's epochs
        per_rank = [sum(c["stats"]["loss/value"] for c in r["calls"][step * epochs: (step + 1) * epochs]) / epochs
                    for r in ranks]
        assert record["loss/value"] == pytest.approx(sum(per_rank), rel=1e-6)
        assert record["loss/value"] > 0

    assert not ranks[0]["calls"][0]["head_before"].any(), "the value head starts at zero"
    for index in range(steps * epochs):
        calls = [rank["calls"][index] for rank in ranks]
        before = sum(squared_error(c, "before") for c in calls)
        after = sum(squared_error(c, "after") for c in calls)
        assert after < before, f"update {index}: predictions did not move toward the returns ({before} -> {after})"
    for step in range(steps):
        # each rank's loss is its share of the global one: their sum is the global loss on the step's batch
        losses = [sum(rank["calls"][step * epochs + epoch]["stats"]["loss/value"] for rank in ranks)
                  for epoch in range(epochs)]
        assert losses[-1] < 0.95 * losses[0], f"step {step + 1}: value loss over the epochs {losses}"
    for rank in ranks:
        assert rank["calls"][-1]["head_after"].abs().sum() > 0
        assert not torch.equal(rank["calls"][0]["trunk_before"], rank["calls"][-1]["trunk_after"]), \
            "the value trunk never changed"


def test_values_and_returns_fed_to_the_update_match_float64_gae(tmp_path):
    from transformers import AutoTokenizer

    gamma, lam, beta, epochs = 0.9, 0.8, 0.05, 2
    job = tiny_job(tmp_path)
    args = ppo_args(job, tmp_path / "out", **{"train.steps": 2, "algorithm.ppo_epochs": epochs, "algorithm.gamma": gamma,
                                              "algorithm.lam": lam, "algorithm.kl_coef": beta, "train.optimizer.lr": 3e-3,
                                              "train.value_optimizer.lr": 3e-3})
    ranks = run_workers(_record_training, 2, args, timeout=240, env=worker_env())
    tokenizer = AutoTokenizer.from_pretrained(job["model"])

    epoch0_losses = {}
    for rank in ranks:
        for step, call in enumerate(rank["calls"][::epochs], start=1):
            samples = rank["samples"][step - 1]
            tokens, lengths, mask = call["tokens"], call["lengths"], call["mask"]
            token_rewards, reference_values, reference_returns, reference_adv = (
                torch.zeros_like(mask, dtype=torch.float64) for _ in range(4))
            for row in range(tokens.shape[0]):
                sample = sample_of_row(samples, tokens[row], int(lengths[row]))
                start, n = len(sample.prompt_ids) - 1, len(sample.response_ids)
                want_mask = torch.zeros(mask.shape[1])
                want_mask[start: start + n] = 1
                assert torch.equal(mask[row], want_mask), f"step {step} row {row}: mask off the response tokens"
                reward = digit_reward(tokenizer, sample.response_ids)
                assert float(call["rewards"][row]) == reward
                positions = slice(start, start + n)
                kl = (call["old_logprobs"][row, positions] - call["ref_logprobs"][row, positions]).double()
                rewards = (-beta * kl).tolist()
                rewards[-1] += reward
                values = call["before"][row, positions].tolist()
                advantages, returns = reference_gae(rewards, values, gamma, lam)
                token_rewards[row, positions] = torch.tensor(rewards, dtype=torch.float64)
                reference_values[row, positions] = call["before"][row, positions]
                reference_returns[row, positions] = torch.tensor(returns, dtype=torch.float64)
                reference_adv[row, positions] = torch.tensor(advantages, dtype=torch.float64)
            # the value of response token j is V(prompt + response[:j]), the plain forward at position P - 1 + j
            torch.testing.assert_close(call["values"].double(), reference_values, atol=1e-5, rtol=0)
            torch.testing.assert_close(call["returns"].double(), reference_returns, atol=1e-5, rtol=0)
            m = mask.double()
            mean = (reference_adv * m).sum() / m.sum()
            std = (((reference_adv - mean) * m) ** 2).sum().div(m.sum() - 1).sqrt()
            torch.testing.assert_close(call["advantages"].double(), (reference_adv - mean) / std * m,
                                       atol=1e-4, rtol=0)
            if step > 1:
                assert reference_values.abs().max() > 1e-3, "values are ~0: a misplaced value would go unnoticed"
                assert (token_rewards * m).ne(0).sum() > m.shape[0], "the KL penalty left the rewards sparse"
            # the first epoch's loss is on these very values (nothing clipped yet): its share of the global token-mean
            epoch0_losses.setdefault(step, []).append(
                (float((0.5 * (call["before"] - reference_returns) ** 2 * m).sum()), float(m.sum()),
                 call["stats"]["loss/value"]))
    for step, shares in epoch0_losses.items():
        total_tokens = sum(tokens for _, tokens, _ in shares)
        for squared, _, reported in shares:
            assert reported == pytest.approx(squared / total_tokens, rel=1e-4, abs=1e-7), step


def test_resume_restores_value_weights_and_optimizer(tmp_path):
    base = {"checkpoint.interval": 2, "parallel.use_distributed_optimizer": "true",
            "train.value_optimizer.lr": 3e-3, "algorithm.ppo_epochs": 2}
    job = tiny_job(tmp_path)
    first = run_workers(_record_checkpoints, 2, ppo_args(job, tmp_path / "out", **base, **{"train.steps": 2}),
                        timeout=240, env=worker_env())
    resumed = run_workers(_record_checkpoints, 2, ppo_args(job, tmp_path / "out", **base, **{"train.steps": 3}),
                          timeout=240, env=worker_env())

    assert [m["step"] for m in read_metrics(str(tmp_path / "out"))] == [1, 2, 3]
    for rank, (saved_run, resumed_run) in enumerate(zip(first, resumed)):
        saved = saved_run["saved"][2]
        assert resumed_run["after_load"] is not None, "the second run did not resume"
        assert saved["weights"]["output_layer.weight"].abs().sum() > 0, "value head untrained: nothing to restore"
        assert any(isinstance(v, torch.Tensor) and v.is_floating_point() and v.abs().sum() > 0
                   for v in saved["optimizer"].values()), "no Adam moments in the saved value optimizer"
        before, after = resumed_run["before_load"], resumed_run["after_load"]
        # the freshly built value model differs from the saved one and its optimizer holds no Adam state yet, so
        # equality after the load means the checkpoint restored them
        assert same_leaves(before["weights"], saved["weights"])
        assert same_leaves(after["weights"], saved["weights"]) == [], f"rank {rank}: value weights not restored"
        assert same_leaves(after["optimizer"], saved["optimizer"]) == [], f"rank {rank}: value optimizer not restored"


def test_value_optimizer_warms_up_like_the_policy(tmp_path):
    """train.value_optimizer.warmup_steps ramps the value lr exactly as the policy's warm-up ramps its lr."""
    warmup, lr = 4, 1e-3
    args = ppo_args(tiny_job(tmp_path), tmp_path / "out", **{
        "train.steps": 2, "train.optimizer.lr": lr, "train.optimizer.warmup_steps": warmup,
        "train.value_optimizer.lr": lr, "train.value_optimizer.warmup_steps": warmup})
    [rank] = run_workers(_record_training, 1, args, timeout=240, env=worker_env())
    for step, call in enumerate(rank["calls"], start=1):
        assert call["policy_lr"] == pytest.approx(lr * step / warmup)  # the convention the value lr should follow
        assert call["value_lr"] == pytest.approx(lr * step / warmup), f"step {step}: value lr {call['value_lr']}"


# ------------------------------------------------------------------------------------------------ known bugs


def _values_with_and_without_sequence_parallel(rank, world, args):
    from megatron_rlvr import trainer
    from megatron_rlvr.config import config_from_dict
    from megatron_rlvr.data.rollout_batch import RolloutBatch
    from megatron_rlvr.models.value import build_value_model
    from megatron_rlvr.models.weights import unwrap
    from megatron_rlvr.parallel.groups import init_groups
    from megatron_rlvr.parallel.state import init_distributed

    cfg = config_from_dict({}, args)
    init_distributed()
    pg = init_groups(cfg, world, vllm=False).policy
    tokens = torch.randint(10, 60, (3, 13), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([13, 10, 7])
    mask = (torch.arange(12) < (lengths - 1).unsqueeze(1)).float()
    batch = RolloutBatch(tokens, lengths, mask, torch.zeros(3), [0, 1, 2])
    head = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    out = {}
    for sequence_parallel in (False, True):
        par = dataclasses.replace(cfg.parallel, sequence_parallel=sequence_parallel)
        model, _ = build_value_model(dataclasses.replace(cfg, parallel=par), pg)
        unwrap(model).output_layer.weight.data.copy_(head)
        out[sequence_parallel] = trainer.per_token(model, batch, pg, cfg, 1, value_model=True)
    return out


def test_values_do_not_depend_on_sequence_parallelism(tmp_path):
    args = ppo_args(tiny_job(tmp_path), tmp_path / "out", **{"parallel.tensor_parallel": 2})
    for rank in run_workers(_values_with_and_without_sequence_parallel, 2, args, timeout=240, env=worker_env()):
        assert rank[False].abs().sum() > 0
        torch.testing.assert_close(rank[True], rank[False], atol=1e-5, rtol=1e-5)


def _values_from_reward_model(rank, world, args, tokens):
    from megatron_rlvr import trainer
    from megatron_rlvr.config import config_from_dict
    from megatron_rlvr.data.rollout_batch import RolloutBatch
    from megatron_rlvr.models.value import build_value_model
    from megatron_rlvr.parallel.groups import init_groups
    from megatron_rlvr.parallel.state import init_distributed

    cfg = config_from_dict({}, args)
    init_distributed()
    pg = init_groups(cfg, world, vllm=False).policy
    model, _ = build_value_model(cfg, pg)
    length = tokens.shape[1]
    batch = RolloutBatch(tokens, torch.tensor([length]), torch.ones(1, length - 1), torch.zeros(1), [0])
    return trainer.per_token(model, batch, pg, cfg, 1, value_model=True)


def test_value_model_starts_from_a_reward_model(tmp_path):
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    job = tiny_job(tmp_path)
    config = AutoConfig.from_pretrained(job["model"], num_labels=1)
    config.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(0)
    reward_model = LlamaForSequenceClassification(config).eval()
    torch.nn.init.normal_(reward_model.score.weight, std=0.5)
    reward_model.save_pretrained(str(tmp_path / "rm"))
    AutoTokenizer.from_pretrained(job["model"]).save_pretrained(str(tmp_path / "rm"))
    tokens = torch.randint(10, 60, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reward_model.double()
        expected = reward_model.score(reward_model.model(tokens).last_hidden_state)[0, :-1, 0]

    args = ppo_args(job, tmp_path / "out", **{"model.value_path": str(tmp_path / "rm")})
    [values] = run_workers(_values_from_reward_model, 1, args, tokens, timeout=240, env=worker_env())
    torch.testing.assert_close(values[0].double(), expected, atol=1e-4, rtol=1e-4)


def _value_inputs(ranks) -> dict:
    """(step, row tokens) -> the values and returns the value update received for that row (response tokens)."""
    out = {}
    for rank in ranks:
        for step, call in enumerate(rank["calls"]):
            for row in range(call["tokens"].shape[0]):
                key = (step, tuple(call["tokens"][row, : int(call["lengths"][row])].tolist()))
                on = call["mask"][row].bool()
                out.setdefault(key, []).append((call["values"][row][on], call["returns"][row][on]))
    return out


def test_value_model_on_its_own_grid_gets_the_same_inputs(tmp_path):
    """The policy trains with DP 2; the value model once on the same grid and once on its own (TP 2, DP 1: each
    rank values all rows, gathered to the policy ranks for GAE, returns gathered back). Same seeds, so the value
    update of every row gets the same values and returns in both runs (fp32, different TP: within 1e-5)."""
    job = tiny_job(tmp_path)
    common = {"train.steps": 2, "algorithm.ppo_epochs": 1, "train.value_optimizer.lr": 3e-3}
    shared = run_workers(_record_training, 2, ppo_args(job, tmp_path / "shared", **common), timeout=240,
                         env=worker_env())
    own = run_workers(_record_training, 2, ppo_args(job, tmp_path / "own", **common,
                                                    **{"parallel.value_tensor_parallel": 2}),
                      timeout=240, env=worker_env())
    # the value grid really differs: its one data-parallel replica updates on every row, the policy's on half
    assert own[0]["calls"][0]["tokens"].shape[0] == 2 * shared[0]["calls"][0]["tokens"].shape[0]
    expected, got = _value_inputs(shared), _value_inputs(own)
    assert expected.keys() == got.keys()
    assert max(v.abs().max() for (step, _), entries in got.items() if step == 1 for v, _ in entries) > 1e-3, \
        "step 2 values are ~0: the comparison would prove nothing"
    for key, entries in got.items():
        want_values, want_returns = expected[key][0]
        for values, returns in entries:
            torch.testing.assert_close(values, want_values, atol=1e-5, rtol=0)
            torch.testing.assert_close(returns, want_returns, atol=1e-5, rtol=0)
