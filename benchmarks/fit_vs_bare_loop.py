"""The tiny job's steady-state training tokens/s through Lightning and the LanguageModelModule, against a bare
PyTorch loop training the same model on the same batches.

The bare loop is what any training loop must do: forward, cross-entropy over the full logits, backward,
gradient clipping at 1.0, an AdamW step (the tiny job's settings and parameter groups) and the warmup-cosine
schedule. The Lightning rows run `Trainer.fit` with the tiny job's trainer settings (gradient clipping,
`log_every_n_steps` 10, a CSV logger) over an in-memory list of the same batches:
- "fit": the module as configured by default (training metrics on logged steps only; the loss chunked only for
  batches of more than 2^24 logits, so not here);
- "fit, full logits, metrics every step": `loss_chunk_size=None` and `log_every_n_steps=1`, which is what
  every step cost before the loss was chunked and the metrics were limited to logged steps.
Steady state: the time between the end of step `--warmup` and the end of the last step, in process CPU
time (one thread: the compute itself, which other processes on a busy machine do not inflate). The modes
alternate round by round; the ratios are to the bare loop. Run from the repository root:

    python -m benchmarks.fit_vs_bare_loop [--rounds 3] [--steps 40] [--warmup 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from benchmarks.common import markdown_table
from lctrain.models import build_model
from lctrain.training.module import LanguageModelModule
from lctrain.training.optimizers import WarmupCosine, no_weight_decay_names, parameter_groups

VOCAB, SEQ_LEN, BATCH = 257, 256, 16  # the tiny job: byte-level data, configs/tiny.yaml
OPTIMIZER = dict(lr=0.003, betas=(0.9, 0.95), weight_decay=0.1)
SCHEDULE = dict(warmup_steps=50, min_lr_ratio=0.1)


def batches(n: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (n, BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row[:, :-1], "targets": row[:, 1:]} for row in ids]


def bare_loop(data: list[dict[str, torch.Tensor]], warmup: int) -> float:
    """Seconds per step after `warmup` steps of the plain loop."""
    torch.manual_seed(0)
    model = build_model("lswt", "debug", vocab_size=VOCAB)
    params = parameter_groups(model.named_parameters(), no_weight_decay_names(model))
    optimizer = torch.optim.AdamW(params, **OPTIMIZER)
    schedule = WarmupCosine(optimizer, total_steps=len(data), **SCHEDULE)
    for i, batch in enumerate(data):
        if i == warmup:
            start = time.process_time()
        logits = model(batch["input_ids"]).logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.process_time() - start) / (len(data) - warmup)


class _StepClock(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = time.process_time()
        self.end = time.process_time()


class _Data(L.LightningDataModule):
    def __init__(self, data):
        super().__init__()
        self.data = data

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.data, batch_size=None)


def lightning_fit(data, warmup: int, log_every: int, chunk: int | None, run_dir: str) -> float:
    """Seconds per step after `warmup` steps of Trainer.fit over the module."""
    torch.manual_seed(0)
    module = LanguageModelModule(
        "lswt", "debug", vocab_size=VOCAB, loss_chunk_size=chunk,
        optimizer=lambda p: torch.optim.AdamW(p, **OPTIMIZER), scheduler=lambda o: WarmupCosine(o, **SCHEDULE),
    )  # fmt: skip
    clock = _StepClock(warmup)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=len(data), gradient_clip_val=1.0, log_every_n_steps=log_every,
        logger=CSVLogger(run_dir), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[clock], default_root_dir=run_dir,
    )  # fmt: skip
    trainer.fit(module, datamodule=_Data(data))
    return (clock.end - clock.start) / (len(data) - warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of every mode")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per round")
    parser.add_argument("--warmup", type=int, default=10, help="steps before the clock starts")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Lightning's hints about workers and the missing validation loop
    data = batches(args.steps)
    modes = {
        "bare PyTorch loop": lambda d: bare_loop(data, args.warmup),
        "fit": lambda d: lightning_fit(data, args.warmup, 10, 1024, d),
        "fit, full logits, metrics every step": lambda d: lightning_fit(data, args.warmup, 1, None, d),
    }
    totals = dict.fromkeys(modes, 0.0)
    with tempfile.TemporaryDirectory() as run_dir:
        for _ in range(args.rounds):
            for name, run in modes.items():
                totals[name] += run(run_dir)
    tokens = BATCH * SEQ_LEN
    base = tokens * args.rounds / totals["bare PyTorch loop"]
    rows = []
    for name, total in totals.items():
        rate = tokens * args.rounds / total
        rows.append([name, f"{1000 * total / args.rounds:.1f}", f"{rate:,.0f}", f"{rate / base:.3f}x"])
    device = f"CPU, {args.threads} thread(s), torch {torch.__version__}"
    print(f"LSWT debug, {BATCH} x {SEQ_LEN} tokens, vocab {VOCAB}; {device}\n")
    print(markdown_table(["loop", "ms/step", "tokens/s", "vs bare loop"], rows))


if __name__ == "__main__":
    main()
