"""Random-number state in checkpoints, so that a resumed run draws the numbers the uninterrupted run drew.

Dropout masks and MoE router noise come from the global generators (Python's `random`, NumPy's, torch's
CPU generator and one CUDA generator per device) and a model may also keep a `torch.Generator` of its own
as an attribute. `capture` reads all of them into a dict that `torch.load(weights_only=True)` accepts, and
`restore` sets them back.

Restoring a checkpoint's state once, when it is loaded, would not be enough. Between two training batches
other code draws from the same global generators: a DataLoader draws a seed whenever an iteration starts,
evaluation starts its own loader, and a resumed run starts its loaders at other moments than the
uninterrupted run did (it also skips the evaluation that followed the saved step). So training batches
draw from a stream of their own: `TrainingRandomState` swaps it in when a training batch starts and swaps
it out when the batch ends, putting back the state everything else was using. What a batch draws then
depends only on the seed and on the batches trained before it, and that stream is what a checkpoint keeps,
for every rank.
"""

from __future__ import annotations

import logging
import random
import zlib
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

log = logging.getLogger(__name__)

RandomState = dict[str, Any]  # {"python", "numpy", "torch", "cuda", "generators"}: see `capture`
CHECKPOINT_KEY = "random_state"


def module_generators(module: nn.Module | None) -> dict[str, torch.Generator]:
    """Every `torch.Generator` that `module` or one of its submodules keeps as an attribute, by qualified
    name ("blocks.0.moe.generator"): a model that draws from a generator of its own resumes exactly too."""
    if module is None:
        return {}
    found = {}
    for prefix, submodule in module.named_modules():
        for name, value in vars(submodule).items():
            if isinstance(value, torch.Generator):
                found[f"{prefix}.{name}" if prefix else name] = value
    return found


def _cuda_in_use() -> bool:
    """CUDA has been started in this process; reading its generators would otherwise start it."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def capture(module: nn.Module | None = None) -> RandomState:
    """The state of every generator this process draws from: the global ones and those `module` owns.
    Only tensors, numbers, tuples, lists and dicts, so a checkpoint holding it loads with weights_only."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),  # (version, 625 ints, gauss_next)
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),  # (624,) MT19937 words
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())] if _cuda_in_use() else [],
        "generators": {name: g.get_state() for name, g in module_generators(module).items()},
    }


def restore(state: RandomState, module: nn.Module | None = None) -> None:
    """Set every generator `state` holds. CUDA devices beyond those present and generators the module no
    longer has are left out; a state taken before CUDA started leaves the CUDA generators as they are."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    saved = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": saved["bit_generator"],
            "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
            "has_gauss": saved["has_gauss"],
            "gauss": saved["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    generators = module_generators(module)
    for name, generator_state in state["generators"].items():
        if name in generators:
            generators[name].set_state(generator_state)


def seeded(seed: int, module: nn.Module | None = None) -> RandomState:
    """The state every generator would have after being seeded with `seed` (a generator the module owns
    with `seed` plus a number drawn from its name, so no two of them repeat each other's draws); the
    generators themselves are left as they were."""
    current = capture(module)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # the CPU generator and every CUDA one
    for name, generator in module_generators(module).items():
        generator.manual_seed((seed + zlib.crc32(name.encode())) % 2**63)
    state = capture(module)
    restore(current, module)
    return state


def derived_seed(state: RandomState, rank: int) -> int:
    """A seed for `rank` that depends only on a saved state: the first draw of its torch CPU generator,
    plus the rank (used when a run resumes on another number of ranks than it saved)."""
    generator = torch.Generator()
    generator.set_state(state["torch"])
    return int(torch.randint(2**62, (), generator=generator)) + rank


class TrainingRandomState(L.Callback):
    """Training batches draw from a random stream of their own, which checkpoints keep for every rank.

    When a training batch starts, the stream's state is set and the state everything else uses is put
    aside; when the batch ends, the stream's state is read and the other state put back. A fresh run seeds
    the stream from one draw of the global torch generator at its first batch (so it follows the run's seed
    and repeats none of the draws made outside training). A checkpoint holds `{"world_size", "ranks"}`
    under `random_state`, one state per global rank; a run resumed on the same number of ranks gives each
    rank its own. On another number of ranks, rank r's stream is seeded from the saved state of rank 0
    plus r, with a warning: the run goes on reproducibly, though no longer as the uninterrupted one would.
    """

    def __init__(self) -> None:
        super().__init__()
        self.training: RandomState | None = None  # the stream, between two training batches
        self.outside: RandomState | None = None  # everything else's state, while a training batch runs

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.training is None:
            self.training = seeded(int(torch.randint(2**62, ())), pl_module)
        self.outside = capture(pl_module)
        restore(self.training, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.training = capture(pl_module)
        restore(self.outside, pl_module)
        self.outside = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # A save inside a training batch (another callback's batch end) finds the stream in the generators.
        local = capture(pl_module) if self.outside is not None else self.training
        world = trainer.world_size
        ranks = [local]
        if world > 1:  # every rank saves: each takes part in the gather
            ranks = [None] * world
            torch.distributed.all_gather_object(ranks, local)
        if all(state is not None for state in ranks):  # no training batch has run yet: nothing to keep
            checkpoint[CHECKPOINT_KEY] = {"world_size": world, "ranks": ranks}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            log.info("the checkpoint holds no random-number state: training continues on a freshly seeded stream")
            return
        world, rank = trainer.world_size, trainer.global_rank
        if saved["world_size"] == world:
            self.training = saved["ranks"][rank]
            return
        rank_zero_warn(
            f"the checkpoint holds the random-number state of {saved['world_size']} ranks but this run has "
            f"{world}: each rank's stream is seeded from the saved state of rank 0 plus its rank, so dropout "
            "and router noise no longer repeat those of an uninterrupted run"
        )
        self.training = seeded(derived_seed(saved["ranks"][0], rank), pl_module)
