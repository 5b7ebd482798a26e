"""Balanced partitioning of a rollout batch over data-parallel ranks and micro-batches.

A rollout batch is a list of sequences of very different lengths; splitting it naively (round robin, or in
arrival order) leaves one data-parallel rank with far more tokens than the rest, and every rank then waits for
it. The partitioners here split items with weights w_i into k parts P_1..P_k so the largest part sum
max_j sum_{i in P_j} w_i is close to the mean sum(w)/k.

Two methods, both deterministic (ties broken by index, so this module and the C++ twin in
`csrc/partition.cpp` return identical partitions):

- ``"kk"``: Karmarkar-Karp largest differencing, k-way. Every item starts as a partial solution of k part
  sums (the item in one part, the rest empty); the two partial solutions with the largest spread
  (max part sum - min part sum) are merged by pairing the heaviest part of one with the lightest part of the
  other, until one solution is left. With ``equal_size`` the initial partial solutions are consecutive runs
  of k items in weight order, one item per part, so every merge keeps the parts' counts equal.
- ``"greedy"``: largest processing time first: items in decreasing weight, each to the part with the
  smallest sum (with ``equal_size``, among the parts not yet full). Makespan <= (4/3 - 1/(3k)) * optimum
  (Graham 1969) without the size constraint.

The work of a sequence of n tokens is modelled by `sequence_work`: n + quadratic * n^2, where the quadratic
term stands for attention, whose cost grows with the square of the length.

The C++ extension (`megatron_rlvr._C`) runs the same algorithms; `backend="auto"` uses it when it is built
and falls back to the Python implementation here (the reference semantics) otherwise.
"""

from __future__ import annotations

import heapq
from typing import Sequence

try:  # the only place that looks for the compiled twin
    import torch  # noqa: F401  (loads libc10/libtorch, which the extension is linked against)

    from megatron_rlvr import _C as _cpp
except ImportError:  # built without a compiler, or MEGATRON_RLVR_NO_EXT=1
    _cpp = None

METHODS = ("kk", "greedy")
BACKENDS = ("auto", "cpp", "python")


def cpp_available() -> bool:
    """True when the compiled partitioner in `megatron_rlvr._C` is importable."""
    return _cpp is not None and hasattr(_cpp, "partition")


def sequence_work(lengths: Sequence[int], quadratic: float = 0.0) -> list[float]:
    """Cost model of a sequence: ``w = n + quadratic * n^2`` for n tokens.

    ``quadratic`` = 0 balances tokens (the matmul FLOPs, linear in n); a positive value adds the attention
    score/value FLOPs, which grow as n^2 (per layer about 4 h n^2 against 24 h^2 n for the matmuls, so
    ``quadratic ~ 1 / (6 h)`` for hidden size h).
    """
    if quadratic < 0:
        raise ValueError(f"sequence_work: quadratic must be >= 0, got {quadratic}")
    return [float(n) + quadratic * float(n) * float(n) for n in lengths]


def _check(weights: Sequence[float], k: int, method: str, equal_size: bool) -> None:
    if method not in METHODS:
        raise ValueError(f"partition: unknown method {method!r}; choose one of {METHODS}")
    if k < 1:
        raise ValueError(f"partition: number of parts must be >= 1, got {k}")
    if equal_size and len(weights) % k != 0:
        raise ValueError(
            f"partition: equal_size needs the item count ({len(weights)}) to be a multiple of the number of "
            f"parts ({k}); pad the batch or drop {len(weights) % k} item(s), or pass equal_size=False"
        )
    for i, w in enumerate(weights):
        if not w >= 0:  # also rejects NaN
            raise ValueError(f"partition: weight {i} is {w}; weights must be finite and >= 0")


def _karmarkar_karp(weights: Sequence[float], k: int, equal_size: bool) -> list[list[int]]:
    n = len(weights)
    # A partial solution keeps only its non-empty parts, by decreasing sum (empty parts, sum 0, come after
    # every non-empty part of equal sum), so the n single-item starting solutions cost O(1) each, not O(k).
    # Each part is a linked list of item indices (head, tail, next_item): a merge joins two parts in O(1).
    next_item = [-1] * n
    heap: list[tuple[float, int, list[float], list[int], list[int]]] = []
    if equal_size:
        order = sorted(range(n), key=lambda i: (weights[i], i))
        groups = [order[g : g + k] for g in range(0, n, k)]
    else:
        groups = [[i] for i in range(n)]
    for state_id, group in enumerate(groups):
        members = sorted(group, key=lambda i: -weights[i])  # stable: equal weights keep index order
        sums = [weights[i] for i in members]
        heapq.heappush(heap, (-_spread(sums, k), state_id, sums, members, list(members)))
    next_id = len(groups)
    while len(heap) > 1:
        _, _, sums_a, heads_a, tails_a = heapq.heappop(heap)
        _, _, sums_b, heads_b, tails_b = heapq.heappop(heap)
        count_a, count_b = len(sums_a), len(sums_b)
        sums, heads, tails = [], [], []
        # part j of the merge joins part j of A (the larger spread) with part k-1-j of B: heaviest with
        # lightest. Only the j where either side is non-empty, in increasing j.
        for j in list(range(count_a)) + list(range(max(count_a, k - count_b), k)):
            jb = k - 1 - j
            if j >= count_a:
                sums.append(sums_b[jb])
                heads.append(heads_b[jb])
                tails.append(tails_b[jb])
            elif jb >= count_b:
                sums.append(sums_a[j])
                heads.append(heads_a[j])
                tails.append(tails_a[j])
            else:
                sums.append(sums_a[j] + sums_b[jb])
                next_item[tails_a[j]] = heads_b[jb]
                heads.append(heads_a[j])
                tails.append(tails_b[jb])
        order = sorted(range(len(sums)), key=lambda j: -sums[j])
        sums = [sums[j] for j in order]
        heads = [heads[j] for j in order]
        tails = [tails[j] for j in order]
        heapq.heappush(heap, (-_spread(sums, k), next_id, sums, heads, tails))
        next_id += 1
    heads = heap[0][3] if heap else []
    parts: list[list[int]] = []
    for head in heads:
        part = []
        while head >= 0:
            part.append(head)
            head = next_item[head]
        parts.append(sorted(part))
    return parts + [[] for _ in range(k - len(parts))]


