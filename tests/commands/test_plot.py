"""`megatron-rlvr plot` draws one PNG per panel from metrics.jsonl, skipping panels with no data; the metrics
writer truncates to the resumed step and tolerates a torn last line."""

import json

from megatron_rlvr.cli import main
from megatron_rlvr.metrics import MetricsWriter, read_metrics


def test_plot_writes_pngs(tmp_path, capsys):
    writer = MetricsWriter(str(tmp_path), enabled=True, tensorboard=False)
    for step in range(1, 6):
        writer.log({"step": step, "reward_mean": step / 10, "kl": 0.01 * step, "response_length/mean": 7.0,
                    "timing/generate_s": 1.0, "timing/train_s": 0.5, "timing/sync_s": 0.0})
    writer.close()
    assert main(["plot", str(tmp_path)]) == 0
    written = capsys.readouterr().out.split()
    names = sorted(p.rsplit("/", 1)[-1] for p in written)
    assert names == ["kl.png", "response_length.png", "reward.png", "timing.png"]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_truncates_and_torn_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "reward_mean": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "rew')
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]
    writer = MetricsWriter(str(tmp_path), enabled=True, tensorboard=False, resume_step=3)
    writer.log({"step": 4, "reward_mean": 40})
    assert [(r["step"], r["reward_mean"]) for r in read_metrics(str(tmp_path))] == [(1, 1), (2, 2), (3, 3), (4, 40)]
