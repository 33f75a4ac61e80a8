"""The chunked output head and cross-entropy (losses.chunked_token_losses): values and gradients against a
float64 loop, the accuracies against the logits-based metrics, every family's head, and training steps
that give the same loss, metrics and gradients with and without chunks."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lctrain.models.registry import build_model
from lctrain.training.losses import answer_weighted_ce, head_losses, token_nll, token_weights
from lctrain.training.metrics import AnswerExactMatch, HitRate, RowExactMatch, TokenAccuracy
from lctrain.training.module import LanguageModelModule

IGNORE = -100


def loop_nll(logits, targets):
    """Per-token -log softmax(logits)[target] in float64, one token at a time (0 where ignored)."""
    rows = []
    for lg, t in zip(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)):
        rows.append(torch.zeros((), dtype=torch.float64) if t == IGNORE else torch.logsumexp(lg, 0) - lg[t])
    return torch.stack(rows)


def head_batch(seed=0, B=3, T=7, D=6, V=13):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :2] = IGNORE
    targets[2, -3:] = IGNORE
    return hidden, weight, targets


def linear_head(weight):
    return lambda x: x @ weight.T  # (n, D) -> (n, V)


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 5, 21, 64])
def test_chunked_loss_and_its_gradients_equal_the_float64_loop(chunk_size):
    hidden, weight, targets = head_batch()
    token_w = torch.linspace(0.5, 2.0, targets.numel(), dtype=torch.float64)  # any weights
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = head_losses(linear_head(w), h, targets, token_w, IGNORE, chunk_size, min_logits=0)
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    nll = loop_nll(h_ref @ w_ref.T, targets)
    want = (nll * token_w).sum()
    torch.testing.assert_close(got.nll, nll.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(got.loss, want, rtol=0, atol=1e-12)
    (3.0 * got.loss).backward()  # the upstream gradient scales what forward computed
    (3.0 * want).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=0, atol=1e-12)


def test_a_frozen_head_or_constant_hidden_states_get_no_gradient():
    hidden, weight, targets = head_batch()
    weights = token_weights(targets, IGNORE)
    h, w = hidden.clone().requires_grad_(), weight.clone()  # frozen head
    head_losses(linear_head(w), h, targets, weights, IGNORE, 4, min_logits=0).loss.backward()
    h_ref = hidden.clone().requires_grad_()
    (loop_nll(h_ref @ weight.T, targets) * weights).sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=0, atol=1e-12)
    w = weight.clone().requires_grad_()
    head_losses(linear_head(w), hidden, targets, weights, IGNORE, 4, min_logits=0).loss.backward()  # constant
    w_ref = weight.clone().requires_grad_()
    (loop_nll(hidden @ w_ref.T, targets) * weights).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=0, atol=1e-12)


def test_chunks_hold_one_chunk_of_logits_at_a_time():
    """Autograd never holds a batch's logits: each chunk's own graph (freed before the next chunk) saves only
    the head's inputs, the chunk's (16, D) hidden states and the (V, D) weight, since the chunk's logits
    gradient is formed directly from its softmax; unchunked, autograd saves the whole batch's (128, V)."""
    hidden, weight, targets = head_batch(B=4, T=32, D=8, V=512)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    weights = token_weights(targets, IGNORE)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        head_losses(linear_head(w), h, targets, weights, IGNORE, 16, min_logits=0)
    assert max(saved) == 512 * 8  # the weight; no (16, 512) logits
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        head_losses(linear_head(w), h, targets, weights, IGNORE, None)
    assert max(saved) >= 128 * 512  # unchunked: the whole batch's logits
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        head_losses(linear_head(w), h, targets, weights, IGNORE, 16, min_logits=128 * 512)
    assert max(saved) >= 128 * 512  # as small as min_logits: one piece


@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("grad", [True, False])
def test_hits_from_chunks_equal_the_logits_metrics(top_k, grad):
    hidden, weight, targets = head_batch(seed=1)
    logits = hidden @ weight.T
    weights = token_weights(targets, IGNORE)
    h = hidden.clone().requires_grad_(grad)
    losses = head_losses(linear_head(weight), h, targets, weights, IGNORE, 4, top_k, min_logits=0)
    valid = targets != IGNORE
    for hits, k in ((losses.top1, 1), (losses.topk, top_k)):
        old, new = TokenAccuracy(k, IGNORE), HitRate()
        old.update(logits, targets)
        new.update(hits.view_as(valid), valid)
        assert new.compute().item() == old.compute().item()
        assert 0 < new.total.item() == valid.sum().item()
    mask = torch.zeros_like(valid)
    mask[:, 3:5] = True
    answers = targets.clone()
    answers[1, 3:5] = logits[1, 3:5].argmax(-1)  # one row fully right
    again = head_losses(linear_head(weight), h, answers, weights, IGNORE, 4, top_k, min_logits=0)
    old, new = AnswerExactMatch(), RowExactMatch()
    old.update(logits, answers, mask)
    new.update(again.top1.view_as(valid), mask)
    assert new.compute().item() == old.compute().item() > 0
    assert head_losses(linear_head(weight), h, targets, weights, IGNORE, 4, min_logits=0).top1 is None


