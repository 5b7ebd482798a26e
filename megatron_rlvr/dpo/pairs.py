"""Preference pairs made by the verifiers (on-policy pairs, as Tülu 3 built part of its DPO mix):
`megatron-rlvr dpo --make-pairs --config PATH` samples `pairs.samples_per_prompt` responses per prompt of an RLVR
dataset with the in-process rollout engine (vLLM, or the megatron model), scores them with the records' verifiers,
and writes pairs in the preference format `data.train_files` reads: a verified response (score 1) as chosen, a
failed one (score 0) as rejected. Prompts whose samples all pass or all fail give no pair; partial scores (between
0 and 1) are neither.
"""

from __future__ import annotations

import json
import logging
import os

import torch.distributed as dist

from megatron_rlvr.dpo.config import DPOConfig

logger = logging.getLogger(__name__)


def pairs_from_scores(messages: list[dict], texts: list[str], scores: list[float], limit: int) -> list[dict]:
    """Up to `limit` preference records of one prompt: distinct verified texts as chosen against distinct failed
    ones as rejected, in sample order."""
    chosen = list(dict.fromkeys(t for t, s in zip(texts, scores) if s == 1.0))
    rejected = list(dict.fromkeys(t for t, s in zip(texts, scores) if s == 0.0))
    return [{"chosen": list(messages) + [{"role": "assistant", "content": c}],
             "rejected": list(messages) + [{"role": "assistant", "content": r}]}
            for c, r in list(zip(chosen, rejected))[:limit]]


def _sampling_job(cfg: DPOConfig):
    """The RLVR job config the rollout engine is built from (model, layout, sampling settings of `cfg.pairs`)."""
    from megatron_rlvr.config import config_from_dict

    pairs = cfg.pairs
    return config_from_dict({
        "model": {"path": cfg.model.path, "dtype": cfg.model.dtype, "pad_vocab_multiple": cfg.model.pad_vocab_multiple},
        "parallel": {"tensor_parallel": cfg.parallel.tensor_parallel,
                     "pipeline_parallel": cfg.parallel.pipeline_parallel,
                     "rollout_tensor_parallel": cfg.parallel.rollout_tensor_parallel},
        "data": {"train_files": list(pairs.prompt_files), "chat_template": cfg.data.chat_template,
                 "max_prompt_length": pairs.max_prompt_length},
        "rollout": {"backend": pairs.backend, "n": pairs.samples_per_prompt, "temperature": pairs.temperature,
                    "top_p": pairs.top_p, "max_tokens": pairs.max_tokens,
                    "gpu_memory_utilization": pairs.gpu_memory_utilization},
        "train": {"seed": cfg.train.seed},
    })


def make_pairs(cfg: DPOConfig) -> dict:
    """Sample, verify, write; returns counts {prompts, samples, verified, prompts_with_pairs, pairs, path} (every
    rank). Collective over the world."""
    from transformers import AutoTokenizer

    from megatron_rlvr.data import RLVRPromptDataset
    from megatron_rlvr.models.llama import LlamaArch
    from megatron_rlvr.parallel.state import init_distributed, seed_everything
    from megatron_rlvr.rewards import RewardPool
    from megatron_rlvr.models.build import Models, build_model
    from megatron_rlvr.parallel.groups import init_groups
    from megatron_rlvr.rollout.producer import build_engine, sampling_config

    job = _sampling_job(cfg)
    rank, world = init_distributed()
    seed_everything(cfg.train.seed)
    groups = init_groups(job, world, vllm=job.rollout.backend == "vllm")
    models = None
    if job.rollout.backend == "megatron":
        policy, arch = build_model(job, cfg.model.path, groups.policy, frozen=True)
        models = Models(policy, None)
    else:
        arch = LlamaArch.from_pretrained(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    template = None if cfg.data.chat_template == "tokenizer" else cfg.data.chat_template
    prompts = RLVRPromptDataset.from_files(cfg.pairs.prompt_files, tokenizer,
                                           max_prompt_length=cfg.pairs.max_prompt_length, chat_template=template)
    engine = build_engine(job, groups, models, arch, tokenizer)
    pool = RewardPool(cfg.pairs.reward_workers, cfg.pairs.reward_timeout_s) if rank == 0 else None
    path = cfg.pairs.output_file or os.path.join(cfg.output_dir, "pairs.jsonl")
    counts = {"prompts": len(prompts), "samples": 0, "verified": 0, "prompts_with_pairs": 0, "pairs": 0, "path": path}
    progress = None
    if rank == 0:
        from tqdm import tqdm

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        out = open(f"{path}.tmp", "w")
        progress = tqdm(total=len(prompts), desc="make pairs", dynamic_ncols=True)
    batch = cfg.pairs.prompts_per_batch
    engine.wake()
    try:
        for start in range(0, len(prompts), batch):
            chunk = [prompts[i] for i in range(start, min(start + batch, len(prompts)))]
            samples = engine.generate([list(p.prompt_ids) for p in chunk],
                                      sampling_config(job, seed=cfg.train.seed * 1_000_003 + start))
            if rank != 0:
                continue
            texts = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
            scores = pool.score((chunk[s.prompt_index].record.dataset, text, chunk[s.prompt_index].record.ground_truth)
                                for s, text in zip(samples, texts))
            for index, prompt in enumerate(chunk):
                mine = [i for i, s in enumerate(samples) if s.prompt_index == index]
                records = pairs_from_scores(prompt.record.messages, [texts[i] for i in mine],
                                            [scores[i] for i in mine], cfg.pairs.pairs_per_prompt)
                out.writelines(json.dumps(r) + "\n" for r in records)
                counts["prompts_with_pairs"] += bool(records)
                counts["pairs"] += len(records)
            counts["samples"] += len(samples)
            counts["verified"] += sum(s == 1.0 for s in scores)
            progress.update(len(chunk))
            progress.set_postfix(pairs=counts["pairs"])
    finally:
        engine.close()
        if rank == 0:
            out.close()
            progress.close()
            pool.close()
    if rank == 0:
        os.replace(f"{path}.tmp", path)
        print(f"{counts['pairs']} pairs from {counts['prompts_with_pairs']} of {counts['prompts']} prompts "
              f"({counts['verified']} of {counts['samples']} samples verified) -> {path}")
    box = [counts]
    dist.broadcast_object_list(box, src=0)
    return box[0]
