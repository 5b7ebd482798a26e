"""Layout planner: memory arithmetic on a hand-computed case, the Tülu 3 405B prediction against the published
step, bad plans and their fixes, and the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest

from megatron_rlvr.cli import main
from megatron_rlvr.planner import CLUSTER_PRESETS, ClusterSpec, Efficiency, Layout, ModelSpec, load_model, make_plan
from megatron_rlvr.planner.presets import PRESETS

H100 = CLUSTER_PRESETS["h100-80g"]

# hidden 64, ffn 128, 4 layers, 4 heads of 16, 2 KV heads, vocab 100
TINY = ModelSpec("tiny", hidden=64, ffn=128, layers=4, heads=4, kv_heads=2, vocab=100)


def _tulu_plan(**layout_changes):
    preset = PRESETS["tulu3-405b"]
    layout = Layout(**{**preset.layout, "value_model": preset.value_model, **layout_changes})
    return make_plan(load_model(preset.model), ClusterSpec(gpus=preset.gpus, **H100), layout,
                     Efficiency(**preset.efficiency))


def test_tulu3_405b_predicts_published_step_within_factor_two():
    plan = _tulu_plan()
    assert plan.ok, plan.problems
    published = PRESETS["tulu3-405b"].published
    predicted = {"generate": plan.generate.seconds, "sync": plan.sync.seconds, "train": plan.train.seconds}
    for phase, seconds in predicted.items():
        assert 0.5 * published[phase] <= seconds <= 2.0 * published[phase], (phase, seconds, published[phase])
    total = sum(published.values())
    assert 0.5 * total <= plan.step_seconds <= 2.0 * total


def test_tulu3_405b_changes_move_the_right_way():
    base = _tulu_plan()
    bucketed = _tulu_plan(sync="bucketed")
    fused = _tulu_plan(logprob_kernel="fused")
    packed = _tulu_plan(packing=True, pack_tokens=4096)
    assert bucketed.sync.seconds < base.sync.seconds
    assert fused.train_memory.logits == pytest.approx(base.train_memory.logits * 2 / 10)
    assert fused.train.parts["log-prob kernels"] < base.train.parts["log-prob kernels"]
    assert packed.ok and packed.train.seconds < 0.6 * base.train.seconds
    assert packed.train.facts["micro-batches per rank"] < base.train.facts["micro-batches per rank"]


def test_named_sizes_match_published_parameter_counts():
    for name, billions in (("8B", 8.03), ("70B", 70.55), ("405B", 405.85)):
        assert load_model(name).params / 1e9 == pytest.approx(billions, rel=2e-3)


def test_hf_config_json_is_read(tmp_path):
    config = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_model(str(tmp_path))
    assert model.params == load_model("8B").params
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="missing field\\(s\\) vocab_size"):
        load_model(str(tmp_path / "bad.json"))


def _tiny_layout(**changes):
    base = dict(placement="split", train_gpus=8, rollout_gpus=8, tp=2, pp=2, dp=2, rollout_tp=2, kl_beta=0.0,
                prompts_per_step=8, samples_per_prompt=1, prompt_len=8, max_prompt_len=16, response_len=16,
                mean_response_len=16, micro_batch_size=1, recompute="none", logprob_kernel="fused", ppo_epochs=1)
    return Layout(**{**base, **changes})


def test_memory_arithmetic_hand_computed():
    plan = make_plan(TINY, ClusterSpec(gpus=16, **H100), _tiny_layout())
    assert plan.ok, plan.problems
    # per layer: q,o 2*64*64 + k,v 2*64*32 + gate/up/down 3*64*128 + two norms 2*64 = 36992
    # first stage: 2 layers + embedding 100*64 = 80384 parameters
    first = 2 * 36992 + 6400
    memory = plan.train_memory
    assert memory.stage == "first stage"
    assert memory.weights == 2 * first / 2  # bf16 over TP 2
    assert memory.grads == 4 * first / 2  # fp32 main grads over TP 2
    assert memory.optimizer == 12 * first / 4  # fp32 master + Adam m, v over TP 2 x DP 2
    assert memory.reference == 0 and memory.value_model == 0 and memory.logits == 0
    # one micro-batch = 16 + 16 tokens; per token per layer 12*64 + 4*2*16 + 6*128 = 1664 bytes, over TP 2;
    # 4 sequences per DP rank -> 4 micro-batches, 1F1B keeps min(PP=2, 4) = 2 in flight on the first stage
    assert memory.activations == 32 * 1664 / 2 * 2 * 2
    assert memory.total == 6 * first + 106496

    full = make_plan(TINY, ClusterSpec(gpus=16, **H100), _tiny_layout(recompute="full")).train_memory
    # layer inputs only (2*64 bytes per token, over TP 2) + one layer's activations for the recompute
    assert full.activations == 32 * 128 / 2 * 2 * 2 + 32 * 1664 / 2


def test_train_flops_hand_computed():
    cluster = ClusterSpec(gpus=16, **H100)
    plan = make_plan(TINY, cluster, _tiny_layout())
    # forward per token: 2 * (4 layers * 36992 + LM head 6400) + attention 2 * 4 layers * 32 tokens * 4 heads * 16
    forward = 2 * (4 * 36992 + 6400) + 2 * 4 * 32 * 64
    # old-policy log-probs (1 forward) + one epoch of forward+backward (3 forwards), 8 sequences x 32 tokens
    flops = 8 * 32 * 4 * forward
    assert plan.train.facts["PFLOP per step"] == pytest.approx(flops / 1e15)
    assert plan.train.parts["compute"] == pytest.approx(flops / (8 * 989e12 * Efficiency().train_mfu))
    assert plan.train.parts["pipeline bubble"] == pytest.approx(plan.train.parts["compute"] * (2 - 1) / 4)


def test_rollout_kv_cache_hand_computed():
    plan = make_plan(TINY, ClusterSpec(gpus=16, **H100), _tiny_layout())
    # K and V, 4 layers, 2 KV heads over rollout TP 2 = 1 per GPU, head dim 16, bf16
    per_token = 2 * 4 * 1 * 16 * 2
    budget = 0.9 * 80 * 2**30 - 2 * TINY.params / 2 - 2 * 2**30
    assert plan.rollout_memory.kv_tokens == int(budget // per_token)


@pytest.mark.parametrize(
    "model, layout, what, fix",
    [
        ("70B", dict(train_gpus=16, rollout_gpus=8, tp=3, rollout_tp=8),
         "train TP 3 does not divide the 64 attention heads and 8 KV heads", "[1, 2, 4, 8] (nearest: [4, 2])"),
        ("8B", dict(train_gpus=16, rollout_gpus=8, tp=2, rollout_tp=3),
         "rollout TP 3 must divide the 32 attention heads", "rollout TP in [1, 2, 4, 8, 16, 32]"),
        ("405B", dict(train_gpus=240, rollout_gpus=16, tp=8, pp=5, rollout_tp=16),
         "PP 5 does not divide the 126 layers", "(nearest: [6, 7]), or give the first/last stage their own layer "
         "counts, --pp-first-layers / --pp-last-layers (at pp=5, first = last in [3, 6, 9, 12, 15, 18, 21, 24] fit)"),
        ("8B", dict(train_gpus=16, rollout_gpus=8, tp=2, pp=2, dp=3, rollout_tp=2),
         "world size: TP 2 x PP 2 x DP 3 = 12 but 16 training GPUs", "use DP 4"),
        ("8B", dict(train_gpus=24, rollout_gpus=8, tp=2, rollout_tp=2),
         "train 24 + rollout 8 GPUs exceed the cluster's 24", "add nodes: 4 nodes of 8 (now 3)"),
        ("8B", dict(train_gpus=8, rollout_gpus=8, tp=2, micro_batch_size=8, recompute="none", response_len=2048,
                    prompt_len=512), "training does not fit", "enable full activation recompute (--recompute full)"),
        ("405B", dict(train_gpus=240, rollout_gpus=16, tp=8, pp=6, rollout_tp=16, packing=True, value_model="8B",
                      value_pp=2, response_len=1024, prompt_len=200, max_prompt_len=400, prompts_per_step=1856),
         "training does not fit", "raise PP to 10 with 11 | 13 x 8 | 11 layers per stage (--pp 10 "
         "--pp-first-layers 11 --pp-last-layers 11, DP 3)"),
        ("405B", dict(train_gpus=240, rollout_gpus=16, tp=8, pp=6, rollout_tp=16, value_model="8B"),
         "value PP 6 does not divide the 32 layers of the value model", "set --value-pp (unset: the policy's --pp) "
         "to one of [1, 2, 4, 8, 16, 32]"),
        ("405B", dict(train_gpus=240, rollout_gpus=16, tp=8, pp=2, rollout_tp=16, value_model="8B", value_pp=4),
         "value TP 8 x PP 4 = 32 does not divide the 240 training GPUs", "--value-tp"),
        ("405B", dict(train_gpus=240, rollout_gpus=16, tp=8, pp=10, pp_first_layers=5, pp_last_layers=5,
                      rollout_tp=16), "leaves 116 layer(s) for 8 other stage(s)", "--pp-first-layers"),
        ("70B", dict(train_gpus=8, rollout_gpus=8, tp=8, rollout_tp=1, grad_dtype="bf16", response_len=1024),
         "rollout does not fit", "raise rollout TP to 2 (--rollout-tp 2)"),
    ],
)
def test_bad_plans_name_the_problem_and_the_fix(model, layout, what, fix):
    gpus = {"70B": 16, "8B": 24, "405B": 256}[model]
    plan = make_plan(load_model(model), ClusterSpec(gpus=gpus, **H100), Layout(**layout))
    assert not plan.ok
    matching = [p for p in plan.problems if what in p.what]
    assert matching, [dataclasses.asdict(p) for p in plan.problems]
    assert fix in matching[0].fix


def test_cli_json_and_exit_codes(capsys):
    assert main(["plan", "--preset", "tulu3-405b", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["published_seconds"]["train"] == 1500.0
    assert report["memory_gib"]["train"]["total"] < report["memory_gib"]["capacity"]
    assert any(line.startswith("train_mfu = 0.2:") for line in report["assumptions"])

    assert main(["plan", "--model", "70B", "--gpus", "16", "--train-gpus", "8", "--rollout-gpus", "8",
                 "--tp", "3"]) == 1
    out = capsys.readouterr().out
    assert "BAD PLAN" in out and "fix: use train TP in [1, 2, 4, 8]" in out


def test_uneven_split_and_value_groups_memory_hand_computed():
    """Per-stage memory follows the split (1F1B: stage s keeps min(pp - s, micro-batches) in flight), and a value
    model on its own grid adds the states of the value stage that shares each GPU."""
    value = ModelSpec("v", hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, vocab=100)
    layout = _tiny_layout(train_gpus=6, tp=1, pp=3, dp=2, pp_first_layers=1, pp_last_layers=1, kl_beta=0.0,
                          value_model="", prompts_per_step=12)
    layer, emb = 36992, 6400
    model = dataclasses.replace(TINY, layers=5)  # 1 | 3 | 1
    plan = make_plan(model, ClusterSpec(gpus=16, **H100), layout)
    assert plan.ok, plan.problems
    memory = plan.train_memory
    # 6 sequences per DP rank = 6 micro-batches; stage 1 holds 3 layers with min(3 - 1, 6) = 2 in flight,
    # stage 0 one layer + embedding with 3 in flight: stage 1 is the worst
    assert memory.stage == "stage 1"
    assert memory.weights == 2 * 3 * layer and memory.optimizer == 12 * 3 * layer / 2
    assert memory.activations == 32 * 1664 * 3 * 2

    from megatron_rlvr.planner.memory import train_memory
    from megatron_rlvr.planner.timing import micro_batches_per_rank

    # value model TP 1 x PP 2 x DP 3 over the same 6 GPUs: GPUs 0-2 hold value stage 0 (1 layer + embedding),
    # GPUs 3-5 stage 1 (1 layer, final norm, scalar head); policy stage 1 sits on GPUs 2-3, so both pairs occur
    with_value = dataclasses.replace(plan.layout, value_pp=2)
    got = train_memory(model, with_value, Efficiency(), value, micro_batches_per_rank(with_value, Efficiency()))
    # bf16 weights + fp32 gradients over TP 1, fp32 master + Adam over TP 1 x value DP 3
    value_first = 2 * (layer + emb) + 4 * (layer + emb) + 12 * (layer + emb) / 3
    assert got.value_model == value_first
    assert got.stage == "stage 1, value model stage 0"
    assert got.total == memory.total + value_first
