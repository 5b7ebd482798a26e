"""`make_plan`: memory and step time of a layout, its problems, and the smallest change that fixes each."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from megatron_rlvr.config import field_docs
from megatron_rlvr.models.stages import fitting_splits
from megatron_rlvr.planner.memory import GIB, RolloutMemory, TrainMemory, rollout_memory, train_memory
from megatron_rlvr.planner.specs import ClusterSpec, Efficiency, Layout, ModelSpec, load_model
from megatron_rlvr.planner.timing import (
    Phase, generate_time, micro_batches_per_rank, sequences, sync_time, train_time,
)

CHOICES = {
    "placement": ("split", "colocated"),
    "train_backend": ("megatron", "zero3"),
    "recompute": ("none", "full"),
    "grad_dtype": ("fp32", "bf16"),
    "sync": ("per-tensor", "bucketed"),
    "logprob_kernel": ("fused", "unfused"),
}


@dataclass
class Problem:
    what: str
    fix: str


@dataclass
class Plan:
    model: ModelSpec
    cluster: ClusterSpec
    layout: Layout
    efficiency: Efficiency
    value: ModelSpec | None
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    train_memory: TrainMemory | None = None
    rollout_memory: RolloutMemory | None = None
    generate: Phase | None = None
    sync: Phase | None = None
    train: Phase | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def step_seconds(self) -> float:
        return sum(p.seconds for p in (self.generate, self.sync, self.train) if p is not None)

    def to_dict(self) -> dict:
        def phase(p: Phase | None):
            return None if p is None else {"seconds": p.seconds, "parts": p.parts, "facts": p.facts}

        def memory(m):
            return None if m is None else {**{name: b / GIB for name, b in m.items()}, "total": m.total / GIB}

        return {
            "ok": self.ok,
            "model": dataclasses.asdict(self.model) | {"params": self.model.params},
            "value_model": None if self.value is None else self.value.name,
            "cluster": dataclasses.asdict(self.cluster),
            "layout": dataclasses.asdict(self.layout),
            "efficiency": dataclasses.asdict(self.efficiency),
            "memory_gib": {
                "capacity": self.cluster.memory_gib - self.cluster.reserved_gib,
                "train": memory(self.train_memory),
                "train_stage": self.train_memory.stage if self.train_memory else None,
                "rollout": memory(self.rollout_memory),
                "rollout_kv_tokens": self.rollout_memory.kv_tokens if self.rollout_memory else None,
            },
            "seconds": {"generate": phase(self.generate), "sync": phase(self.sync), "train": phase(self.train),
                        "step": self.step_seconds},
            "problems": [dataclasses.asdict(p) for p in self.problems],
            "warnings": self.warnings,
            "assumptions": assumptions(self),
        }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _nearest(value: int, options: list[int]) -> list[int]:
    return sorted(options, key=lambda o: (abs(o - value), -o))[:2]


def _structure(model: ModelSpec, cluster: ClusterSpec, layout: Layout, value: ModelSpec | None) -> list[Problem]:
    """Problems that make the layout impossible regardless of memory."""
    problems = []
    for name, allowed in CHOICES.items():
        if getattr(layout, name) not in allowed:
            problems.append(Problem(f"{name} {getattr(layout, name)!r} is not one of {allowed}",
                                    f"pass one of {', '.join(allowed)}"))
    if problems:
        return problems
    tp, pp = layout.tp, layout.pp
    if layout.train_backend == "zero3" and (tp > 1 or pp > 1):
        problems.append(Problem(f"train_backend zero3 shards over data parallelism only, but tp={tp} pp={pp}",
                                "use tp=1 pp=1 with zero3, or train_backend=megatron"))
    train_tps = [d for d in _divisors(math.gcd(model.heads, model.kv_heads)) if d <= cluster.gpus_per_node]
    if model.heads % tp or model.kv_heads % tp:
        problems.append(Problem(
            f"train TP {tp} does not divide the {model.heads} attention heads and {model.kv_heads} KV heads "
            f"of {model.name}", f"use train TP in {train_tps} (nearest: {_nearest(tp, train_tps)})"))
    if value:
        problems += _value_structure(value, layout)
    rtp = layout.rollout_tp
    rollout_tps = [d for d in _divisors(model.heads) if model.kv_heads % d == 0 or d % model.kv_heads == 0]
    if rtp not in rollout_tps:
        problems.append(Problem(
            f"rollout TP {rtp} must divide the {model.heads} attention heads and divide or be a multiple of the "
            f"{model.kv_heads} KV heads", f"use rollout TP in {[d for d in rollout_tps if d <= 64]}"))
    try:
        layout.policy_split(model)
    except ValueError as err:
        if layout.pp_first_layers or layout.pp_last_layers:
            problems.append(Problem(f"pipeline split of {model.name}: {err}",
                                    "set --pp-first-layers / --pp-last-layers to a split that fits"))
        else:
            options = [d for d in _divisors(model.layers) if d <= layout.train_gpus]
            problems.append(Problem(f"PP {pp} does not divide the {model.layers} layers of {model.name}",
                                    f"use PP in {options[:12]} (nearest: {_nearest(pp, options)}), or give the "
                                    f"first/last stage their own layer counts, --pp-first-layers / --pp-last-layers "
                                    f"({fitting_splits(model.layers, pp)})"))
    if layout.train_gpus < 1 or (layout.placement == "split" and layout.rollout_gpus < 1):
        problems.append(Problem(
            f"split layout needs GPUs for both roles; got train {layout.train_gpus}, rollout {layout.rollout_gpus} "
            f"of {cluster.gpus}", "set --train-gpus and --rollout-gpus, or add nodes"))
        return problems
    if layout.placement == "split" and layout.train_gpus + layout.rollout_gpus > cluster.gpus:
        need = math.ceil((layout.train_gpus + layout.rollout_gpus) / cluster.gpus_per_node)
        problems.append(Problem(
            f"train {layout.train_gpus} + rollout {layout.rollout_gpus} GPUs exceed the cluster's {cluster.gpus}",
            f"add nodes: {need} nodes of {cluster.gpus_per_node} (now {cluster.nodes}), or give fewer GPUs"))
    if layout.rollout_gpus % rtp:
        problems.append(Problem(f"{layout.rollout_gpus} rollout GPUs are not a multiple of rollout TP {rtp}",
                                f"use {layout.rollout_gpus // rtp * rtp or rtp} rollout GPUs"))
    if layout.train_backend == "megatron" and tp * pp * max(layout.dp, 1) != layout.train_gpus:
        fix = (f"use DP {layout.train_gpus // (tp * pp)}" if layout.train_gpus % (tp * pp) == 0 else
               f"use a multiple of TP x PP = {tp * pp} training GPUs (e.g. "
               f"{max(layout.train_gpus // (tp * pp), 1) * tp * pp})")
        problems.append(Problem(f"world size: TP {tp} x PP {pp} x DP {layout.dp} = {tp * pp * layout.dp} but "
                                f"{layout.train_gpus} training GPUs", fix))
    return problems


def _value_structure(value: ModelSpec, layout: Layout) -> list[Problem]:
    """The value model's TP / PP (its own groups, or the policy's) against its shape and the training GPUs."""
    problems = []
    vtp, vpp = layout.value_dims
    own = "--value-tp" if layout.value_tp else "--value-tp (unset: the policy's --tp)"
    if value.heads % vtp or value.kv_heads % vtp:
        fits = _divisors(math.gcd(value.heads, value.kv_heads))
        problems.append(Problem(f"value TP {vtp} does not divide the {value.heads} heads and {value.kv_heads} KV "
                                f"heads of the value model {value.name}", f"set {own} to one of {fits}"))
    if value.layers % vpp:
        own = "--value-pp" if layout.value_pp else "--value-pp (unset: the policy's --pp)"
        problems.append(Problem(f"value PP {vpp} does not divide the {value.layers} layers of the value model "
                                f"{value.name}", f"set {own} to one of {_divisors(value.layers)}: the value model "
                                "gets groups of its own"))
    if layout.train_backend == "megatron" and layout.train_gpus % (vtp * vpp):
        problems.append(Problem(f"value TP {vtp} x PP {vpp} = {vtp * vpp} does not divide the {layout.train_gpus} "
                                "training GPUs", "choose --value-tp / --value-pp whose product divides them"))
    return problems


def _memory_fits(model, cluster, layout, eff, value) -> tuple[bool, TrainMemory]:
    memory = train_memory(model, layout, eff, value, micro_batches_per_rank(layout, eff))
    return memory.total <= (cluster.memory_gib - cluster.reserved_gib) * GIB, memory


def _regrid(layout: Layout, cluster: ClusterSpec, tp: int, pp: int, text: str, value: ModelSpec | None,
            ends: int | None = None) -> tuple[str, Layout, ClusterSpec]:
    """A TP/PP change (with `ends` layers on the first and last stage; None: the split stays), trimming the training GPUs to a
    multiple of tp * pp when needed; a value model that followed the old PP and cannot follow the new one gets
    a PP of its own."""
    gpus = layout.train_gpus // (tp * pp) * tp * pp
    if gpus != layout.train_gpus:
        text += f" on {gpus} training GPUs"
    text += f", DP {gpus // (tp * pp)}"
    changes = dict(tp=tp, pp=pp, train_gpus=gpus, dp=gpus // (tp * pp))
    if ends is not None:
        changes.update(pp_first_layers=ends, pp_last_layers=ends)
    if value and not layout.value_pp and value.layers % pp:
        vtp = layout.value_tp or tp
        vpp = max(d for d in _divisors(value.layers) if d <= pp and gpus % (vtp * d) == 0)
        changes["value_pp"] = vpp
        text += f"; value model on its own groups, --value-pp {vpp}"
    return text + ")", dataclasses.replace(layout, **changes), cluster


def _pipeline_candidates(model: ModelSpec, cluster: ClusterSpec, layout: Layout, eff: Efficiency,
                         value: ModelSpec | None):
    """Higher PPs, in order: those dividing the layers (trimming GPUs if needed), and those dividing the
    training GPUs with equal first and last stages of the layer count that needs the least memory per GPU."""
    out = []
    for pp in range(layout.pp + 1, layout.train_gpus // layout.tp + 1):
        if model.layers % pp == 0:
            out.append(_regrid(layout, cluster, layout.tp, pp, f"raise PP to {pp} (--pp {pp}", value, ends=0))
        elif layout.train_gpus % (layout.tp * pp) == 0 and pp > 2:
            splits = []
            for k in range(1, model.layers + 1):
                middle, left = divmod(model.layers - 2 * k, pp - 2)
                if middle >= 1 and not left:
                    text = (f"raise PP to {pp} with {k} | {middle} x {pp - 2} | {k} layers per stage (--pp {pp} "
                            f"--pp-first-layers {k} --pp-last-layers {k}")
                    candidate = _regrid(layout, cluster, layout.tp, pp, text, value, ends=k)
                    if not _structure(model, cluster, candidate[1], value):
                        splits.append((_memory_fits(model, cluster, candidate[1], eff, value)[1].total, candidate))
            if splits:
                out.append(min(splits, key=lambda item: item[0])[1])
    return out


def _train_memory_fix(model, cluster, layout, eff, value) -> str:
    """The first single change, cheapest first, under which training fits; else the cumulative set."""
    candidates: list[tuple[str, Layout, ClusterSpec]] = []
    if layout.recompute != "full":
        candidates.append(("enable full activation recompute (--recompute full)",
                           dataclasses.replace(layout, recompute="full"), cluster))
    if layout.logprob_kernel != "fused":
        candidates.append(("use the fused log-prob kernels (--logprob-kernel fused)",
                           dataclasses.replace(layout, logprob_kernel="fused"), cluster))
    longest = layout.max_prompt_len + layout.response_len
    smaller = layout.pack_tokens // 2
    while layout.packing and smaller >= longest:
        candidates.append((f"pack fewer tokens per micro-batch (--pack-tokens {smaller})",
                           dataclasses.replace(layout, pack_tokens=smaller), cluster))
        smaller //= 2
    if not layout.packing and layout.micro_batch_size > 1:
        candidates.append(("use micro-batches of one sequence (--micro-batch-size 1)",
                           dataclasses.replace(layout, micro_batch_size=1), cluster))
    if layout.train_backend == "megatron":
        if layout.grad_dtype == "fp32":
            candidates.append(("keep gradients in bf16 (--grad-dtype bf16)",
                               dataclasses.replace(layout, grad_dtype="bf16"), cluster))
        for tp in _divisors(math.gcd(model.heads, model.kv_heads)):
            if layout.tp < tp <= cluster.gpus_per_node:
                candidates.append(_regrid(layout, cluster, tp, layout.pp, f"raise train TP to {tp} (--tp {tp}",
                                          value))
        candidates += _pipeline_candidates(model, cluster, layout, eff, value)
    for extra in range(1, cluster.nodes + 1):
        grown = dataclasses.replace(cluster, gpus=cluster.gpus + extra * cluster.gpus_per_node)
        train_gpus = layout.train_gpus + extra * cluster.gpus_per_node
        if layout.train_backend == "megatron" and train_gpus % (layout.tp * layout.pp):
            continue
        grown_layout = dataclasses.replace(
            layout, train_gpus=train_gpus, rollout_gpus=grown.gpus if layout.placement == "colocated"
            else layout.rollout_gpus, dp=train_gpus // (layout.tp * layout.pp))
        if _memory_fits(model, grown, grown_layout, eff, value)[0]:
            candidates.append((f"add {extra} node(s) to training ({train_gpus} training GPUs, DP "
                               f"{grown_layout.dp}: smaller optimizer shards)", grown_layout, grown))
            break
    for text, candidate, candidate_cluster in candidates:
        if not _structure(model, candidate_cluster, candidate, value) and \
                _memory_fits(model, candidate_cluster, candidate, eff, value)[0]:
            return text
    return ("no single change fits: combine them (full recompute, bf16 gradients, higher TP and PP, smaller "
            "micro-batches) or add nodes")


def _rollout_fix(model: ModelSpec, layout: Layout, cluster: ClusterSpec, train: TrainMemory) -> str:
    if layout.placement == "colocated":
        return (f"the training state kept resident ({train.resident / GIB:.1f} GiB per GPU) leaves too little: "
                "shard it further (higher TP/PP, more nodes) or use a split layout")
    for rtp in _divisors(model.heads):
        if rtp <= layout.rollout_tp or not (model.kv_heads % rtp == 0 or rtp % model.kv_heads == 0):
            continue
        candidate = dataclasses.replace(layout, rollout_tp=rtp,
                                        rollout_gpus=max(layout.rollout_gpus, rtp))
        if rollout_memory(model, candidate, cluster, train).kv_tokens >= layout.max_prompt_len + layout.response_len:
            extra = "" if candidate.rollout_gpus == layout.rollout_gpus else f" on {candidate.rollout_gpus} GPUs"
            return f"raise rollout TP to {rtp}{extra} (--rollout-tp {rtp})"
    return "the model does not fit the rollout GPUs at any TP: use GPUs with more memory"


def make_plan(model: ModelSpec, cluster: ClusterSpec, layout: Layout, efficiency: Efficiency | None = None) -> Plan:
    """Checks the layout, then predicts memory and step time. A layout with structural problems gets no
    predictions; one that does not fit memory gets predictions and a problem with the smallest fix."""
    eff = efficiency or Efficiency()
    value = load_model(layout.value_model) if layout.value_model else None
    layout = layout.resolved(cluster)
    plan = Plan(model, cluster, layout, eff, value)
    plan.problems = _structure(model, cluster, layout, value)
    if plan.problems:
        return plan
    if layout.tp > cluster.gpus_per_node or layout.rollout_tp > cluster.gpus_per_node:
        plan.warnings.append(f"a TP group spans nodes (train TP {layout.tp}, rollout TP {layout.rollout_tp}, "
                             f"{cluster.gpus_per_node} GPUs per node): its all-reduces cross InfiniBand")
    fits, plan.train_memory = _memory_fits(model, cluster, layout, eff, value)
    capacity = cluster.memory_gib - cluster.reserved_gib
    if not fits:
        plan.problems.append(Problem(
            f"training does not fit: {plan.train_memory.total / GIB:.1f} GiB per GPU ({plan.train_memory.stage}) "
            f"> {capacity:.1f} GiB usable", _train_memory_fix(model, cluster, layout, eff, value)))
    plan.rollout_memory = rollout_memory(model, layout, cluster, plan.train_memory)
    longest = layout.max_prompt_len + layout.response_len
    if plan.rollout_memory.kv_tokens < longest:
        plan.problems.append(Problem(
            f"rollout does not fit: {plan.rollout_memory.kv_cache / GIB:.1f} GiB left for the KV cache holds "
            f"{plan.rollout_memory.kv_tokens} tokens, fewer than one {longest}-token sequence",
            _rollout_fix(model, layout, cluster, plan.train_memory)))
    plan.generate = generate_time(model, layout, cluster, eff, plan.rollout_memory.kv_tokens)
    plan.sync = sync_time(model, layout, cluster, eff)
    plan.train = train_time(model, layout, cluster, eff, value)
    return plan


def assumptions(plan: Plan) -> list[str]:
    """Every input the prediction rests on, one line each."""
    layout, eff, cluster = plan.layout, plan.efficiency, plan.cluster
    lines = [
        f"batch: {layout.prompts_per_step} prompts x {layout.samples_per_prompt} samples = {sequences(layout)} "
        f"sequences; mean prompt {layout.prompt_len}, longest prompt {layout.max_prompt_len}, response cap "
        f"{layout.response_len}, mean response {layout.mean_response_len} tokens",
        ("packing: sequences packed into micro-batches of " f"{layout.pack_tokens} tokens, "
         f"{eff.pack_fill:.0%} filled, balanced over DP ranks") if layout.packing else
        (f"no packing: every sequence padded to longest prompt + response cap = "
         f"{layout.max_prompt_len + layout.response_len} tokens, {layout.micro_batch_size} per micro-batch"),
        f"PPO epochs {layout.ppo_epochs}; forward passes per step: old-policy log-probs"
        + (", reference (kl_beta > 0)" if layout.kl_beta > 0 else "")
        + (f", value model {plan.value.name}" if plan.value else ""),
        f"train backend {layout.train_backend}, activation recompute {layout.recompute}, log-prob kernel "
        f"{layout.logprob_kernel}, weight sync {layout.sync}"
        + (f" ({layout.bucket_mb} MiB buckets)" if layout.sync == "bucketed" else ""),
        f"cluster: {cluster.gpus} GPUs, {cluster.gpus_per_node}/node, {cluster.memory_gib:g} GiB "
        f"({cluster.reserved_gib:g} reserved), NVLink {cluster.nvlink_gbps:g} GB/s, inter-node "
        f"{cluster.inter_gbps:g} GB/s per GPU, {cluster.bf16_tflops:g} TFLOP/s bf16, HBM {cluster.hbm_tbps:g} TB/s",
        f"vLLM: max_num_seqs {layout.rollout_max_seqs}, gpu_memory_utilization {layout.rollout_memory_fraction}"
        + (", enforce_eager" if layout.rollout_eager else ", CUDA graphs"),
    ]
    docs = field_docs(Efficiency)
    for f in dataclasses.fields(eff):
        lines.append(f"{f.name} = {getattr(eff, f.name):g}: {docs.get(f.name, '')}")
    return lines


def _gib(x: float) -> str:
    return f"{x / GIB:8.1f}"


def format_report(plan: Plan) -> str:
    """A readable table: the layout, memory per GPU, seconds per step, problems, assumptions."""
    layout, model = plan.layout, plan.model
    out = [f"model {model.name}: {model.params / 1e9:.1f} B parameters, {model.layers} layers, hidden "
           f"{model.hidden}, {model.heads} heads / {model.kv_heads} KV heads"
           + (f"; value model {plan.value.name} ({plan.value.params / 1e9:.1f} B)" if plan.value else ""),
           f"layout {layout.placement}: train {layout.train_gpus} GPUs ({layout.train_backend}"
           + (f", TP {layout.tp} x PP {layout.pp} x DP {layout.dp}" if layout.train_backend == "megatron" else "")
           + f"), rollout {layout.rollout_gpus} GPUs at TP {layout.rollout_tp}"]
    if plan.train_memory is not None:
        capacity = plan.cluster.memory_gib - plan.cluster.reserved_gib
        out.append("")
        out.append(f"memory per GPU (GiB)          train ({plan.train_memory.stage})   rollout")
        rows = dict(plan.train_memory.items())
        rollout = dict(plan.rollout_memory.items())
        for name in list(rows) + [n for n in rollout if n not in rows]:
            train_cell = _gib(rows[name]) if name in rows else " " * 8
            rollout_cell = _gib(rollout[name]) if name in rollout else ""
            out.append(f"  {name:<28}{train_cell}            {rollout_cell}")
        out.append(f"  {'total':<28}{_gib(plan.train_memory.total)}            {_gib(plan.rollout_memory.total)}"
                   f"   (usable {capacity:.1f}; KV cache holds {plan.rollout_memory.kv_tokens} tokens per engine)")
        out.append("")
        out.append("seconds per step")
        for title, phase in (("generate", plan.generate), ("weight sync", plan.sync), ("train", plan.train)):
            out.append(f"  {title:<28}{phase.seconds:10.1f}")
            for name, seconds in phase.parts.items():
                out.append(f"    {name:<26}{seconds:10.1f}")
            facts = ", ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v:,}" for k, v in phase.facts.items())
            out.append(f"    ({facts})")
        out.append(f"  {'step':<28}{plan.step_seconds:10.1f}")
    out.append("")
    if plan.problems:
        out.append("BAD PLAN:")
        for problem in plan.problems:
            out.append(f"  - {problem.what}\n    fix: {problem.fix}")
    else:
        out.append("plan fits.")
    for warning in plan.warnings:
        out.append(f"  warning: {warning}")
    out.append("")
    out.append("assumptions:")
    out.extend(f"  - {line}" for line in assumptions(plan))
    return "\n".join(out)
