"""RLVR data: open-instruct records (JSONL / Parquet), chat templates, tokenized prompt datasets, a resumable
shuffled loader, and padding / collation for rollouts and training."""

from .collate import build_training_batch, collate_prompts, pad_sequences
from .dataset import Prompt, RLVRPromptDataset
from .gsm8k import gsm8k_to_rlvr, read_gsm8k
from .loader import PromptLoader
from .records import MalformedRecordError, RLVRRecord, load_records, read_rlvr_records, write_jsonl
from .templates import BUILTIN_TEMPLATES, render_prompt

__all__ = [
    "BUILTIN_TEMPLATES",
    "MalformedRecordError",
    "Prompt",
    "PromptLoader",
    "RLVRPromptDataset",
    "RLVRRecord",
    "build_training_batch",
    "collate_prompts",
    "gsm8k_to_rlvr",
    "load_records",
    "pad_sequences",
    "read_gsm8k",
    "read_rlvr_records",
    "render_prompt",
    "write_jsonl",
]
