"""megatron-rlvr: RLVR post-training on megatron-core with fused Triton kernels and in-process vLLM."""

__version__ = "0.1.0"
