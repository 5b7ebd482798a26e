"""`megatron-rlvr eval` scores a model's greedy responses on held-out records with their verifiers: its accuracy
equals an independent computation with HF transformers' greedy decoding and `rewards.verify` on the same prompts."""

import json
import os
import re
import subprocess
import sys

import torch

from megatron_rlvr.models.tiny import save_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_TOKENS = 8


def _env() -> dict:
    env = dict(os.environ, MEGATRON_RLVR_KERNELS="torch", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _records(model_dir: str, questions: list[str]) -> tuple[list[dict], float]:
    """Records whose ground truth is the last number of HF's greedy response on even rows (so those score 1) and
    that number + 1 on odd rows (score 0); the expected accuracy follows."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    records, hits = [], 0
    for row, question in enumerate(questions):
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        numbers = re.findall(r"\d+", text)
        answer = int(numbers[-1]) if numbers else -1
        truth = answer if row % 2 == 0 else answer + 1
        hits += int(row % 2 == 0 and bool(numbers))
        records.append({"messages": messages, "ground_truth": str(truth), "dataset": "gsm8k"})
    return records, hits / len(questions)


def test_eval_matches_hf_greedy_and_verifier(tmp_path):
    model_dir = str(tmp_path / "model")
    save_tiny_llama(model_dir, "tiny", seed=3)
    questions = [f"Q{i}: what is {i} plus {i + 2}?" for i in range(12)]
    records, expected = _records(model_dir, questions)
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rlvr.cli", "eval", f"model.path={model_dir}", f"data.train_files=[{data}]",
         f"data.eval_files=[{data}]", "rollout.backend=megatron", f"rollout.max_tokens={MAX_TOKENS}",
         "model.pad_vocab_multiple=8", "reward.workers=1", "--json", str(out)],
        env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(out.read_text())["accuracy"] == expected


def test_eval_without_eval_files_is_a_config_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_rlvr.cli", "eval", "model.path=x"],
                          env=_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "data.eval_files is empty" in proc.stderr
