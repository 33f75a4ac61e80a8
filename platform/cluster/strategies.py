"""Parallel training strategies chosen in YAML (the `parallelism:` section), and how each one builds the model.

docs/design.md: DDP; FSDP2 (`fully_shard` per block) through Lightning's
ModelParallelStrategy, the sharded path that also runs on CPU with gloo; Lightning's FSDPStrategy (FSDP1) and
DeepSpeed ZeRO 1/2/3 for GPU clusters. FSDP1 and DeepSpeed refuse a CPU accelerator, so that is checked here,
before anything starts, with one line that says what to use instead. Activation checkpointing is applied the
same way under every strategy: each block's forward runs under non-reentrant `torch.utils.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from torch import Tensor, nn

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
    deepspeed_config: str = "configs/deepspeed/zero3.json"
    """deepspeed: JSON config (ZeRO stage, offload, buckets), relative to the repository root or absolute;
    configs/deepspeed/ has stage 1, 2, 3 and 3 with CPU offload."""

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
        return FSDP2Strategy(sharding=parallelism.sharding, state_dict=parallelism.state_dict)
    if name == "fsdp":
        return FSDPStrategy(
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


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy used for data parallelism only. Its device mesh is
    (data_parallel, tensor_parallel) = (world, 1) for "full" and "grad_op" sharding, and
    (nodes, devices per node) for "hybrid", where fully_shard reads the 2-D mesh as (replicate, shard).
    The LanguageModelModule applies `fully_shard` in configure_model (`build_for_strategy`)."""

    def __init__(self, sharding: Sharding = "full", state_dict: Literal["sharded", "full"] = "sharded", **kwargs):
        super().__init__(save_distributed_checkpoint=state_dict == "sharded", **kwargs)
        self.sharding = sharding

    def setup_environment(self) -> None:
        if self.sharding == "hybrid":
            self._data_parallel_size, self._tensor_parallel_size = self.num_nodes, self.num_processes
        else:
            self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    @property
    def shard_mesh(self):
        return self.device_mesh if self.sharding == "hybrid" else self.device_mesh["data_parallel"]


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
