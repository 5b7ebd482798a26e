"""The megatron policy's per-token log-probs equal HF transformers' LlamaForCausalLM on the same weights.

Real processes over gloo for each layout (TP, PP, TP x PP, DP, an uneven PP=3 split); reference: HF Llama in float64 on the same
fp32 weights. Tolerance: relative error <= 1e-5 on fp32 log-probs.
"""

import pytest
import torch

from megatron_rlvr.testing.distributed import run_workers
from tests.models.common import hf_reference_logprobs, random_batch, tiny_model_dir, worker_env


def _logprobs_worker(rank, world, tp, pp, ends, model_dir, tokens, lengths, micro_batch_size):
    from megatron_rlvr.models.forward import forward_backward, split_micro_batches
    from megatron_rlvr.models.llama import LlamaArch, build_llama, transformer_config
    from megatron_rlvr.models.stages import PipelineSplit
    from megatron_rlvr.models.weights import load_hf_into_model, read_hf_state
    from megatron_rlvr.parallel.state import init_model_parallel

    pg = init_model_parallel(tp, pp)
    arch = LlamaArch.from_pretrained(model_dir)
    first, last = ends
    config = transformer_config(arch, tp=tp, pp=pp, first_stage_layers=first, last_stage_layers=last)
    model = build_llama(arch, config, pg, pad_vocab_multiple=16)
    expected = PipelineSplit(arch.num_layers, pp, first, last).counts()[pg.pp.rank()]
    assert len(model.decoder.layers) == expected, f"stage {pg.pp.rank()} built {len(model.decoder.layers)} layers"
    load_hf_into_model(model, read_hf_state(model_dir), arch, pg)
    model.eval()
    dp, dp_rank = pg.dp.size(), pg.dp.rank()
    mine = slice(dp_rank * tokens.shape[0] // dp, (dp_rank + 1) * tokens.shape[0] // dp)
    mbs = split_micro_batches(tokens[mine], micro_batch_size, lengths=lengths[mine])
    with torch.no_grad():
        out = forward_backward(model, mbs, pg, valid_vocab_size=arch.vocab_size)
    if not out or pg.tp.rank() != 0:
        return None
    width = tokens.shape[1] - 1
    rows = [torch.nn.functional.pad(o["logprobs"], (0, width - o["logprobs"].shape[1])) for o in out]
    return mine.start, torch.cat(rows)


@pytest.mark.parametrize(
    "name,layers,tp,pp,ends,world",
    [
        ("tiny", None, 1, 1, (None, None), 1),
        ("tiny", None, 2, 1, (None, None), 2),
        ("tiny-tied", None, 1, 2, (None, None), 2),
        ("tiny-tied", None, 2, 2, (None, None), 4),
        ("tiny", None, 1, 1, (None, None), 2),  # DP=2
        ("tiny", 7, 1, 3, (2, 2), 3),  # uneven pipeline: 2 | 3 | 2 layers
    ],
    ids=["tp1", "tp2", "pp2-tied-rope-scaled", "tp2xpp2", "dp2", "pp3-uneven-2-3-2"],
)
def test_logprobs_match_hf(tmp_path, name, layers, tp, pp, ends, world):
    model_dir = tiny_model_dir(tmp_path, name, **({"num_hidden_layers": layers} if layers else {}))
    tokens, lengths = random_batch(model_dir, batch=4, max_len=14, seed=world * 10 + tp)
    results = run_workers(
        _logprobs_worker, world, tp, pp, ends, model_dir, tokens, lengths, 1, env=worker_env()
    )
    got = torch.zeros(tokens.shape[0], tokens.shape[1] - 1)
    covered = torch.zeros(tokens.shape[0], dtype=torch.bool)
    for item in results:
        if item is not None:
            start, rows = item
            got[start : start + rows.shape[0]] = rows
            covered[start : start + rows.shape[0]] = True
    assert covered.all(), "some rows were not produced by any rank"
    ref = hf_reference_logprobs(model_dir, tokens)
    for row, length in enumerate(lengths.tolist()):
        g, r = got[row, : length - 1].double(), ref[row, : length - 1]
        rel = ((g - r).abs() / r.abs().clamp_min(1e-6)).max().item()
        assert rel <= 1e-5, f"row {row}: relative error {rel:.2e} > 1e-5"
