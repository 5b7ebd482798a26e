"""DPO on the RLVR engine: preference pairs through the same megatron TP x PP x DP model, fused log-prob kernel,
checkpoints, configs and metrics as `train` and `sft`.

- `config`: the `megatron-rlvr dpo` job config (typed, YAML + dotted overrides, validated up front);
- `data`: open-instruct preference records -> token pairs, and micro-batches that pack each pair's two sequences;
- `loop`: the training loop (`run_dpo`), reference log-probs cached once or computed on the fly;
- `pairs`: preference pairs made by the verifiers from an RLVR dataset (`megatron-rlvr dpo --make-pairs`).
The losses themselves are in `megatron_rlvr.algorithms.dpo`.
"""
