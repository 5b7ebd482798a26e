"""Preference pairs from the verifiers: `pairs_from_scores` on hand-made samples, and `megatron-rlvr dpo --make-pairs`
end to end with the in-process vLLM engine on a tiny model, whose pairs re-verify (chosen passes, rejected fails) and
load as DPO training data."""

import json
import os
import subprocess
import sys

from megatron_rlvr.dpo.pairs import pairs_from_scores
from megatron_rlvr.rewards import verify
from tests.rollout.common import vllm_model_dir

PROMPT = [{"role": "user", "content": "Answer in lowercase."}]


def test_pairs_from_scores():
    texts = ["good one", "BAD", "good one", "Bad two", "partial", "good two"]
    scores = [1.0, 0.0, 1.0, 0.0, 0.5, 1.0]
    pairs = pairs_from_scores(PROMPT, texts, scores, limit=5)
    # distinct verified texts against distinct failed ones, in sample order; the partial score is neither
    assert [(p["chosen"][-1]["content"], p["rejected"][-1]["content"]) for p in pairs] == [
        ("good one", "BAD"), ("good two", "Bad two")]
    assert all(p["chosen"][:-1] == PROMPT and p["rejected"][:-1] == PROMPT for p in pairs)
    assert all(p["chosen"][-1]["role"] == "assistant" for p in pairs)
    assert len(pairs_from_scores(PROMPT, texts, scores, limit=1)) == 1
    assert pairs_from_scores(PROMPT, ["a", "b"], [1.0, 1.0], limit=3) == []  # all verified: no pair


def test_make_pairs_with_vllm(tmp_path):
    from transformers import AutoTokenizer

    from megatron_rlvr.dpo.data import load_pairs

    model = vllm_model_dir(tmp_path, std=0.02)
    truth = json.dumps({"func_name": "validate_lowercase"})
    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(16):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say something in lowercase, {i}."}],
                                "ground_truth": truth, "dataset": "ifeval"}) + "\n")
    out = tmp_path / "pairs.jsonl"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_LOGGING_LEVEL="WARNING", MEGATRON_RLVR_KERNELS="torch")
    cmd = [sys.executable, "-m", "megatron_rlvr.cli", "dpo", "--make-pairs", f"model.path={model}",
           f"pairs.prompt_files=[{prompts}]", f"pairs.output_file={out}", "pairs.samples_per_prompt=16",
           "pairs.pairs_per_prompt=2", "pairs.max_tokens=4", "pairs.max_prompt_length=64", "pairs.reward_workers=1",
           f"output_dir={tmp_path}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in open(out)]
    # the untrained model's 4-character responses are rarely lowercase (most hold no letter at all): a few prompts
    # of the 16 get a pair, and each of those re-verifies
    assert len(records) >= 1, proc.stdout + proc.stderr[-2000:]
    assert f"{len(records)} pairs from" in proc.stdout
    for record in records:
        assert record["chosen"][:-1] == record["rejected"][:-1]
        assert verify("ifeval", record["chosen"][-1]["content"], truth) == 1.0
        assert verify("ifeval", record["rejected"][-1]["content"], truth) == 0.0
    tokenizer = AutoTokenizer.from_pretrained(model)
    assert len(load_pairs([str(out)], tokenizer, None, 256)) == len(records)
