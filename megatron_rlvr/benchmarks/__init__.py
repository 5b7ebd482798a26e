"""Benchmarks behind `megatron-rlvr bench NAME`: one module per benchmark, each with
`add_arguments(parser)` and `run(args) -> int`, printing its figures beside a baseline measured in the same run."""
