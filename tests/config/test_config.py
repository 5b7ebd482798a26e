"""Job config: YAML + dotted overrides, and every up-front error naming the key and the fix (before any process
group exists). The 8B / 70B / 405B example configs validate and plan with --dry-run."""

import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from megatron_rlvr.config import ConfigError, JobConfig, config_from_dict, load_config, parse_overrides
from megatron_rlvr.models.tiny import save_tiny_llama
from megatron_rlvr.preflight import validate

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "configs")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A valid config dict over a tiny model (4 heads, 2 KV heads, 2 layers) and one data file."""
    root = tmp_path_factory.mktemp("job")
    save_tiny_llama(str(root / "model"), "tiny")
    data = root / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "1+1?"}], "ground_truth": "2", "dataset": "gsm8k"}\n')
    return {"output_dir": str(root / "out"), "model": {"path": str(root / "model")},
            "data": {"train_files": [str(data)]}, "train": {"prompts_per_step": 4}}


def error(job, overrides, world_size=1) -> str:
    with pytest.raises(ConfigError) as info:
        validate(config_from_dict(job, overrides), world_size)
    return str(info.value)


def test_config_module_is_plain_data():
    """Reading a config loads no other part of the engine and no torch: the subsystems check their own sections."""
    probe = ("import sys, megatron_rlvr.config; print(' '.join(sorted(m for m in sys.modules if m == 'torch' or "
             "m.startswith('megatron_rlvr.'))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == ["megatron_rlvr.config"]


def test_overrides_parse_as_yaml_and_nest(job):
    cfg = config_from_dict(job, ["train.steps=7", "rollout.temperature=0.5", "data.eval_files=[a.jsonl, b.jsonl]",
                                 "train.optimizer.lr=3e-7", "reward.truncation_penalty=null"])
    assert cfg.train.steps == 7 and cfg.rollout.temperature == 0.5
    assert cfg.data.eval_files == ["a.jsonl", "b.jsonl"]
    assert cfg.train.optimizer.lr == pytest.approx(3e-7) and cfg.reward.truncation_penalty is None
    assert cfg.model.path == job["model"]["path"]  # untouched keys keep the file's values
    assert parse_overrides(["a.b=3"]) == [("a.b", 3)]


def test_yaml_file_and_relative_paths(tmp_path):
    (tmp_path / "cfg.yaml").write_text("model:\n  path: ./m\ndata:\n  train_files: [../d.jsonl, plain.jsonl]\n")
    cfg = load_config(str(tmp_path / "cfg.yaml"), ["train.steps=3"])
    assert cfg.model.path == str(tmp_path / "m")
    assert cfg.data.train_files == [os.path.normpath(str(tmp_path / ".." / "d.jsonl")), "plain.jsonl"]
    assert cfg.train.steps == 3 and isinstance(cfg, JobConfig)


@pytest.mark.parametrize("override,expected", [
    ("train.stepz=3", "unknown config key 'train.stepz'; did you mean train.steps?"),
    ("algorithmm.kl_coef=0.1", "unknown config key 'algorithmm'; did you mean algorithm?"),
    ("train.optimizer.learning_rate=1", "unknown config key 'train.optimizer.learning_rate'"),
])
def test_unknown_key_names_key_and_suggestion(job, override, expected):
    with pytest.raises(ConfigError, match="unknown config key") as info:
        config_from_dict(job, [override])
    assert expected in str(info.value)


def test_type_and_syntax_errors(job):
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer, got 'many'"):
        config_from_dict(job, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"override 'train.steps' is not key=value"):
        config_from_dict(job, ["train.steps"])


def test_tensor_parallel_must_divide_heads(job):
    msg = error(job, ["parallel.tensor_parallel=3"], world_size=3)
    assert "parallel.tensor_parallel=3 does not divide num_attention_heads=4" in msg
    assert "set parallel.tensor_parallel to one of [1, 2, 4]" in msg
    msg = error(job, ["parallel.tensor_parallel=4"], world_size=4)  # 4 heads but 2 KV heads
    assert "does not divide num_key_value_heads=2" in msg and "[1, 2]" in msg


def test_pipeline_parallel_must_divide_layers(job):
    msg = error(job, ["parallel.pipeline_parallel=3"], world_size=3)
    assert "parallel.pipeline_parallel=3 does not divide num_hidden_layers=2" in msg and "[1, 2]" in msg


def test_world_size_must_fit_layout(job):
    msg = error(job, ["parallel.tensor_parallel=2"], world_size=3)
    assert "world size 3 does not fit the layout" in msg and "multiple of tensor_parallel x pipeline_parallel = 2" in msg
    msg = error(job, ["parallel.layout=split", "parallel.rollout_ranks=2", "rollout.backend=vllm",
                      "parallel.tensor_parallel=2"], world_size=5)
    assert "2 rollout + training ranks 3 must be a multiple of tensor_parallel x pipeline_parallel = 2" in msg
    msg = error(job, ["parallel.world_size=8"], world_size=2)
    assert "parallel.world_size=8" in msg and "launch 8 ranks" in msg
    msg = error(job, ["train.prompts_per_step=3"], world_size=2)
    assert "train.prompts_per_step=3 must be a multiple of data-parallel size 2" in msg


def test_uneven_pipeline_split_is_checked(job):
    validate(config_from_dict(job, ["parallel.pipeline_parallel=2", "parallel.pipeline_first_stage_layers=1"]), 2)
    msg = error(job, ["parallel.pipeline_parallel=2", "parallel.pipeline_first_stage_layers=2"], world_size=2)
    assert "parallel.pipeline_parallel=2 with parallel.pipeline_first_stage_layers=2" in msg
    assert "leaves 0 layer(s) for 1 other stage(s)" in msg and "any first + last = 2 fits" in msg
    msg = error(job, ["parallel.pipeline_first_stage_layers=1"])
    assert "need pipeline parallel size > 1" in msg
    assert "must be >= 0" in error(job, ["parallel.pipeline_last_stage_layers=-1"])


def test_value_model_groups_are_checked(job):
    gae = ["algorithm.advantage_estimator=gae", "parallel.pipeline_parallel=2"]
    validate(config_from_dict(job, gae + ["parallel.value_tensor_parallel=2", "parallel.value_pipeline_parallel=1"]), 2)
    msg = error(job, gae + ["parallel.value_pipeline_parallel=3"], world_size=6)
    assert "parallel.value_pipeline_parallel=3 does not divide num_hidden_layers=2 of the value model" in msg
    assert "set parallel.value_pipeline_parallel to one of [1, 2]" in msg
    msg = error(job, gae + ["parallel.value_tensor_parallel=3"], world_size=6)
    assert "parallel.value_tensor_parallel=3 does not divide num_attention_heads=4" in msg
    msg = error(job, gae + ["parallel.value_tensor_parallel=2", "parallel.value_pipeline_parallel=2"], world_size=2)
    assert "training ranks 2 must be a multiple of parallel.value_tensor_parallel x " \
           "parallel.value_pipeline_parallel = 2 x 2" in msg
    msg = error(job, gae + ["parallel.value_pipeline_parallel=1", "train.prompts_per_step=2"], world_size=4)
    assert "multiple of the value model's data-parallel size 4" in msg


def test_405b_example_fits_with_its_value_model(capsys):
    from megatron_rlvr.cli import main

    assert main(["train", "--config", os.path.join(EXAMPLES, "llama-405b-tulu3.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "planner problem" not in out
    assert "value model: TP 8 x PP 2 x DP 15 over the same training ranks, groups of its own" in out
    assert "pipeline   120 x 2 ranks: [16, 136]" in out  # the value model's pipeline groups
    assert "value model (Llama-3.1-8B, 8.03 B parameters, TP 8 x PP 2 x DP 15)" in out


def test_split_layout_needs_rollout_ranks_and_vllm(job):
    assert "parallel.rollout_ranks >= 1" in error(job, ["parallel.layout=split", "rollout.backend=vllm"], 2)
    assert "set rollout.backend=vllm" in error(job, ["parallel.layout=split", "parallel.rollout_ranks=1"], 2)


def test_one_step_off_policy_needs_the_split_layout(job):
    msg = error(job, ["rollout.one_step_off_policy=true"], 1)
    assert "rollout.one_step_off_policy=true" in msg and "needs parallel.layout=split" in msg
    split = ["parallel.layout=split", "parallel.rollout_ranks=1", "rollout.backend=vllm"]
    validate(config_from_dict(job, split + ["rollout.one_step_off_policy=true"]), 2)


def test_reward_model_starts_the_value_model_not_the_policy(job, tmp_path):
    import json
    import shutil

    rm = tmp_path / "rm"
    shutil.copytree(job["model"]["path"], rm)
    config = json.loads((rm / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps(dict(config, architectures=["LlamaForSequenceClassification"])))
    gae = ["algorithm.advantage_estimator=gae"]
    validate(config_from_dict(job, gae + [f"model.value_path={rm}"]), 1)
    msg = error(job, [f"model.path={rm}"])
    assert f"model.path='{rm}' is a reward model" in msg and "point model.path at a LlamaForCausalLM" in msg


def test_missing_files(job):
    msg = error(job, ["data.train_files=[/nonexistent/train.jsonl]"])
    assert "data.train_files: file '/nonexistent/train.jsonl' does not exist" in msg
    assert "data.eval_files: file 'nope.jsonl'" in error(job, ["data.eval_files=[nope.jsonl]"])
    assert "model.path='/nonexistent' has no config.json" in error(job, ["model.path=/nonexistent"])


def test_choices_and_ranges(job):
    assert "algorithm.kl_mode='both' is not one of loss, reward" in error(job, ["algorithm.kl_mode=both"])
    assert "algorithm.advantage_estimator='ppo2' is not registered; known:" in error(
        job, ["algorithm.advantage_estimator=ppo2"])
    assert "set rollout.n >= 2" in error(job, ["rollout.n=1"])
    assert "train.steps=0 must be >= 1" in error(job, ["train.steps=0"])
    assert "reward: RewardConfig.format_reward" in error(job, ["reward.format_reward=1.0"])


def test_reward_section_is_checked(job):
    msg = error(job, ["reward.overlong_buffer=100"])
    assert "reward.overlong_buffer=100 must be at most rollout.max_tokens=64" in msg
    assert "reward: RewardConfig.truncation_penalty must be finite" in error(job, ["reward.truncation_penalty=.inf"])


def test_errors_come_before_any_process_group(job):
    from megatron_rlvr.trainer import train

    with pytest.raises(ConfigError, match="does not divide num_attention_heads"):
        train(config_from_dict(job, ["parallel.tensor_parallel=3"]))
    assert not dist.is_initialized()


def test_cli_reports_config_error(job, capsys):
    from megatron_rlvr.cli import main

    overrides = [f"{k}={v}" for k, v in (("model.path", job["model"]["path"]),
                                           ("data.train_files", f"[{job['data']['train_files'][0]}]"))]
    assert main(["train", *overrides, "train.prompts_per_step=4", "parallel.pipeline_parallel=3"]) == 2
    err = capsys.readouterr().err
    assert "config error: parallel.pipeline_parallel=3 does not divide num_hidden_layers=2" in err


@pytest.mark.parametrize("name,world,expect,engines", [
    ("llama-8b-tulu3.yaml", 8, "training ranks 4..7 as TP 4 x PP 1 x DP 1", "ranks 0..3 as 4 engine(s) of TP 1"),
    ("llama-70b-tulu3.yaml", 40, "training ranks 8..39 as TP 8 x PP 4 x DP 1", "ranks 0..7 as 1 engine(s) of TP 8"),
    ("llama-405b-tulu3.yaml", 256, "training ranks 16..255 as TP 8 x PP 10 x DP 3 (layers per stage "
                                   "11 | 13 x 8 | 11)", "ranks 0..15 as 1 engine(s) of TP 16"),
])
def test_large_configs_dry_run(name, world, expect, engines, capsys):
    from megatron_rlvr.cli import main

    assert main(["train", "--config", os.path.join(EXAMPLES, name), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"config valid for a world of {world} ranks" in out and expect in out
    assert f"rollout: backend vllm, {engines}" in out  # the rank roles the job's groups take (parallel.job_layout)
    assert "per-GPU memory estimate" in out and "process groups" in out
    assert "not on this machine (needed at launch)" in out  # the model and data live on the cluster
