"""The embedded CPU demo: a bundled verifiable arithmetic task (`task.py`), the tiny "demo" Llama, an SFT warm
start and GRPO on top (`scripts/demo_job.sh` runs it end to end; `python -m megatron_rlvr.demo --help`)."""