def test_token_weights_give_the_mean_and_the_answer_weighted_ce():
    hidden, weight, targets = head_batch(seed=2)
    mask = torch.zeros_like(targets, dtype=torch.bool)
    mask[:, 4:6] = True
    logits = hidden @ weight.T
    nll = loop_nll(logits, targets)
    for w in (1.0, 4.0):
        got = (token_weights(targets, IGNORE, mask, w) * nll).sum()
        torch.testing.assert_close(got, answer_weighted_ce(logits, targets, mask, w, IGNORE), rtol=0, atol=1e-12)
    nll_sum, n = token_nll(logits, targets, IGNORE)
    torch.testing.assert_close((token_weights(targets, IGNORE) * nll).sum(), nll_sum / n, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ["lswt", "seqcond", "serriform"])
def test_every_family_output_head_gives_its_forward_logits(arch):
    torch.manual_seed(0)
    model = build_model(arch, "debug", vocab_size=50).double().eval()  # eval: no router noise
    ids = torch.randint(0, 50, (2, 9))
    full = model(ids)
    lean = model(ids, return_hidden=True, return_logits=False)
    assert lean.logits is None
    torch.testing.assert_close(model.output_head(lean.hidden), full.logits, rtol=0, atol=0)
    targets = torch.roll(ids, -1, 1)
    losses = head_losses(model.output_head, lean.hidden, targets, token_weights(targets), IGNORE, 4, min_logits=0)
    torch.testing.assert_close(losses.nll, loop_nll(full.logits, targets), rtol=0, atol=1e-12)


class _Batches(L.LightningDataModule):
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 64, (3, 11), generator=g)
        targets = ids[:, 1:].clone()
        targets[0, -3:] = IGNORE
        mask = torch.zeros_like(targets, dtype=torch.bool)
        mask[:, 4:6] = True
        batch = {"input_ids": ids[:, :-1], "targets": targets, "answer_mask": mask}
        return torch.utils.data.DataLoader([batch], batch_size=None)


class _Record(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss, self.metrics = outputs["loss"].item(), dict(trainer.callback_metrics)


def fit_one_step(tmp_path, arch, chunk_size):
    torch.manual_seed(0)
    import lctrain.training.losses as losses

    losses.SMALL_LOGITS, small = 0, losses.SMALL_LOGITS  # chunk even these few logits
    try:
        return _fit_one_step(tmp_path, arch, chunk_size)
    finally:
        losses.SMALL_LOGITS = small


def _fit_one_step(tmp_path, arch, chunk_size):
    lm = LanguageModelModule(
        arch, "debug", vocab_size=64, scheduler=None, answer_loss_weight=3.0, accuracy_top_k=3,
        loss_chunk_size=chunk_size,
    )  # fmt: skip
    record = _Record()
    L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[record], log_every_n_steps=1,
    ).fit(lm, datamodule=_Batches())  # fmt: skip
    return record


@pytest.mark.parametrize("arch", ["lswt", "seqcond", "serriform"])
def test_a_training_step_is_the_same_with_and_without_chunks(tmp_path, arch):
    """Answer-weighted loss, ce, perplexity, accuracies and every gradient: chunks of 7 (not dividing 3 x 10)
    against the full logits."""
    full, chunked = fit_one_step(tmp_path / "full", arch, None), fit_one_step(tmp_path / "chunked", arch, 7)
    assert chunked.loss == pytest.approx(full.loss, rel=1e-6)
    assert abs(chunked.loss - full.metrics["train/ce"].item()) > 1e-3  # the trained loss weighs answers 3x
    for name in ("train/ce", "train/ppl", "train/acc", "train/top3_acc", "train/answer_acc"):
        assert chunked.metrics[name].item() == pytest.approx(full.metrics[name].item(), rel=1e-6), name
    assert full.grads.keys() == chunked.grads.keys()
    for name, grad in full.grads.items():
        torch.testing.assert_close(chunked.grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_training_skips_the_accuracies_between_logged_steps(tmp_path, monkeypatch):
    """log_every_n_steps=2 over 3 steps: the training accuracies are computed on step 2 only."""
    updates = []
    original = HitRate.update
    monkeypatch.setattr(HitRate, "update", lambda self, *a: (updates.append(1), original(self, *a))[1])
    torch.manual_seed(0)
    lm = LanguageModelModule("lswt", "debug", vocab_size=64, scheduler=None)
    L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, log_every_n_steps=2, num_sanity_val_steps=0,
    ).fit(lm, datamodule=_ThreeBatches())  # fmt: skip
    assert len(updates) == 2  # acc and top5_acc, once


class _ThreeBatches(L.LightningDataModule):
    def train_dataloader(self):
        ids = torch.randint(0, 64, (3, 2, 11), generator=torch.Generator().manual_seed(0))
        batches = [{"input_ids": i[:, :-1], "targets": i[:, 1:]} for i in ids]
        return torch.utils.data.DataLoader(batches, batch_size=None)


def test_a_negative_chunk_size_is_refused():
    with pytest.raises(ValueError, match="model.loss_chunk_size=-1"):
        LanguageModelModule(loss_chunk_size=-1, vocab_size=64)
