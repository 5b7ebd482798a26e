"""Kernel tests run the Triton kernels compiled on a GPU when there is one, else through Triton's
interpreter on CPU tensors. TRITON_INTERPRET must be set before the kernels module is imported (the
kernels are imported on first use, inside this package's tests), and is restored afterwards so that
other test packages keep their own backend choice."""

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="package", autouse=True)
def triton_interpreter_on_cpu():
    if DEVICE == "cuda":
        yield
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = previous


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def rng() -> torch.Generator:
    """A generator on a fresh seed each run (printed, so a failure can be replayed)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed: {seed}")
    return torch.Generator().manual_seed(seed)
