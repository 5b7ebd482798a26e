"""Which transformer layers each pipeline stage holds: the one place that maps (layers, pp, pp_rank) to a range.

megatron-core's rule (`num_layers_in_first_pipeline_stage` / `num_layers_in_last_pipeline_stage` of its
TransformerConfig): the first and last stages may hold a set number of layers, and the layers left are split
evenly over the stages between them. The first stage also holds the embedding and the last one the final norm
and LM head, so for a large vocabulary they are the heavy ones and get fewer layers:

    Llama 405B, 126 layers over PP 10, first = last = 7:   7 | 14 14 14 14 14 14 14 14 | 7

Weight loading, conversion, the weight sync's global names, the planner's per-stage memory and config validation
all read the split from here (the model's TransformerConfig is built from it, `PipelineSplit.from_config` reads
it back). Pure Python: the planner imports it without torch.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PipelineSplit:
    """`num_layers` transformer layers over `pp` stages; `first` / `last`: layers on the first / last stage
    (None: the even share). Invalid splits raise ValueError naming the sizes that fit."""

    num_layers: int
    pp: int = 1
    first: int | None = None
    last: int | None = None

    def __post_init__(self) -> None:
        if self.pp < 1:
            raise ValueError(f"pipeline parallel size {self.pp} must be >= 1")
        if self.first is not None and self.first < 1 or self.last is not None and self.last < 1:
            raise ValueError(f"a pipeline stage needs at least one layer; got first={self.first}, last={self.last}")
        if self.uneven and self.pp == 1:
            raise ValueError(
                f"layers on the first/last pipeline stage (first={self.first}, last={self.last}) need pipeline "
                "parallel size > 1; leave them unset for pp=1"
            )
        if self.pp > self.num_layers:
            raise ValueError(
                f"pipeline parallel size {self.pp} exceeds num_hidden_layers={self.num_layers}; every stage needs "
                f"a layer: use pp <= {self.num_layers}"
            )
        rest, middle = self._middle()
        if middle == 0 and rest != 0 or middle and (rest < middle or rest % middle):
            raise ValueError(self._unfit_message(rest, middle))

    @property
    def uneven(self) -> bool:
        return self.first is not None or self.last is not None

    def _middle(self) -> tuple[int, int]:
        """(layers left for the stages without a set count, number of those stages)."""
        rest, stages = self.num_layers, self.pp
        for fixed in (self.first, self.last):
            if fixed is not None:
                rest, stages = rest - fixed, stages - 1
        return rest, stages

    def _unfit_message(self, rest: int, middle: int) -> str:
        n, pp = self.num_layers, self.pp
        if not self.uneven:
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            return (f"pipeline parallel size {pp} does not divide num_hidden_layers={n}; use one of {divisors}, or "
                    f"set the layers of the first/last stage ({fitting_splits(self.num_layers, self.pp)})")
        given = ", ".join(f"{k}={v}" for k, v in (("first", self.first), ("last", self.last)) if v is not None)
        where = f"{middle} other stage(s)" if middle else "no other stage"
        return (f"pipeline split of num_hidden_layers={n} over pp={pp} with {given} leaves {rest} layer(s) for "
                f"{where}: they must split evenly, at least one per stage; {fitting_splits(self.num_layers, self.pp)}")

    def counts(self) -> list[int]:
        """Layers per stage, in stage order."""
        rest, middle = self._middle()
        per_middle = rest // middle if middle else 0
        out = [per_middle] * self.pp
        if self.first is not None:
            out[0] = self.first
        if self.last is not None:
            out[-1] = self.last
        return out

    def layers(self, pp_rank: int) -> range:
        """Global indices of the layers on stage `pp_rank`."""
        if not 0 <= pp_rank < self.pp:
            raise ValueError(f"pipeline rank {pp_rank} is outside 0..{self.pp - 1}")
        counts = self.counts()
        start = sum(counts[:pp_rank])
        return range(start, start + counts[pp_rank])

    def describe(self) -> str:
        """`11 | 13 x 8 | 11` (uneven) or `16 per stage` (even)."""
        counts = self.counts()
        if not self.uneven:
            return f"{counts[0]} per stage"
        runs: list[list[int]] = []
        for count in counts:
            if runs and runs[-1][0] == count:
                runs[-1][1] += 1
            else:
                runs.append([count, 1])
        return " | ".join(str(c) if n == 1 else f"{c} x {n}" for c, n in runs)

    @classmethod
    def from_config(cls, config) -> PipelineSplit:
        """The split of a megatron-core TransformerConfig."""
        return cls(config.num_layers, config.pipeline_model_parallel_size,
                   config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage)


def fitting_splits(num_layers: int, pp: int) -> str:
    """The uneven splits of `num_layers` over `pp` stages with equal first and last stages, lighter ones first
    (for error messages)."""
    if pp == 2:
        return f"at pp=2 any first + last = {num_layers} fits"
    ends = [k for k in range(1, num_layers + 1)
            if num_layers - 2 * k >= pp - 2 and (num_layers - 2 * k) % (pp - 2) == 0] if pp > 2 else []
    lighter = [k for k in ends if k <= -(-num_layers // pp)]  # first/last no heavier than the even share
    ends = lighter or ends
    if not ends:
        return f"no split with equal first and last stages fits pp={pp}"
    return f"at pp={pp}, first = last in {ends[:12]}" + (" ..." if len(ends) > 12 else "") + " fit"
