"""`megatron-rlvr bench kernels` runs end to end at a tiny size and reports consistent results."""

from __future__ import annotations

import argparse
import json

from megatron_rlvr.benchmarks import kernels as bench


def test_bench_kernels_tiny(tmp_path, device):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--tokens", "16", "--vocab", "300", "--hidden", "16", "--dtype", "fp32",
                              "--iters", "1", "--warmup", "1", "--device", device, "--json", str(out),
                              "--skip", "torch.compile", "megatron-core", "liger"])
    assert bench.run(args) == 0
    payload = json.loads(out.read_text())
    rows = {row["case"]: row for row in payload["results"]}
    ours = [row for name, row in rows.items() if name.startswith("ours token_logprobs") and "entropy" not in name]
    assert len(ours) == 1 and "[triton" in ours[0]["case"]
    for name in (ours[0]["case"], "torch fp32 log_softmax+gather", "ours linear_token_logprobs"):
        row = rows[name]
        assert row["skipped"] is None, row
        assert row["fwd_ms"] > 0 and row["fwdbwd_ms"] > 0
        assert row["max_abs_err"] < 1e-4, row  # same log-probs as the torch fp32 path
    assert rows["torch.compile(log_softmax+gather)"]["skipped"] == "--skip"