def _spread(sums: list[float], k: int) -> float:
    """max part sum - min part sum of a partial solution whose parts beyond len(sums) are empty."""
    return sums[0] - (sums[-1] if len(sums) == k else 0.0)


def _greedy(weights: Sequence[float], k: int, equal_size: bool) -> list[list[int]]:
    n = len(weights)
    capacity = n // k if equal_size else n
    parts: list[list[int]] = [[] for _ in range(k)]
    open_parts = [(0.0, j) for j in range(k)]  # (sum, part index): a min-heap, ties to the lower index
    for i in sorted(range(n), key=lambda i: (-weights[i], i)):
        total, j = heapq.heappop(open_parts)
        parts[j].append(i)
        if len(parts[j]) < capacity:
            heapq.heappush(open_parts, (total + weights[i], j))
    return [sorted(part) for part in parts]


def partition(
    weights: Sequence[float],
    k: int,
    *,
    method: str = "kk",
    equal_size: bool = False,
    backend: str = "auto",
) -> list[list[int]]:
    """Split items ``0..len(weights)-1`` into ``k`` parts of nearly equal weight sum.

    Returns k lists of item indices, each sorted ascending; every index appears in exactly one part. With
    ``equal_size`` every part holds ``len(weights) // k`` items (the count must divide evenly). ``backend``:
    ``"cpp"`` (the extension, error if not built), ``"python"`` or ``"auto"`` (the extension when built).
    Both backends return the same partition for the same input.
    """
    if backend not in BACKENDS:
        raise ValueError(f"partition: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "cpp" and not cpp_available():
        raise RuntimeError(
            "partition: backend='cpp' but megatron_rlvr._C is not built; run "
            "`pip install -e . --no-build-isolation` with a C++ compiler, or use backend='python'"
        )
    weights = [float(w) for w in weights]
    _check(weights, k, method, equal_size)
    if backend != "python" and cpp_available():
        return _cpp.partition(weights, k, method, equal_size)
    if method == "kk":
        return _karmarkar_karp(weights, k, equal_size)
    return _greedy(weights, k, equal_size)


def round_robin(n: int, k: int) -> list[list[int]]:
    """The naive baseline: item i goes to part i mod k."""
    return [list(range(j, n, k)) for j in range(k)]


def part_sums(weights: Sequence[float], parts: Sequence[Sequence[int]]) -> list[float]:
    """Weight sum of each part."""
    return [float(sum(weights[i] for i in part)) for part in parts]


def imbalance(weights: Sequence[float], parts: Sequence[Sequence[int]]) -> float:
    """max part sum / mean part sum: 1.0 is perfect balance; the step time of a synchronous data-parallel
    step scales with this ratio."""
    sums = part_sums(weights, parts)
    mean = sum(sums) / len(sums)
    return max(sums) / mean if mean > 0 else 1.0


def balanced_microbatches(
    lengths: Sequence[int],
    dp_size: int,
    num_microbatches: int,
    *,
    method: str = "kk",
    equal_size: bool = False,
    quadratic: float = 0.0,
    backend: str = "auto",
) -> list[list[list[int]]]:
    """Split a rollout batch over ``dp_size`` data-parallel ranks, then each rank's share over
    ``num_microbatches`` micro-batches, balancing `sequence_work` at both levels.

    Returns ``plan[rank][microbatch] -> sorted sequence indices``. With ``equal_size`` every rank gets the
    same number of sequences and every micro-batch the same number (the batch size must be a multiple of
    ``dp_size * num_microbatches``): use it when every rank must run the same number of equally sized
    micro-batches (pipeline schedules with fixed micro-batch shapes).
    """
    if equal_size and len(lengths) % (dp_size * num_microbatches) != 0:
        raise ValueError(
            f"balanced_microbatches: equal_size needs the batch size ({len(lengths)}) to be a multiple of "
            f"dp_size * num_microbatches = {dp_size} * {num_microbatches}; pad the batch or pass "
            "equal_size=False"
        )
    work = sequence_work(lengths, quadratic)
    plan = []
    for rank_items in partition(work, dp_size, method=method, equal_size=equal_size, backend=backend):
        rank_work = [work[i] for i in rank_items]
        micro = partition(rank_work, num_microbatches, method=method, equal_size=equal_size, backend=backend)
        plan.append([sorted(rank_items[i] for i in mb) for mb in micro])
    return plan
