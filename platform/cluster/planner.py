"""Memory plan of a training job before it runs: `python -m platform.fit --config ... --dry_run --cluster.*`.

docs/design.md: nothing here can run the XL and XXL models, so for a config and a cluster shape the planner
builds the model on the meta device (exact parameter counts) and estimates, per GPU, the weights, gradients
and optimizer states under the chosen strategy and precision (ZeRO paper, Rajbhandari et al. 2020, §3), the
parameters gathered for the blocks in flight, and the peak activation memory with and without activation
checkpointing. The activation model counts, tensor by tensor, what autograd keeps for backward in an LSWT
block and its head (the formulas below); tests/training/test_planner.py checks it against the peak memory
measured on CPU. A layout that does not fit is refused with one line saying what to change. The plan also
estimates how long a checkpoint save takes (its bytes per node over the storage's write bandwidth) and warns
when SLURM's SIGUSR1 comes too short a time before the job's limit to finish one (cluster/requeue.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..models.flops import flops_per_token
from ..models.registry import count_parameters, family
from .strategies import repeated_blocks

GiB = 2**30
# Bytes per parameter for (weights, gradients, optimizer state per moment) and per activation element
# (compute c, residual stream r) under each Lightning precision. bf16-mixed keeps fp32 master weights and
# runs LayerNorm and the residual stream in fp32 under autocast; bf16-true stores everything in bf16.
PRECISION_BYTES = {
    "32-true": dict(weight=4, grad=4, state=4, c=4, r=4),
    "32": dict(weight=4, grad=4, state=4, c=4, r=4),
    "bf16-mixed": dict(weight=4, grad=4, state=4, c=2, r=4),
    "16-mixed": dict(weight=4, grad=4, state=4, c=2, r=4),
    "bf16-true": dict(weight=2, grad=2, state=2, c=2, r=2),
    "16-true": dict(weight=2, grad=2, state=2, c=2, r=2),
}
# `#SBATCH --signal=SIGUSR1@90` in slurm/*.sbatch: SIGUSR1 comes 90 s before the time limit.
TEMPLATE_SIGNAL_LEAD_S = 90
# The lead time must cover a save in flight (an asynchronous one, or the optimizer step before the save) and
# the requeue's own save: twice the estimate of one save.
LEAD_TIME_FACTOR = 2
MOMENTS = {"adamw": 2, "adam": 2, "laprop": 2, "sophiag": 2, "lion": 1, "sgd": 1}  # states per parameter


@dataclasses.dataclass
class ClusterShape:
    nodes: int | None = None
    """Nodes of the planned cluster (default: trainer.num_nodes)."""
    gpus_per_node: int | None = None
    """GPUs per node (default: trainer.devices)."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU as sold, in GiB (80 for an A100/H100 80GB)."""
    reserved_gb: float = 5.0
    """Memory a job cannot use for tensors: CUDA context (~1 GiB), NCCL buffers (1-2 GiB), allocator slack."""
    storage_gb_per_s: float = 1.0
    """Write bandwidth of the checkpoint directory's storage per node, in GB/s (10^9 bytes): conservative for a
    shared parallel filesystem; measure yours (e.g. `dd` of a few GB with oflag=direct) and set it."""
    signal_lead_s: float | None = None
    """Seconds between SLURM's SIGUSR1 and the time limit (`--signal=SIGUSR1@<seconds>`); default: the value
    of SBATCH_SIGNAL when set, else 90, the value in slurm/*.sbatch."""

    def __post_init__(self) -> None:
        for key in ("nodes", "gpus_per_node"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"cluster.{key}={getattr(self, key)} must be >= 1")
        if self.storage_gb_per_s <= 0:
            raise ValueError(f"cluster.storage_gb_per_s={self.storage_gb_per_s} must be > 0")
        if self.signal_lead_s is not None and self.signal_lead_s < 0:
            raise ValueError(f"cluster.signal_lead_s={self.signal_lead_s} must be >= 0")
        if self.gpu_memory_gb <= self.reserved_gb:
            raise ValueError(
                f"cluster.gpu_memory_gb={self.gpu_memory_gb} must be larger than cluster.reserved_gb={self.reserved_gb}"
            )


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything the estimate depends on besides the model."""

    strategy: str  # ddp | fsdp2 | fsdp | deepspeed | single
    sharding: str = "full"  # fsdp2/fsdp: full | grad_op | hybrid
    zero_stage: int = 0  # deepspeed
    offload_optimizer: bool = False  # deepspeed
    offload_parameters: bool = False  # deepspeed
    precision: str = "32-true"
    activation_checkpointing: bool = False
    micro_batch: int = 1
    seq_len: int = 2048
    accumulation: int = 1
    nodes: int = 1
    gpus_per_node: int = 1
    gpu_memory_gib: float = 80.0
    reserved_gib: float = 5.0
    moments: int = 2
    state_dict: str = "sharded"  # fsdp2/fsdp checkpoints: sharded (every rank writes) | full (rank 0 writes)
    storage_gb_per_s: float = 1.0  # write bandwidth per node
    signal_lead_s: float = TEMPLATE_SIGNAL_LEAD_S

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.seq_len * self.accumulation * self.world


@dataclasses.dataclass(frozen=True)
class Activations:
    """Peak bytes above weights, gradients and optimizer states during one micro-batch's forward and backward."""

    with_checkpointing: int
    without_checkpointing: int
    model: str  # which activation model produced the numbers


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    arch: str
    size: str
    config: Any  # the architecture's config dataclass
    n_params: int
    layout: Layout
    weights: float  # bytes per GPU, persistent
    gradients: float
    optimizer: float
    gathered: float  # unsharded parameters and gradients of the blocks in flight, or autocast's weight copies
    activations: Activations
    checkpoint_bytes: float = 0.0  # one checkpoint: weights and optimizer states
    notes: tuple[str, ...] = ()

    @property
    def activation_bytes(self) -> int:
        a = self.activations
        return a.with_checkpointing if self.layout.activation_checkpointing else a.without_checkpointing

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.activation_bytes

    @property
    def usable(self) -> float:
        return (self.layout.gpu_memory_gib - self.layout.reserved_gib) * GiB

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    @property
    def checkpoint_bytes_per_node(self) -> float:
        """What the busiest node writes: a sharded save spreads the checkpoint over the nodes (DCP writes each
        replicated shard once), a full one is written by rank 0."""
        lay = self.layout
        sharded = lay.strategy == "deepspeed" or (lay.strategy in ("fsdp2", "fsdp") and lay.state_dict == "sharded")
        return self.checkpoint_bytes / lay.nodes if sharded else self.checkpoint_bytes

    @property
    def save_seconds(self) -> float:
        return self.checkpoint_bytes_per_node / (self.layout.storage_gb_per_s * 1e9)

    @property
    def lead_time_warning(self) -> str | None:
        """A warning when SIGUSR1 comes too late to finish a save before the time limit, else None."""
        lay, needed = self.layout, LEAD_TIME_FACTOR * self.save_seconds
        if lay.signal_lead_s >= needed:
            return None
        suggested = 10 * math.ceil(needed / 10)
        return (
            f"SIGUSR1 comes {lay.signal_lead_s:g} s before the time limit (cluster.signal_lead_s), less than "
            f"{LEAD_TIME_FACTOR} x the ~{self.save_seconds:.0f} s a checkpoint save takes; the requeue's save may be "
            f"cut off: submit with `sbatch --signal=SIGUSR1@{suggested}` (and --cluster.signal_lead_s {suggested}) "
            "or set cluster.storage_gb_per_s to the measured bandwidth"
        )


