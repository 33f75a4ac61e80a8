"""What a run shows while it trains: a plain-text progress line for output that goes to a file, and a bar that
counts optimizer steps for a terminal.

A SLURM job writes its output to a file, where a redrawn bar is unreadable and a block-buffered stream shows
nothing until the run ends; `ProgressLine` prints and flushes one line every few optimizer steps instead. It
also measures throughput, tokens/s in total and per device and the model FLOPs utilisation (MFU, on GPUs
with a known peak: models/flops.py), which go to the loggers and the bar whether or not the line is shown.
`StepProgressBar` counts optimizer steps against the run's total, so a resumed run reads `step 420/600`
rather than a batch index inside one of the epochs a step-limited run cycles through.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from ..models.flops import flops_per_token, peak_flops
from .callbacks import log_to_loggers

log = logging.getLogger(__name__)


def total_steps(trainer: L.Trainer) -> int | None:
    """The optimizer step at which the run stops: `max_steps`, or what `max_epochs` amounts to; None when
    the run has no end (max_epochs=-1 without max_steps)."""
    total = trainer.estimated_stepping_batches
    return int(total) if math.isfinite(total) and total > 0 else None


def format_count(value: float) -> str:
    """3 significant figures with a k/M/G suffix: 812, 5.3k, 12.4M."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def format_duration(seconds: float) -> str:
    """The two largest units: 45s, 1m32s, 2h05m, 3d04h."""
    seconds = round(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def memory_in_use(device: torch.device) -> str:
    """Peak CUDA memory allocated on a GPU (what bounds the batch size), else the process's resident memory."""
    if device.type == "cuda":
        used = torch.cuda.max_memory_allocated(device)
    else:
        try:
            with open("/proc/self/statm") as f:  # Linux: pages, the second field is the resident set
                used = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import resource  # elsewhere: the peak resident set (bytes on macOS, KiB on Linux)

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            used = peak if sys.platform == "darwin" else peak * 1024
    mib = used / 2**20
    return f"{mib:.0f} MiB" if mib < 10 * 1024 else f"{mib / 1024:.1f} GiB"


class ProgressLine(L.Callback):
    """One plain line of progress every `every_n_steps` optimizer steps, printed and flushed by global rank
    zero, for output that is not a terminal (a SLURM job's file):

        step 120/600 | loss 3.412 | 5.3k tok/s | ETA 1m32s | mem 512 MiB

    (with `| 1.3k tok/s/device` after tok/s on several devices and `| MFU 41.2%` on a GPU of known peak)

    and after each validation `val step 120 | loss 3.402 | ppl 30.03`. Each line also goes to the
    `lctrain.training.progress` logger, so a logging file handler receives it.

    loss: the mean training loss of the steps since the previous line. tok/s: input tokens of all ranks
    (rank zero's batch times the world size: ranks read equal batches) over the wall time since the
    previous line. ETA: the steps left at this attempt's average pace so far, validation included. mem: see
    `memory_in_use`. The loss stays on the device until a line is printed, so steps in between add no sync.
    MFU: tokens/s per device times the model's training FLOPs per token, over the device's peak bf16 FLOP/s.
    At every line (shown or not) `perf/tokens_per_s`, `perf/tokens_per_s_per_device` and `perf/mfu` go to
    the loggers, and the bar shows the rate and MFU.
    """

    def __init__(self, show: Literal["auto", "always", "never"] = "auto", every_n_steps: int | None = None):
        """
        Args:
            show: "auto": when standard output is not a terminal; "always"; "never". While the line is shown
                the command line turns Lightning's progress bar off unless `trainer.enable_progress_bar` is set.
            every_n_steps: Optimizer steps between two lines; None means `trainer.log_every_n_steps`.
        """
        super().__init__()
        if show not in ("auto", "always", "never"):
            raise ValueError(f"progress.show={show!r} is not one of: auto, always, never")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"progress.every_n_steps={every_n_steps} must be >= 1 (progress.show=never turns it off)")
        self.show, self.every_n_steps = show, every_n_steps
        self.flops: tuple[int, float | None] | None = None  # (row length, training FLOPs per token)
        self.peak: float | None = None  # the device's peak FLOP/s, when known
        self.reset_counters(time.monotonic(), 0)

    def is_active(self) -> bool:
        is_terminal = sys.stdout is not None and sys.stdout.isatty()
        return self.show == "always" or (self.show == "auto" and not is_terminal)

    def reset_counters(self, now: float, step: int) -> None:
        self.start_time, self.start_step = now, step  # of this attempt: the ETA's average pace
        self.last_time, self.last_step = now, step  # of the previous line: tok/s and the mean loss
        self.tokens = 0
        self.loss_sum: torch.Tensor | None = None
        self.throughput: dict[str, float] = {}  # the latest measurement, for the loggers and the bar

    def emit(self, line: str) -> None:
        print(line, flush=True)
        log.info(line)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.reset_counters(time.monotonic(), trainer.global_step)
        self.peak = peak_flops(pl_module.device)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        input_ids = batch.get("input_ids") if isinstance(batch, dict) else batch
        if isinstance(input_ids, torch.Tensor):
            self.tokens += input_ids.numel() * trainer.world_size
            self.count_flops(pl_module, input_ids.shape[-1])
        active = self.is_active()
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if active and isinstance(loss, torch.Tensor):  # divided by accumulate_grad_batches: micro-batches sum
            self.loss_sum = loss.detach() if self.loss_sum is None else self.loss_sum + loss.detach()
        every = self.every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        if step > self.last_step and step % every == 0:  # the last micro-batch of an optimizer step
            self.measure_throughput(trainer, time.monotonic())
            line = self.train_line(trainer, pl_module, step)  # also restarts the counters
            if active:
                self.emit(line)

    def count_flops(self, pl_module: L.LightningModule, seq_len: int) -> None:
        """FLOPs per token of the module's model at this row length, once per length (MFU needs them)."""
        if self.flops is not None and self.flops[0] == seq_len:
            return
        spec, config = getattr(pl_module, "spec", None), getattr(pl_module, "model_config", None)
        value = flops_per_token(spec.arch, config, seq_len) if spec is not None and config is not None else None
        self.flops = (seq_len, value)

    def measure_throughput(self, trainer: L.Trainer, now: float) -> None:
        """Tokens/s since the previous line, in total and per device, and MFU where the peak is known; logged."""
        if now <= self.last_time:
            return
        rate = self.tokens / (now - self.last_time)
        self.throughput = {"perf/tokens_per_s": rate, "perf/tokens_per_s_per_device": rate / trainer.world_size}
        flops = self.flops[1] if self.flops is not None else None
        if self.peak and flops:
            self.throughput["perf/mfu"] = rate / trainer.world_size * flops / self.peak
        log_to_loggers(trainer, self.throughput)

    def train_line(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> str:
        now = time.monotonic()
        total = total_steps(trainer)
        parts = [f"step {step}/{total}" if total else f"step {step}"]
        if self.loss_sum is not None:
            parts.append(f"loss {self.loss_sum.item() / (step - self.last_step):.3f}")
        if now > self.last_time:
            parts.append(f"{format_count(self.tokens / (now - self.last_time))} tok/s")
            if trainer.world_size > 1:
                parts.append(f"{format_count(self.tokens / trainer.world_size / (now - self.last_time))} tok/s/device")
        if "perf/mfu" in self.throughput:
            parts.append(f"MFU {100 * self.throughput['perf/mfu']:.1f}%")
        if total and step > self.start_step:
            pace = (now - self.start_time) / (step - self.start_step)  # seconds per step
            parts.append(f"ETA {format_duration(pace * max(total - step, 0))}")
        parts.append(f"mem {memory_in_use(pl_module.device)}")
        self.last_time, self.last_step, self.tokens, self.loss_sum = now, step, 0, None
        return " | ".join(parts)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not (trainer.is_global_zero and self.is_active()):
            return
        metrics = trainer.callback_metrics
        parts = [f"val step {trainer.global_step}"]
        if "val/loss" in metrics:
            parts.append(f"loss {float(metrics['val/loss']):.3f}")
        if "val/ppl" in metrics:
            parts.append(f"ppl {float(metrics['val/ppl']):.4g}")
        self.emit(" | ".join(parts))


class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar with optimizer steps as its counter: `step 420/600`, the total being the step at
    which the run stops (none for an endless run), the epoch in the postfix.

    Lightning's bars count batches inside the current epoch against `min(batches per epoch, max_steps -
    global_step)`, and its Rich bar (the default where rich is installed) is titled `Epoch e/max_epochs-1`.
    A step-limited run has max_epochs=-1 (`Epoch 5/-2`), after a resume the restored batch index runs past
    the remaining-steps total (`40/10`), and gradient accumulation counts micro-batches against optimizer
    steps. Here the rate and its time left count only the steps of this attempt.
    """

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(
            desc="step",
            unit="step",
            initial=self.trainer.global_step,
            total=total_steps(self.trainer),
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        """The counter runs across epochs; nothing to reset."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if step != bar.n and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # also redraws the bar

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # one run per run directory: no logger versions
        line = next((c for c in trainer.callbacks if isinstance(c, ProgressLine)), None)
        throughput = line.throughput if line is not None else {}
        if "perf/tokens_per_s" in throughput:
            metrics["tok/s"] = format_count(throughput["perf/tokens_per_s"])
        if "perf/mfu" in throughput:
            metrics["mfu"] = f"{100 * throughput['perf/mfu']:.1f}%"
        return {"epoch": trainer.current_epoch, **metrics}


def progress_bar_settings(
    enable_progress_bar: bool | None, callbacks: list[L.Callback], line: ProgressLine
) -> tuple[bool, list[L.Callback]]:
    """`trainer.enable_progress_bar` and the Trainer's callbacks. Unset, the bar is on unless the progress line
    is shown (a bar redrawn into a file is unreadable); a bar that is on is a StepProgressBar unless the
    callbacks already hold a progress bar."""
    from lightning.pytorch.callbacks.progress import ProgressBar

    enabled = not line.is_active() if enable_progress_bar is None else enable_progress_bar
    if enabled and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks = [*callbacks, StepProgressBar()]
    return enabled, callbacks
