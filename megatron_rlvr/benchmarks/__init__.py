"""Benchmarks behind `megatron-rlvr bench NAME`: one module per benchmark, each with
`add_arguments(parser)` and `run(args) -> int`, printing its figures beside a baseline measured in the same run."""


def report(result: dict, json_path: str | None) -> None:
    """Print a benchmark's figures one per line (floats to 4 digits) and, given a path, write them as JSON."""
    import json

    for key, value in result.items():
        print(f"{key:>30}: {value:.4g}" if isinstance(value, float) else f"{key:>30}: {value}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