# --- activations ---------------------------------------------------------------------------------------
def lswt_activations(config: Any, tokens: int, c: int, r: int, g: int) -> Activations:
    """Peak activation bytes of an LSWT training step from autograd's saved tensors, per token (D d_model,
    F d_ff, H heads, V vocab, Dv d_vocab, L layers; c compute bytes, r residual-stream bytes, g gradient bytes).

    Saved per block (pre-norm attention + SwiGLU), 2Dr + 6Dc + 2Fc + 4H + 16: LayerNorm 1 input Dr and its
    mean/rstd 8; its output, the q/k/v input, Dc; rotated q, k, v and the attention output 4Dc with the
    log-sum-exp 4H (flash/SDPA keep no T x T matrix; the output projection reads the attention output in
    place); LayerNorm 2 Dr + 8; the SwiGLU input Dc and its up projection 2Fc (the gated down projection
    recomputes the rest in backward). With checkpointing a block keeps its input Dr.
    Saved by the head: token ids 8, the embedding output Dv c, input LayerNorm Dc + 8, final LayerNorm
    Dr + 8 and its output Dc, the output projection Dv c, the logits V c (kept by the step for its metrics)
    and the fp32 log-softmax 4V.

    The peak is the largest of three moments of the backward pass:
      start: everything saved, plus the cross-entropy's two fp32 (T, V) gradients 8V, or the logits
        gradient V c with the tied embedding's gradient from the output side (V x Dv, g bytes);
      middle: the blocks still saved, the logits, that embedding gradient (held until the input side adds
        its own), and with checkpointing the one block being recomputed;
      end: the logits and three V x Dv gradients (output side, input side, their sum).
    Measured on CPU in fp32 (benchmarks/activation_memory.py) this lands within 10% for the debug and tiny
    sizes, with and without checkpointing.
    """
    D, F, H, V, Dv, L = config.d_model, config.d_ff, config.n_heads, config.vocab_size, config.d_vocab, config.n_layers
    block = 2 * D * r + 6 * D * c + 2 * F * c + 4 * H + 16
    head = 8 + Dv * c + D * c + 8 + D * r + 8 + D * c + Dv * c + V * c + 4 * V
    embedding_grad = V * Dv * g

    def peak(kept_per_block: int, recomputed: int) -> int:
        start = tokens * (L * kept_per_block + head) + max(8 * V * tokens, c * V * tokens + embedding_grad)
        middle = tokens * (L * kept_per_block + V * c + recomputed) + embedding_grad
        end = tokens * V * c + 3 * embedding_grad
        return max(start, middle, end)

    return Activations(peak(D * r, block), peak(block, 0), "lswt")


