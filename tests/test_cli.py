"""`megatron-rlvr --help` and every subcommand's `--help` work through the installed console script."""

import pickle
import shutil
import subprocess

import pytest

from megatron_rlvr.cli import SUBCOMMANDS, build_parser
from megatron_rlvr.commands.bench import BENCHMARKS


def _run(*args):
    exe = shutil.which("megatron-rlvr")
    assert exe, "the megatron-rlvr console script is not installed (pip install -e .)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)


def test_top_level_help_lists_every_subcommand():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    for name in ("train", "convert", "bench", "plan", "eval"):
        assert name in proc.stdout


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_subcommand_help(name):
    proc = _run(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: megatron-rlvr {name}")


def test_no_subcommand_is_an_error():
    proc = _run()
    assert proc.returncode == 2


def test_bench_lists_benchmarks():
    proc = _run("bench", "--help")
    for name in ("kernels", "sync", "train", "partition", "rewards"):
        assert name in proc.stdout


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_bench_arguments_pickle(name):
    """Benchmarks hand their parsed arguments to spawned workers: the namespace must pickle."""
    args = build_parser("bench").parse_args(["bench", name])
    assert pickle.loads(pickle.dumps(args)).benchmark == name
