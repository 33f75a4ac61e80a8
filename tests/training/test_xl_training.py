"""Transformer-XL training of LSWT on the "streams" layout: the carried cache per accumulation slot,
row resets, evaluation with the cache, and exact resume from a checkpoint (docs/architectures.md).

`StreamsData` is a small stand-in for the platform's streams layout with the same batch contract:
`input_ids`, `targets` (B, T), `reset` (B,); row r of micro-batch n continues row r of micro-batch
n - A (A = accumulate_grad_batches), so each slot s = n % A owns B streams of its own.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lctrain.training.module import LanguageModelModule

B, T, VOCAB = 2, 8, 37
MODEL = dict(vocab_size=VOCAB, d_vocab=20, d_model=24, n_heads=3, d_ff=40, n_layers=2, n_registers=2)


class StreamLoader:
    """Micro-batch n reads segment n // A of the streams of slot n % A; its position is resumable."""

    def __init__(self, tokens: torch.Tensor, accumulate: int, resets: dict[int, list[int]]):
        self.tokens, self.accumulate, self.resets = tokens, accumulate, resets  # tokens (A*B, L)
        self.consumed = 0

    def __len__(self) -> int:
        return (self.tokens.shape[1] - 1) // T * self.accumulate

    def batch(self, n: int) -> dict[str, torch.Tensor]:
        slot, segment = n % self.accumulate, n // self.accumulate
        rows = self.tokens[slot * B : (slot + 1) * B, segment * T : (segment + 1) * T + 1]  # (B, T + 1)
        reset = torch.zeros(B, dtype=torch.bool)
        reset[self.resets.get(segment, [])] = True
        return {"input_ids": rows[:, :-1], "targets": rows[:, 1:], "reset": reset | (segment == 0)}

    def __iter__(self):
        while self.consumed < len(self):
            self.consumed += 1
            yield self.batch(self.consumed - 1)
        self.consumed = 0

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = state["consumed"]


class StreamsData(L.LightningDataModule):
    def __init__(self, tokens, accumulate=1, resets=None, val_tokens=None):
        super().__init__()
        self.tokens, self.accumulate, self.resets, self.val_tokens = tokens, accumulate, resets or {}, val_tokens

    def train_dataloader(self):
        return StreamLoader(self.tokens, self.accumulate, self.resets)

    def val_dataloader(self):
        return StreamLoader(self.val_tokens, 1, {})


def stream_tokens(n_streams, n_segments, seed=0):
    return torch.randint(0, VOCAB, (n_streams, n_segments * T + 1), generator=torch.Generator().manual_seed(seed))


def trainer(tmp_path, steps, accumulate=1, **kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})


class RecordLosses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def module(lr=0.0, **kwargs):
    torch.manual_seed(0)
    optimizer = lambda params: torch.optim.SGD(params, lr=lr) if lr == 0.0 else torch.optim.AdamW(params, lr=lr)  # noqa: E731
    return LanguageModelModule(
        "lswt", "debug", model_config=MODEL, optimizer=optimizer, scheduler=None, carry_state=True, **kwargs
    )


def segment_ce(model, stream, start, segment):
    """CE of `segment` of one stream under one long forward that begins at segment `start`."""
    ids = stream[start * T : (segment + 1) * T + 1].unsqueeze(0)
    logits = model(ids[:, :-1]).logits[:, (segment - start) * T :]  # (1, T, V)
    return F.cross_entropy(logits.flatten(0, 1), ids[0, 1 + (segment - start) * T :], reduction="sum")


@pytest.mark.parametrize("accumulate", [1, 2])
def test_xl_training_over_several_steps_equals_one_long_forward(tmp_path, accumulate):
    """With frozen weights (lr 0) and a cache that keeps the whole past (cache_len 0), every micro-batch
    loss equals the loss of its segment inside one forward over the whole stream, float64, ≤1e-10. Row 1
    of slot 0 begins a new stream at segment 2: from there it equals a forward starting at segment 2."""
    tokens = stream_tokens(B * accumulate, n_segments=4)
    resets = {2: [1]}
    lm, record = module(), RecordLosses()
    trainer(tmp_path, steps=4, accumulate=accumulate, precision="64-true", callbacks=[record]).fit(
        lm, datamodule=StreamsData(tokens, accumulate, resets)
    )
    model = lm.model.eval()
    for n, loss in enumerate(record.losses):
        slot, segment = n % accumulate, n // accumulate
        total = 0.0
        for r in range(B):
            start = 2 if (r in resets[2] and segment >= 2) else 0
            total += segment_ce(model, tokens[slot * B + r], start, segment)
        # Lightning divides the logged step loss by the accumulation count: undo it
        torch.testing.assert_close(loss * accumulate, total / (B * T), rtol=0, atol=1e-10)
    assert len(lm._carried) == accumulate


def test_evaluation_carries_the_cache_across_batches_and_starts_each_run_afresh(tmp_path):
    """val/ce over 3 consecutive segments equals their mean CE inside one long forward (float64), twice."""
    val_tokens = stream_tokens(B, n_segments=3, seed=4)
    lm = module()
    data = StreamsData(stream_tokens(B, 2), val_tokens=val_tokens)
    run = trainer(tmp_path, steps=1, precision="64-true", limit_val_batches=None)
    first = run.validate(lm, datamodule=data, verbose=False)[0]["val/ce"]
    second = run.validate(lm, datamodule=data, verbose=False)[0]["val/ce"]
    model = lm.model.eval()
    expected = sum(segment_ce(model, val_tokens[r], 0, s) for r in range(B) for s in range(3)) / (3 * B * T)
    assert first == pytest.approx(expected.item(), abs=1e-10)
    assert second == pytest.approx(first, abs=1e-12)


def test_the_cache_in_a_checkpoint_makes_resume_exact(tmp_path):
    """6 AdamW steps with 2 accumulation slots equal 3 steps, a checkpoint, and 3 resumed steps; resuming
    with the carried cache removed from the checkpoint does not (so the cache is what makes it exact)."""
    tokens = stream_tokens(2 * B, n_segments=6, seed=2)
    data = lambda: StreamsData(tokens, accumulate=2)  # noqa: E731

    straight, record = module(lr=1e-2), RecordLosses()
    trainer(tmp_path / "a", steps=6, accumulate=2, callbacks=[record]).fit(straight, datamodule=data())

    first = module(lr=1e-2)
    run = trainer(tmp_path / "b", steps=3, accumulate=2)
    run.fit(first, datamodule=data())
    run.save_checkpoint(tmp_path / "step3.ckpt")
    checkpoint = torch.load(tmp_path / "step3.ckpt", weights_only=True)
    assert set(checkpoint["carried_state"]["ranks"][0]) == {"train:0", "train:1"}

    resumed, resumed_record = module(lr=1e-2), RecordLosses()
    trainer(tmp_path / "b", steps=6, accumulate=2, callbacks=[resumed_record]).fit(
        resumed, datamodule=data(), ckpt_path=tmp_path / "step3.ckpt"
    )
    assert torch.equal(torch.stack(resumed_record.losses), torch.stack(record.losses[6:]))
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name

    del checkpoint["carried_state"]
    torch.save(checkpoint, tmp_path / "no-cache.ckpt")
    stale, stale_record = module(lr=1e-2), RecordLosses()
    trainer(tmp_path / "c", steps=6, accumulate=2, callbacks=[stale_record]).fit(
        stale, datamodule=data(), ckpt_path=tmp_path / "no-cache.ckpt"
    )
    assert not torch.allclose(torch.stack(stale_record.losses), torch.stack(record.losses[6:]))