def generic_activations(config: Any, tokens: int, c: int, r: int, g: int) -> Activations:
    """For families without an activation model of their own: LSWT's block (pre-norm attention + gated MLP)
    and an untied head, from the common config names d_model, n_layers, n_heads, d_ff and vocab_size."""
    D, L, V = config.d_model, config.n_layers, config.vocab_size
    F, H = getattr(config, "d_ff", 4 * D), getattr(config, "n_heads", 1)
    block = 2 * D * r + 6 * D * c + 2 * F * c + 4 * H + 16
    head = 8 + D * c + D * r + 8 + D * c + V * c + 4 * V

    def peak(kept_per_block: int, recomputed: int) -> int:
        start = tokens * (L * kept_per_block + head) + 8 * V * tokens
        return max(start, tokens * (L * kept_per_block + V * c + recomputed))

    return Activations(peak(D * r, block), peak(block, 0), "generic")


ACTIVATION_MODELS = {"lswt": lswt_activations}


# --- the plan -------------------------------------------------------------------------------------------
def plan_memory(arch: str, size: str, config: Any, layout: Layout) -> MemoryPlan:
    """Per-GPU memory of one training step of `config` (an architecture's config dataclass) under `layout`."""
    with torch.device("meta"):
        model = family(arch).model(config)
    n_params = count_parameters(model)
    blocks = repeated_blocks(model)
    block_params = max((count_parameters(b) for b in blocks), default=n_params)
    if layout.precision not in PRECISION_BYTES:
        raise ValueError(
            f"trainer.precision={layout.precision} is not one the planner knows; "
            f"use one of: {', '.join(PRECISION_BYTES)}"
        )
    b = PRECISION_BYTES[layout.precision]
    weight, grad, state = b["weight"], b["grad"], b["state"] * layout.moments
    notes: list[str] = []
    gathered = 0.0
    world, node = layout.world, layout.gpus_per_node

    if layout.strategy in ("fsdp2", "fsdp"):
        shards = node if layout.sharding == "hybrid" else world
        weights, gradients, optimizer = n_params * weight / shards, n_params * grad / shards, n_params * state / shards
        compute_weight = min(weight, b["c"])  # gathered in the compute dtype (FSDP2 mixed-precision policy)
        if layout.sharding == "grad_op":  # every block stays gathered from its forward to its backward
            gathered = n_params * compute_weight + block_params * grad
        else:  # the block being computed and the one prefetched, plus one block's unsharded gradients
            gathered = 2 * block_params * compute_weight + block_params * grad
    elif layout.strategy == "deepspeed":
        # DeepSpeed with bf16/fp16 keeps 16-bit weights and gradients and fp32 master weights in the optimizer
        # partition (ZeRO's K = 12 bytes with Adam); stage 1 shards the optimizer, 2 also gradients, 3 weights.
        half = layout.precision not in ("32-true", "32")
        weight, grad = (2, 2) if half else (4, 4)
        state = (4 if half else 0) + 4 * layout.moments
        stage = layout.zero_stage
        weights = n_params * weight / (world if stage >= 3 else 1)
        gradients = n_params * grad / (world if stage >= 2 else 1)
        optimizer = n_params * state / world
        if stage >= 3:
            gathered = 2 * block_params * weight + block_params * grad
        if layout.offload_optimizer:
            notes.append(f"optimizer states offloaded: {n_params * state / world / GiB:.1f} GiB of CPU memory per GPU")
            optimizer = 0.0
        if layout.offload_parameters and stage >= 3:
            notes.append(f"parameters offloaded: {weights / GiB:.1f} GiB of CPU memory per GPU")
            weights = 0.0
    else:  # ddp or a single device: every GPU holds everything
        weights, gradients, optimizer = n_params * weight, n_params * grad, n_params * state
        if layout.strategy == "ddp" and world > 1:
            gradients *= 2  # DDP's communication buckets hold a second copy of the gradients
        if layout.precision in ("bf16-mixed", "16-mixed"):
            gathered = n_params * 2  # autocast keeps a 16-bit copy of every weight for the whole step
            notes.append("autocast caches a 16-bit copy of every weight during the step")

    checkpoint = n_params * (weight + state)  # the weights as stored and every optimizer state (fp32 masters)
    activation_model = ACTIVATION_MODELS.get(arch, generic_activations)
    tokens = layout.micro_batch * layout.seq_len
    activations = activation_model(config, tokens, b["c"], b["r"], b["grad"])
    if activations.model == "generic":
        notes.append(f"no activation model for {arch}: generic pre-norm transformer estimate")
    return MemoryPlan(
        arch, size, config, n_params, layout, weights, gradients, optimizer, gathered, activations,
        checkpoint_bytes=checkpoint, notes=tuple(notes),
    )  # fmt: skip


