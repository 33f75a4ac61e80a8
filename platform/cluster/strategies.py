"""Parallel training strategies chosen in YAML (the `parallelism:` section), and how each one builds the model.

docs/design.md: DDP; FSDP2 (`fully_shard` per block) through Lightning's
ModelParallelStrategy, the sharded path that also runs on CPU with gloo; Lightning's FSDPStrategy (FSDP1) and
DeepSpeed ZeRO 1/2/3 for GPU clusters. FSDP1 and DeepSpeed refuse a CPU accelerator, so that is checked here,
before anything starts, with one line that says what to use instead. Activation checkpointing is applied the
same way under every strategy: each block's forward runs under non-reentrant `torch.utils.checkpoint`.
A sharded (DCP) checkpoint directory gets its completion marker (training/checkpoints.py) once every rank's
shard and the metadata are written; under FSDP2 the write can run in the background (`async_save`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from torch import Tensor, nn

from ..training.checkpoints import COMPLETE, META, AtomicCheckpointIO, mark_complete, storage_error, tensor_bytes
from ..training.optimizers import no_weight_decay_names

StrategyName = Literal["auto", "ddp", "fsdp2", "fsdp", "deepspeed"]
Sharding = Literal["full", "grad_op", "hybrid"]
REPO = Path(__file__).resolve().parent.parent.parent
CUDA_ONLY = {"fsdp": "FSDPStrategy (FSDP1)", "deepspeed": "DeepSpeed"}
# Prefixes that wrappers insert into parameter names; parameter groups match the unwrapped names.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


@dataclasses.dataclass
class Parallelism:
    strategy: StrategyName = "auto"
    """ddp | fsdp2 (FSDP2 fully_shard per block; runs on CPU too) | fsdp (Lightning's FSDPStrategy, CUDA) |
    deepspeed (ZeRO, CUDA) | auto (Lightning's choice, or trainer.strategy when that is set)."""
    sharding: Sharding = "full"
    """fsdp2/fsdp: full (parameters, gradients and optimizer states sharded over all ranks, like ZeRO-3) |
    grad_op (parameters stay gathered from forward to backward, like ZeRO-2) | hybrid (full within a node,
    replicated across nodes)."""
    activation_checkpointing: bool = False
    """Keep only each block's input and recompute the rest in the backward pass (about 1/3 more compute)."""
    state_dict: Literal["sharded", "full"] = "sharded"
    """fsdp2/fsdp checkpoints: sharded (a directory with one file per rank, DCP) or full (one file from rank 0).
    `python -m platform.export` turns a sharded checkpoint into one file."""
    async_save: bool = False
    """fsdp2 with sharded checkpoints: a save returns once the states are copied to host memory (a second
    host copy of this rank's shard while it lasts) and the files are written in the background; the
    directory's `.complete` marker follows when the write ends. At most one save is in flight: the next save,
    a requeue and the end of training wait for it."""
    deepspeed_config: str = "configs/deepspeed/zero3.json"
    """deepspeed: JSON config (ZeRO stage, offload, buckets), relative to the repository root or absolute;
    configs/deepspeed/ has stage 1, 2, 3 and 3 with CPU offload."""

    def __post_init__(self) -> None:
        if self.async_save and (self.strategy != "fsdp2" or self.state_dict != "sharded"):
            raise ValueError(
                f"parallelism.async_save=true needs parallelism.strategy=fsdp2 with parallelism.state_dict=sharded "
                f"(got strategy={self.strategy}, state_dict={self.state_dict}); set them or drop async_save"
            )

    def deepspeed_dict(self) -> dict[str, Any]:
        path = Path(self.deepspeed_config)
        path = path if path.is_absolute() or path.exists() else REPO / path
        if not path.is_file():
            raise FileNotFoundError(f"parallelism.deepspeed_config {self.deepspeed_config} does not exist")
        return json.loads(path.read_text())


def check_supported(parallelism: Parallelism, trainer_strategy: Any, accelerator: Any) -> None:
    """Stop before anything starts when a CUDA-only strategy meets a machine or accelerator without CUDA."""
    if parallelism.strategy != "auto" and trainer_strategy not in (None, "auto"):
        raise ValueError(
            f"both parallelism.strategy={parallelism.strategy} and trainer.strategy={_strategy_label(trainer_strategy)}"
            " are set; set only parallelism.strategy"
        )
    name = parallelism.strategy if parallelism.strategy != "auto" else family_of(trainer_strategy)
    if name not in CUDA_ONLY:
        return
    accelerator = str(accelerator or "auto").lower()
    if accelerator not in ("gpu", "cuda", "auto") or not torch.cuda.is_available():
        raise ValueError(
            f"strategy {name} ({CUDA_ONLY[name]}) needs CUDA GPUs, but trainer.accelerator={accelerator} and "
            f"torch.cuda.is_available()={torch.cuda.is_available()}; on CPU use parallelism.strategy=fsdp2 "
            "(sharded, gloo) or ddp"
        )
    if name == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ImportError(
            "parallelism.strategy=deepspeed needs the deepspeed package; install the deepspeed extra "
            "(`pip install 'deepspeed>=0.16,<1'`) or use parallelism.strategy=fsdp2"
        )


def _strategy_label(strategy: Any) -> str:
    if isinstance(strategy, dict) or hasattr(strategy, "get"):
        return str(strategy.get("class_path", strategy))
    return strategy if isinstance(strategy, str) else type(strategy).__name__


def family_of(strategy: Any) -> str:
    """'fsdp', 'deepspeed', 'fsdp2' or 'ddp' for the usual spellings of trainer.strategy, else ''."""
    label = _strategy_label(strategy).lower() if strategy is not None else ""
    if "deepspeed" in label:
        return "deepspeed"
    if label.startswith("fsdp") or label.endswith("fsdpstrategy"):
        return "fsdp"
    if "model_parallel" in label or "modelparallel" in label or "fsdp2" in label:
        return "fsdp2"
    return "ddp" if "ddp" in label else ""


def build_strategy(parallelism: Parallelism, module: nn.Module, micro_batch_size: int) -> Strategy | None:
    """The Lightning strategy for `parallelism`, or None to keep trainer.strategy."""
    name = parallelism.strategy
    if name == "auto":
        return None
    if name == "ddp":
        return DDPStrategy()
    if name == "fsdp2":
        return FSDP2Strategy(
            sharding=parallelism.sharding, state_dict=parallelism.state_dict, async_save=parallelism.async_save
        )
    if name == "fsdp":
        return MarkedFSDPStrategy(
            auto_wrap_policy=block_types(module),
            sharding_strategy={"full": "FULL_SHARD", "grad_op": "SHARD_GRAD_OP", "hybrid": "HYBRID_SHARD"}[
                parallelism.sharding
            ],
            state_dict_type=parallelism.state_dict,
            use_orig_params=True,  # keeps per-parameter names, flags and grads (parameter groups, grad norms)
            limit_all_gathers=True,
        )
    # micro_batch_size only feeds DeepSpeed's own throughput logging: our loader yields whole batches.
    return DeepSpeedStrategy(config=parallelism.deepspeed_dict(), logging_batch_size_per_gpu=micro_batch_size)


class PendingSave:
    """A sharded save whose files are still being written in the background."""

    def __init__(self, path: Path, future: Future, needed_bytes: int) -> None:
        self.path, self.future, self.needed_bytes = path, future, needed_bytes
        self.removals: list[Path] = []  # older checkpoints to remove once this one is complete


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy used for data parallelism only. Its device mesh is
    (data_parallel, tensor_parallel) = (world, 1) for "full" and "grad_op" sharding, and
    (nodes, devices per node) for "hybrid", where fully_shard reads the 2-D mesh as (replicate, shard).
    The LanguageModelModule applies `fully_shard` in configure_model (`build_for_strategy`).

    Sharded checkpoints are saved here rather than by Lightning so that the directory gets its completion
    marker, and so that with `async_save` the files are written by DCP's background thread: the save returns
    once the states are copied to host memory. The background write synchronises the ranks over a gloo
    group of its own, never the training's group. Rank 0's write ends only after DCP has gathered every
    rank's write results and written `.metadata`, so rank 0 alone can mark the directory complete. Checkpoints
    that ModelCheckpoint retires while a write is in flight are removed only once the new one is complete.
    """

    def __init__(
        self,
        sharding: Sharding = "full",
        state_dict: Literal["sharded", "full"] = "sharded",
        async_save: bool = False,
        **kwargs,
    ):
        super().__init__(save_distributed_checkpoint=state_dict == "sharded", **kwargs)
        self.sharding, self.async_save = sharding, async_save
        self.pending: PendingSave | None = None
        self._save_group = None  # the gloo group of background writes

    def setup_environment(self) -> None:
        if self.sharding == "hybrid":
            self._data_parallel_size, self._tensor_parallel_size = self.num_nodes, self.num_processes
        else:
            self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()
        if self.async_save and self._save_group is None:
            self._save_group = torch.distributed.new_group(backend="gloo")  # every rank, in the same order

    @property
    def shard_mesh(self):
        return self.device_mesh if self.sharding == "hybrid" else self.device_mesh["data_parallel"]

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        self.finish_pending_save()  # one save in flight at most
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        import torch.distributed.checkpoint as dcp

        path = Path(self.broadcast(filepath))  # rank 0's path: every rank writes into the same directory
        begin_sharded_save(self, path)
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        needed = tensor_bytes(state)  # the whole checkpoint: DTensors count with their global shape
        if self.is_global_zero:  # the rest of Lightning's checkpoint: loops, callbacks, hyperparameters
            AtomicCheckpointIO().save_checkpoint(checkpoint, path / META)
        try:
            if self.async_save:
                # The default stager copies every tensor to fresh host memory: on CPU the state dict's
                # tensors are the live parameters, which the next optimizer step changes in place.
                future = dcp.async_save(state, checkpoint_id=path, process_group=self._save_group)
                self.pending = PendingSave(path, future, needed)
                return
            dcp.save(state, checkpoint_id=path)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            raise_storage_error(e, path, needed)
            raise
        finish_sharded_save(self, path)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Mark a background save complete as soon as its write has ended (each rank looks at its own)."""
        if self.pending is not None and self.pending.future.done():
            self.finish_pending_save()

    def finish_pending_save(self) -> None:
        """Wait for the save in flight, if any; then mark it complete (rank 0) and remove the checkpoints it
        replaces. A write that failed raises here, and its directory stays unmarked."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        try:
            pending.future.result()
        except BaseException as e:
            raise_storage_error(e, pending.path, pending.needed_bytes)
            raise
        if self.is_global_zero:
            mark_complete(pending.path)
        for path in pending.removals:
            super().remove_checkpoint(path)

    def remove_checkpoint(self, filepath) -> None:
        if self.pending is not None:
            self.pending.removals.append(Path(filepath))  # keep it until the save that replaces it is complete
            return
        super().remove_checkpoint(filepath)

    def teardown(self) -> None:
        self.finish_pending_save()  # the last save is on disk, and marked, before the process ends
        if self._save_group is not None:
            torch.distributed.destroy_process_group(self._save_group)
            self._save_group = None
        super().teardown()


class MarkedFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy (FSDP1) whose sharded checkpoint directories get the completion marker."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if self._state_dict_type != "sharded":
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))
        begin_sharded_save(self, path)
        super().save_checkpoint(checkpoint, path, storage_options)
        finish_sharded_save(self, path)


def begin_sharded_save(strategy: Strategy, path: Path) -> None:
    """Before any rank writes: rank 0 removes the marker of an earlier save into the same directory (a resumed
    run saving its step again) and a file of that name, and creates the directory."""
    if strategy.is_global_zero:
        try:
            if path.is_file() or path.is_symlink():
                path.unlink()
            if (path / COMPLETE).exists():
                (path / COMPLETE).unlink()
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise_storage_error(e, path, 0)
            raise
    strategy.barrier("sharded save begins")


def finish_sharded_save(strategy: Strategy, path: Path) -> None:
    """After every rank's shard and the metadata are written: rank 0 writes the marker, last."""
    strategy.barrier("sharded save written")
    if strategy.is_global_zero:
        mark_complete(path)


def raise_storage_error(exc: BaseException, path: Path, needed_bytes: int) -> None:
    """Raise a full disk or a read-only directory as one line (a StorageError); return for anything else.
    DCP collects every rank's error, with its traceback, in the `failures` of its CheckpointException."""
    failures = getattr(exc, "failures", None) or {}
    for cause in [exc, *(f[0] if isinstance(f, tuple) else f for f in failures.values())]:
        if (error := storage_error(cause, path, needed_bytes)) is not None:
            raise error from exc


# --- building the model under a strategy -----------------------------------------------------------------
def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's `blocks` (models/contract.py): the unit of sharding and of recomputation."""
    return list(model.blocks)


def block_types(module: nn.Module) -> set[type[nn.Module]]:
    """Classes of the repeated blocks of the module's model, found on a meta-device build (FSDP1 wraps these)."""
    from ..models.registry import family

    with torch.device("meta"):
        model = family(module.spec.arch).model(module.model_config)
    return {type(block) for block in repeated_blocks(model)}


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations in backward. Non-reentrant checkpointing accepts any inputs and
    outputs (a KV state, an offset), and overriding `forward` on the instance keeps parameter names unchanged,
    unlike a wrapper module."""
    for block in repeated_blocks(model):
        block.forward = functools.partial(_checkpointed, block.forward)


def _checkpointed(forward: Callable, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def build_for_strategy(
    factory: Callable[[Any], nn.Module], config: Any, strategy: Strategy | None, activation_checkpointing: bool
) -> tuple[nn.Module, set[str]]:
    """The model for this strategy, and the names of its parameters without weight decay (read before any
    wrapping replaces the parameter objects). Under FSDP2 the model is sharded here; DDP, FSDP1 and DeepSpeed
    wrap it themselves after configure_model."""
    if isinstance(strategy, FSDP2Strategy):
        return _build_fsdp2(factory, config, strategy, activation_checkpointing)
    model = factory(config)
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        _init_under_zero3(model)
    no_decay = no_weight_decay_names(model)
    if activation_checkpointing:
        checkpoint_blocks(model)
    return model, no_decay


def _build_fsdp2(factory, config, strategy: FSDP2Strategy, activation_checkpointing: bool):
    """Meta-device build, `fully_shard` on each block and then the root, storage for the local shards only.
    The initial weights equal an unsharded build's with the same seed: rank 0 builds the full model on CPU
    (drawing from the RNG exactly as DDP's rank 0 would) and broadcasts it shard by shard. That costs rank 0
    host memory for one full copy (XL: 29 GB in fp32) once, at start-up."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    full = factory(config).state_dict() if strategy.global_rank == 0 else {}
    with torch.device("meta"):
        model = factory(config)
    no_decay = no_weight_decay_names(model)
    if activation_checkpointing:
        checkpoint_blocks(model)
    precision = str(strategy.precision_plugin.precision)
    # bf16-mixed: fp32 shards at rest, gathered and computed in bf16, gradients reduced in fp32.
    policy = MixedPrecisionPolicy()
    if precision == "bf16-mixed":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    reshard = strategy.sharding != "grad_op"
    for block in repeated_blocks(model):
        fully_shard(block, mesh=strategy.shard_mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mesh=strategy.shard_mesh, reshard_after_forward=reshard, mp_policy=policy)
    # Blocks return their KV state as views; states are never changed in place, so FSDP2's warning about
    # in-place ops on views returned by a sharded module does not apply.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    model.to_empty(device=strategy.root_device)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # init_weights recomputes buffers that the state dict does not hold; its random draws are overwritten
        # below and must not move the RNG away from an unsharded run's.
        warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
        model.init_weights()
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model, no_decay


def _init_under_zero3(model: nn.Module) -> None:
    """ZeRO-3 partitions each parameter as soon as its module is built, so the model's own initialisation in
    __init__ touched empty partitions; gather everything once and initialise again on rank 0."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        model.init_weights()


def named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The model's parameters under their unwrapped names (FSDP1 inserts `_fsdp_wrapped_module.`)."""
    for name, p in model.named_parameters():
        for prefix in WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        yield name, p


def replicas_of_sharded_grads(trainer) -> int | None:
    """How many ranks hold each shard of a gradient when gradients are sharded plain tensors (FSDP1 with
    use_orig_params): the world size divided by the shard group. None when gradients are whole or DTensors."""
    strategy = trainer.strategy
    if not isinstance(strategy, FSDPStrategy) or trainer.world_size == 1:
        return None
    return trainer.num_nodes if str(strategy.sharding_strategy).endswith("HYBRID_SHARD") else 1


def all_reduce_squares(squares: Tensor, trainer) -> Tensor:
    """Sum of per-rank squared norms over the ranks, each shard counted once (see replicas_of_sharded_grads)."""
    replicas = replicas_of_sharded_grads(trainer)
    if replicas is None:
        return squares
    squares = squares.to(trainer.strategy.root_device)
    torch.distributed.all_reduce(squares)
    return squares / replicas
