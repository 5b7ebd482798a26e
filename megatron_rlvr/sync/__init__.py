"""Weight sync trainer -> rollout: `weight_sync` (the sync object: path, push, checks), buckets (`buckets`), the
per-layout streams (`transfer`), the in-place copy plan (`vllm_layout`), the checks (`checksums`, `verify`)."""