def format_plan(plan: MemoryPlan) -> str:
    """The table `--dry_run` prints."""
    lay = plan.layout
    strategy = {"fsdp2": f"fsdp2 ({lay.sharding} sharding)", "fsdp": f"fsdp ({lay.sharding} sharding)"}.get(
        lay.strategy, f"deepspeed ZeRO-{lay.zero_stage}" if lay.strategy == "deepspeed" else lay.strategy
    )
    checkpointing = "on" if lay.activation_checkpointing else "off"
    flops = flops_per_token(plan.arch, plan.config, lay.seq_len)
    a = plan.activations
    rows = [
        ("weights", plan.weights),
        ("gradients", plan.gradients),
        ("optimizer states", plan.optimizer),
        ("gathered blocks / weight copies", plan.gathered),
        (f"activations, checkpointing {checkpointing}", plan.activation_bytes),
        ("total", plan.total),
    ]
    lines = [
        f"plan: {plan.arch} {plan.size}, {plan.n_params / 1e9:.2f}B parameters ({plan.n_params:,})",
        f"cluster: {lay.nodes} node(s) x {lay.gpus_per_node} GPU(s) of {lay.gpu_memory_gib:g} GiB "
        f"({lay.gpu_memory_gib - lay.reserved_gib:g} usable); strategy {strategy}; precision {lay.precision}",
        f"batch: micro-batch {lay.micro_batch} x {lay.seq_len} tokens, {lay.accumulation} accumulation step(s), "
        f"{lay.world} data-parallel rank(s): {lay.tokens_per_step:,} tokens per optimizer step",
        f"compute: {_si(flops)}FLOPs per token, forward and backward (models/flops.py); "
        f"{_si(flops * lay.tokens_per_step)}FLOPs per optimizer step",
        "",
        f"{'per GPU':40s} {'GiB':>8s}",
    ]
    lines += [f"  {name:38s} {value / GiB:8.2f}" for name, value in rows]
    lines += [
        "",
        f"activations with checkpointing {a.with_checkpointing / GiB:.2f} GiB, "
        f"without {a.without_checkpointing / GiB:.2f} GiB ({a.model} activation model)",
        *[f"note: {n}" for n in plan.notes],
        f"checkpoint: {plan.checkpoint_bytes / 1e9:.1f} GB, {plan.checkpoint_bytes_per_node / 1e9:.1f} GB written "
        f"per node: ~{plan.save_seconds:.0f} s at {lay.storage_gb_per_s:g} GB/s (cluster.storage_gb_per_s); "
        f"SIGUSR1 {lay.signal_lead_s:g} s before the time limit (cluster.signal_lead_s)",
        *([f"warning: {plan.lead_time_warning}"] if plan.lead_time_warning else []),
        f"verdict: {'fits' if plan.fits else 'does not fit'} "
        f"({plan.total / GiB:.1f} of {plan.usable / GiB:.1f} GiB usable per GPU)",
    ]
    return "\n".join(lines)


