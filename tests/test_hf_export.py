"""The streamed HF export at TP 2 x PP 2 (4 real ranks over gloo):

- the directory holds safetensors shards with an index (a small shard limit forces several), and every tensor
  equals, bit for bit, the HF checkpoint the model was built from (what `convert --from mcore --to hf` gives
  back: its round trip is bit-exact, tests/models/test_convert.py), loaded by transformers' own safetensors
  reader through the index;
- no rank's resident memory grows during an export by more than a few times the largest full tensor (sampled
  every millisecond; the second of two exports, past one-off start-up costs), far below one pipeline stage's
  full weights, which the gather-everything export held.
"""

import json
import os
import threading
import time

import torch

from megatron_rlvr.testing.distributed import run_workers
from tests.models.common import tiny_model_dir, worker_env

SHARD_BYTES = 4 << 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(rank, world, model_dir, out):
    import gc

    import megatron_rlvr.models.convert  # noqa: F401 - what the export imports, loaded before the baseline
    from megatron_rlvr.hf_export import export_hf
    from megatron_rlvr.models.llama import LlamaArch, build_llama, transformer_config
    from megatron_rlvr.models.weights import load_hf_into_model, read_hf_state
    from megatron_rlvr.parallel.state import init_model_parallel

    pg = init_model_parallel(2, 2)
    arch = LlamaArch.from_pretrained(model_dir)
    model = build_llama(arch, transformer_config(arch, tp=2, pp=2), pg, pad_vocab_multiple=16)
    state = read_hf_state(model_dir)
    load_hf_into_model(model, state, arch, pg)
    largest = max(t.numel() * t.element_size() for t in state.values())
    del state
    stage_full_bytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters())  # TP 2: x2 = full stage
    extra = []
    for target in (out + "-first", out):
        # the first export also pays one-off costs (gloo's first point-to-point buffers, allocator arenas); the
        # second shows what an export holds
        gc.collect()
        baseline, peak, running = _rss(), [0], [True]

        def sample(peak=peak, running=running):
            while running[0]:
                peak[0] = max(peak[0], _rss())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample)
        sampler.start()
        export_hf(model, arch, pg, model_dir, target, max_shard_bytes=SHARD_BYTES)
        running[0] = False
        sampler.join()
        extra.append(peak[0] - baseline)
    return {"extra": extra[-1], "first": extra[0], "largest": largest, "stage": stage_full_bytes}


def test_streamed_export_tp2_pp2_bounded_and_bit_exact(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "tiny", hidden_size=256, num_hidden_layers=16, num_attention_heads=8,
                               num_key_value_heads=4, intermediate_size=512)
    out = str(tmp_path / "hf")
    results = run_workers(_worker, 4, model_dir, out, env=worker_env())

    from safetensors.torch import load_file

    from megatron_rlvr.models.weights import read_hf_state

    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all(os.path.isfile(os.path.join(out, name)) for name in files)
    exported = {}
    for name in files:
        exported.update(load_file(os.path.join(out, name)))
    source = read_hf_state(model_dir)
    assert sorted(exported) == sorted(source)
    for name, tensor in source.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in source.values())
    assert os.path.isfile(os.path.join(out, "config.json")) and os.path.isfile(os.path.join(out, "tokenizer.json"))

    for r in results:
        bound = 4 * r["largest"] + (2 << 20)  # gathered shards + the full tensor + its HF pieces, plus slack
        assert r["extra"] <= bound, results
        assert bound < r["stage"], "the model must be big enough for the bound to mean something"
