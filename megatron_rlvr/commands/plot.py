"""`megatron-rlvr plot OUTPUT_DIR`: reward, KL, response-length, timing, loss and DPO reward curves of `OUTPUT_DIR/metrics.jsonl`
as PNG files (default `OUTPUT_DIR/plots/`)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", help="a training output directory (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default OUTPUT_DIR/plots)")


def run(args: argparse.Namespace) -> int:
    from megatron_rlvr.metrics import plot_metrics

    for path in plot_metrics(args.output_dir, args.out):
        print(path)
    return 0