def _si(value: float) -> str:
    """3 significant figures and an SI prefix: 1.19 M, 6.02 P."""
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g} "


def check_fits(plan: MemoryPlan) -> None:
    """Refuse a plan that does not fit, naming the first change that would make it fit."""
    if plan.fits:
        return
    lay = plan.layout
    advice = suggest(plan)
    raise ValueError(
        f"{plan.arch} {plan.size} needs {plan.total / GiB:.1f} GiB per GPU under {lay.strategy} with "
        f"micro-batch {lay.micro_batch} x {lay.seq_len}, more than the {plan.usable / GiB:.1f} GiB usable of "
        f"cluster.gpu_memory_gb={lay.gpu_memory_gib:g}; {advice}"
    )


def suggest(plan: MemoryPlan) -> str:
    """The first of the usual changes, in order of cost, that makes the plan fit."""
    lay = plan.layout
    sharded = dict(strategy="fsdp2", sharding="full", activation_checkpointing=True)
    candidates = []
    if not lay.activation_checkpointing:
        candidates.append(("set parallelism.activation_checkpointing=true", dict(activation_checkpointing=True)))
    if lay.world > 1 and (lay.strategy not in ("fsdp2", "fsdp", "deepspeed") or lay.sharding != "full"):
        candidates.append(("shard with parallelism.strategy=fsdp2 and activation checkpointing", sharded))
    if lay.micro_batch > 1:
        accumulation = lay.accumulation * lay.micro_batch  # the same tokens per optimizer step
        candidates.append(
            (f"lower data.batch_size to 1 and raise trainer.accumulate_grad_batches to {accumulation}",
             dict(micro_batch=1, accumulation=accumulation))
        )  # fmt: skip
    for text, change in candidates:
        if plan_memory(plan.arch, plan.size, plan.config, dataclasses.replace(lay, **change)).fits:
            return text
    gpus_per_node = max(lay.gpus_per_node, 8)
    for nodes in range(1, 257):
        trial = dataclasses.replace(lay, nodes=nodes, gpus_per_node=gpus_per_node, **sharded)
        if plan_memory(plan.arch, plan.size, plan.config, trial).fits:
            return (
                f"shard it with parallelism.strategy=fsdp2 and activation checkpointing over at least {nodes} "
                f"node(s) of {gpus_per_node} GPUs (--cluster.nodes {nodes} --cluster.gpus_per_node {gpus_per_node})"
            )
    return "it does not fit on up to 256 nodes of 8 such GPUs; pick a smaller model or shorter sequences"


