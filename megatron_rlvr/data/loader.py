"""An endless, resumable stream of prompt batches with a deterministic shuffle per epoch."""

from typing import Any, Dict, List, Sequence

import numpy as np


class PromptLoader:
    """Batches of `batch_size` items of `dataset`, epoch after epoch, forever (RL training counts steps).

    Epoch e visits the items in the order `permutation(seed, e)`, drawn from a generator seeded by (seed, e), so
    the order depends only on the seed and the epoch. `state_dict()` after k batches, loaded into a fresh loader
    over the same dataset, yields exactly batch k+1, k+2, ... of the original run. With `drop_last` (the
    default: rollouts want a fixed batch) the items past the last full batch of an epoch are skipped that epoch.
    """

    def __init__(self, dataset: Sequence[Any], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and len(dataset) < batch_size:
            raise ValueError(f"the dataset has {len(dataset)} items, fewer than one batch of {batch_size}; lower "
                             "the batch size or set drop_last=False")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.batch_in_epoch = 0

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def __iter__(self) -> "PromptLoader":
        return self

    def __next__(self) -> List[Any]:
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
        start = self.batch_in_epoch * self.batch_size
        indices = self.epoch_order(self.epoch)[start:start + self.batch_size]
        self.batch_in_epoch += 1
        return [self.dataset[int(i)] for i in indices]

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "batch_size": self.batch_size, "num_items": len(self.dataset), "shuffle": int(self.shuffle),
                "drop_last": int(self.drop_last)}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Resume from `state`; the dataset and loader settings must match, or the continuation would differ."""
        current = self.state_dict()
        mismatched = [f"{k}: checkpoint {state[k]} vs now {current[k]}"
                      for k in ("seed", "batch_size", "num_items", "shuffle", "drop_last") if state[k] != current[k]]
        if mismatched:
            raise ValueError("cannot resume the prompt loader, its settings changed since the checkpoint ("
                             + "; ".join(mismatched) + "); restore them or start a new run")
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
