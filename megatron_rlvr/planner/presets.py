"""Named layouts: a published configuration with its source, to check the planner against and to start from.

tulu3-405b: the Tülu 3 405B RLVR run (Lambert et al. 2024, Tülu 3 report; the Ai2 blog "Scaling the Tülu 3
post-training recipes to surpass the performance of DeepSeek V3", 2025-01-30; the reproduction command in
allenai/open-instruct docs/tulu3.md, "Llama-3.1-Tulu-3-405B Reproduction"; the model card of
allenai/Llama-3.1-Tulu-3-405B). Published per step: ~550 s generation, ~25 s weight transfer, ~1500 s training.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    model: str
    value_model: str
    cluster: str
    gpus: int
    layout: dict
    efficiency: dict = field(default_factory=dict)
    published: dict = field(default_factory=dict)
    """Published seconds per step (generate, sync, train) to compare the prediction with."""


PRESETS: dict[str, Preset] = {
    "tulu3-405b": Preset(
        model="405B",
        value_model="8B",  # "8b_valu" in the run name; the value model starts from the 8B reward model
        cluster="h100-80g",
        gpus=256,  # 32 nodes x 8 H100
        layout=dict(
            placement="split",
            rollout_gpus=16, rollout_tp=16,  # one vLLM engine, --vllm_tensor_parallel_size 16
            rollout_eager=True,  # --vllm_enforce_eager true
            train_gpus=240,  # "the remaining 240 GPUs were used for training" (the blog)
            train_backend="zero3", tp=1, pp=1,  # --deepspeed_stage 3
            kl_beta=0.05,
            prompts_per_step=1856, samples_per_prompt=1,  # model card "Batch Size (effective) 1,856" = 232 x 8
            # MATH prompts in the Tülu chat template: mean and longest prompt of a batch. ASSUMPTION.
            prompt_len=200, max_prompt_len=400,
            response_len=1024,  # --response_length 1024 (the card lists 2,048; see docs/scale.md)
            mean_response_len=512,  # MATH solutions stop well before the cap. ASSUMPTION.
            ppo_epochs=4,  # --num_epochs 4 (the card: "PPO Update Iterations (K) 4")
            micro_batch_size=1, packing=False,  # --per_device_train_batch_size 1, padded batches
            recompute="full",  # --gradient_checkpointing
            sync="per-tensor",  # one NCCL broadcast per parameter (--no_gather_whole_model)
            logprob_kernel="unfused",
        ),
        # DeepSpeed ZeRO-3 at micro-batch 1 (~1.4k tokens) gathers every module's weights for every micro-batch
        # and pays its hooks per module: ASSUMPTION of half the Megatron-LM figure (the ZeRO paper's own
        # large-batch figure on V100 was ~30% of peak).
        efficiency=dict(train_mfu=0.20),
        published=dict(generate=550.0, sync=25.0, train=1500.0),
    ),
}