# --- from a parsed `python -m platform.fit` config ------------------------------------------------------
def plan_from_config(config: Any) -> MemoryPlan:
    """The plan of a parsed fit config (the command line's namespace), on the `cluster` shape when given and
    on trainer.num_nodes x trainer.devices otherwise."""
    from ..models.spec import ModelSpec
    from .strategies import Parallelism, family_of

    model, trainer, cluster = config.model, config.trainer, config.cluster
    parallelism = Parallelism(**config.parallelism.as_dict())
    spec = ModelSpec.from_config(model.arch, model.size, model.model_config)
    vocab_size = prepared_vocab_size(config.data.data_dir)  # never prepares data: a plan must be instant
    if vocab_size is not None:
        spec = spec.replace(vocab_size=vocab_size)
    devices = trainer.devices if isinstance(trainer.devices, int) else 1
    nodes, gpus = cluster.nodes or trainer.num_nodes or 1, cluster.gpus_per_node or devices
    strategy = parallelism.strategy if parallelism.strategy != "auto" else family_of(trainer.strategy)
    strategy = strategy or ("ddp" if nodes * gpus > 1 else "single")
    stage, offload_optimizer, offload_parameters = _zero_settings(parallelism, trainer.strategy, strategy)
    optimizer = model.optimizer
    optimizer_name = str(optimizer.get("class_path", "adamw") if hasattr(optimizer, "get") else optimizer)
    layout = Layout(
        strategy=strategy,
        sharding=parallelism.sharding,
        zero_stage=stage,
        offload_optimizer=offload_optimizer,
        offload_parameters=offload_parameters,
        precision=PRECISION_ALIASES.get(str(trainer.precision), str(trainer.precision or "32-true")),
        activation_checkpointing=parallelism.activation_checkpointing,
        micro_batch=config.data.batch_size,
        seq_len=config.data.seq_len,
        accumulation=trainer.accumulate_grad_batches or 1,
        nodes=nodes,
        gpus_per_node=gpus,
        gpu_memory_gib=cluster.gpu_memory_gb,
        reserved_gib=cluster.reserved_gb,
        moments=MOMENTS.get(optimizer_name.rsplit(".", 1)[-1].lower(), 2),
        state_dict=parallelism.state_dict,
        storage_gb_per_s=cluster.storage_gb_per_s,
        signal_lead_s=signal_lead_s(cluster.signal_lead_s),
    )
    return plan_memory(spec.arch, spec.size, spec.config(), layout)


def signal_lead_s(configured: float | None) -> float:
    """cluster.signal_lead_s, else the lead of SBATCH_SIGNAL (`[R:|B:]<signal>[@<seconds>]`, 60 s when left
    out, as sbatch reads it), else the templates' 90 s."""
    if configured is not None:
        return configured
    spec = os.environ.get("SBATCH_SIGNAL")
    if spec:
        match = re.search(r"@(\d+)$", spec)
        return float(match.group(1)) if match else 60.0
    return float(TEMPLATE_SIGNAL_LEAD_S)


def prepared_vocab_size(data_dir: str | None) -> int | None:
    """The vocabulary of data already prepared in `data_dir` (its index), else None: the model's own."""
    from ..data.shards import INDEX, TokenShards

    if not data_dir or not (Path(data_dir) / INDEX).is_file():
        return None
    return TokenShards.open(data_dir).vocab_size


PRECISION_ALIASES = {"None": "32-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def _zero_settings(parallelism: Any, trainer_strategy: Any, strategy: str) -> tuple[int, bool, bool]:
    """(ZeRO stage, optimizer offloaded, parameters offloaded) from the DeepSpeed JSON of the parallelism
    section, or from a registry name such as trainer.strategy=deepspeed_stage_3_offload."""
    if strategy != "deepspeed":
        return 0, False, False
    if parallelism.strategy == "deepspeed":
        zero = parallelism.deepspeed_dict().get("zero_optimization", {})
        offloaded = [
            (zero.get(key) or {}).get("device", "none") != "none" for key in ("offload_optimizer", "offload_param")
        ]
        return int(zero.get("stage", 0)), *offloaded
    label = str(trainer_strategy)
    stage = int(label.split("stage_")[1][0]) if "stage_" in label else 2  # Lightning's default stage
    return stage, "offload" in label, "offload" in label and stage == 3
