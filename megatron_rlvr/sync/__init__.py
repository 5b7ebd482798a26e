"""Weight sync trainer -> rollout: buckets (`buckets`), the per-layout streams (`transfer`), the check (`verify`)."""
