"""Checkpoint conversion: HF Llama safetensors <-> megatron-core distributed checkpoints at any TP/PP.

A megatron checkpoint directory holds megatron-core `dist_checkpointing` shards (global shapes, so a TP=2 save
loads at TP=1 or PP=2) and `megatron_rlvr.json`: the HF config, the padded vocab size and the layout it was
written with. Conversions copy tensors, never compute on them, so HF -> megatron -> HF is bit-exact. Every
conversion writes into a temporary sibling directory and renames it into place only when complete: a failed
conversion leaves no half-written output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from megatron_rlvr.models.llama import LlamaArch, build_llama, transformer_config
from megatron_rlvr.models.stages import PipelineSplit

METADATA = "megatron_rlvr.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja")
DEFAULT_PAD_MULTIPLE = 128  # megatron's make_vocab_size_divisible_by: shards stay aligned at any power-of-2 TP


def save_model_checkpoint(model: torch.nn.Module | None, directory: str) -> None:
    """Collective over the whole world: write `model`'s sharded state with megatron dist_checkpointing.

    dist_checkpointing coordinates over the default group, so ranks that hold no part of the model (the rollout
    ranks of the split layout) take part with `model=None`."""
    from megatron.core import dist_checkpointing

    from megatron_rlvr.models.weights import unwrap

    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(_sharded_state_dict(unwrap(model)) if model is not None else {}, directory)


def _sharded_state_dict(model: torch.nn.Module):
    # the model's own data-parallel group: megatron would otherwise read its global one, which the explicit
    # groups of a layout (parallel.layout) do not set
    return model.sharded_state_dict(metadata={"dp_cp_group": model.pg_collection.dp_cp})


def load_model_checkpoint(model: torch.nn.Module | None, directory: str) -> None:
    """Collective over the whole world: fill `model` (any TP/PP) from a checkpoint written by
    `save_model_checkpoint`; ranks without a part of the model pass None."""
    from megatron.core import dist_checkpointing

    from megatron_rlvr.models.weights import unwrap

    if model is None:
        dist_checkpointing.load({}, directory)
        return
    inner = unwrap(model)
    state = dist_checkpointing.load(_sharded_state_dict(inner), directory)
    inner.load_state_dict(state, strict=True)


def read_metadata(directory: str) -> dict:
    path = os.path.join(directory, METADATA)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: not a megatron-rlvr checkpoint (no {METADATA})")
    with open(path) as f:
        return json.load(f)


def _hf_dtype(hf: dict[str, torch.Tensor], source: str) -> torch.dtype:
    dtypes = {t.dtype for t in hf.values()}
    if len(dtypes) != 1:
        raise ValueError(f"{source}: tensors have mixed dtypes {sorted(map(str, dtypes))}; expected one")
    return dtypes.pop()


def _build(arch: LlamaArch, split: PipelineSplit, tp: int, dtype: torch.dtype, padded_vocab: int):
    from megatron_rlvr.parallel.state import init_model_parallel

    pg = init_model_parallel(tp, split.pp)
    config = transformer_config(arch, tp=tp, pp=split.pp, params_dtype=dtype, first_stage_layers=split.first,
                                last_stage_layers=split.last)
    return build_llama(arch, config, pg, padded_vocab_size=padded_vocab), pg


def _hf_to_mcore_worker(rank, world, src, dst, tp, split, padded_vocab):
    from megatron_rlvr.models.weights import load_hf_into_model, read_hf_state

    arch = LlamaArch.from_pretrained(src)
    hf = read_hf_state(src)
    model, pg = _build(arch, split, tp, _hf_dtype(hf, src), padded_vocab)
    load_hf_into_model(model, hf, arch, pg)
    save_model_checkpoint(model, dst)


def _reshard_worker(rank, world, src, dst, tp, split):
    meta = read_metadata(src)
    arch = LlamaArch.from_hf_config(meta["hf_config"], source=os.path.join(src, METADATA))
    model, _ = _build(arch, split, tp, getattr(torch, meta["dtype"]), meta["padded_vocab_size"])
    load_model_checkpoint(model, src)
    save_model_checkpoint(model, dst)


def _mcore_to_hf_worker(rank, world, src, dst):
    from safetensors.torch import save_file

    from megatron_rlvr.models.weights import full_state_to_hf, gather_full_state

    meta = read_metadata(src)
    arch = LlamaArch.from_hf_config(meta["hf_config"], source=os.path.join(src, METADATA))
    model, pg = _build(arch, PipelineSplit(arch.num_layers), 1, getattr(torch, meta["dtype"]),
                       meta["padded_vocab_size"])
    load_model_checkpoint(model, src)
    hf = full_state_to_hf(gather_full_state(model, arch, pg), arch)
    save_file({k: v.contiguous() for k, v in hf.items()}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})


class AtomicOutput:
    """A temporary sibling of `dst` that replaces it only on success (removed on failure)."""

    def __init__(self, dst: str):
        self.dst = os.path.abspath(dst)
        if os.path.exists(self.dst) and os.listdir(self.dst):
            raise FileExistsError(f"{dst}: output directory exists and is not empty; choose a new path")

    def __enter__(self) -> str:
        parent = os.path.dirname(self.dst)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=os.path.basename(self.dst) + ".tmp-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if os.path.isdir(self.dst):
            os.rmdir(self.dst)  # empty (checked in __init__)
        os.rename(self.tmp, self.dst)
        return False


def _launch(fn, world: int, *args) -> None:
    from megatron_rlvr.testing.distributed import run_workers

    run_workers(fn, world, *args, env={"MEGATRON_RLVR_DEVICE": "cpu"})


def _write_metadata(directory: str, hf_config: dict, dtype: torch.dtype, padded: int, tp: int,
                    split: PipelineSplit) -> None:
    meta = {"hf_config": hf_config, "dtype": str(dtype).replace("torch.", ""), "padded_vocab_size": padded,
            "saved_tp": tp, "saved_pp": split.pp, "saved_stage_layers": split.counts()}
    with open(os.path.join(directory, METADATA), "w") as f:
        json.dump(meta, f, indent=2)


def _copy_tokenizer(src: str, dst: str) -> None:
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def hf_to_mcore(src: str, dst: str, tp: int = 1, pp: int = 1, pad_vocab_multiple: int = DEFAULT_PAD_MULTIPLE, *,
                first_stage_layers: int | None = None, last_stage_layers: int | None = None) -> None:
    """HF directory -> megatron checkpoint sharded for TP x PP (conversion runs on CPU processes);
    `first_stage_layers` / `last_stage_layers` give an uneven pipeline split (`models.stages.PipelineSplit`)."""
    from megatron_rlvr.models import hf_mapping
    from megatron_rlvr.models.weights import read_hf_state

    arch = LlamaArch.from_pretrained(src)
    arch.check_parallel(tp, pp, first_stage_layers, last_stage_layers)
    split = PipelineSplit(arch.num_layers, pp, first_stage_layers, last_stage_layers)
    hf = read_hf_state(src)
    hf_mapping.check_hf_state(hf, arch, src)
    dtype = _hf_dtype(hf, src)
    del hf
    padded = arch.padded_vocab_size(tp, pad_vocab_multiple)
    with open(os.path.join(src, "config.json")) as f:
        hf_config = json.load(f)
    with AtomicOutput(dst) as tmp:
        _launch(_hf_to_mcore_worker, tp * pp, os.path.abspath(src), tmp, tp, split, padded)
        _write_metadata(tmp, hf_config, dtype, padded, tp, split)
        _copy_tokenizer(src, tmp)


def reshard(src: str, dst: str, tp: int = 1, pp: int = 1, *, first_stage_layers: int | None = None,
            last_stage_layers: int | None = None) -> None:
    """megatron checkpoint -> megatron checkpoint at another TP x PP (and pipeline split)."""
    meta = read_metadata(src)
    arch = LlamaArch.from_hf_config(meta["hf_config"], source=os.path.join(src, METADATA))
    arch.check_parallel(tp, pp, first_stage_layers, last_stage_layers)
    split = PipelineSplit(arch.num_layers, pp, first_stage_layers, last_stage_layers)
    if meta["padded_vocab_size"] % tp:
        raise ValueError(
            f"{src}: padded vocab {meta['padded_vocab_size']} is not divisible by tp={tp}; re-convert from HF with "
            f"--pad-vocab-multiple a multiple of {tp}"
        )
    with AtomicOutput(dst) as tmp:
        _launch(_reshard_worker, tp * pp, os.path.abspath(src), tmp, tp, split)
        _write_metadata(tmp, meta["hf_config"], getattr(torch, meta["dtype"]), meta["padded_vocab_size"], tp, split)
        _copy_tokenizer(src, tmp)


def mcore_to_hf(src: str, dst: str) -> None:
    """megatron checkpoint (any TP/PP) -> HF directory (vocab padding stripped)."""
    meta = read_metadata(src)
    with AtomicOutput(dst) as tmp:
        _launch(_mcore_to_hf_worker, 1, os.path.abspath(src), tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(meta["hf_config"], f, indent=2)
        _copy_tokenizer(src, tmp)
