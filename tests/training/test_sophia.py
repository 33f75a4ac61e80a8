"""SophiaG and its Gauss-Newton-Bartlett Hessian refresh: the update rule, the estimator, the refresh
inside training (gradient accumulation, two real DDP ranks) (docs/architectures.md)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lctrain.training.module import LanguageModelModule
from lctrain.training.sophia import SophiaG, gauss_newton_bartlett


def test_update_follows_the_clipped_rule_and_moves_no_coordinate_by_more_than_lr():
    """p - lr * sign(m) * min(|m| / (rho h + eps), 1), checked element by element in float64."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50, generator=g, dtype=torch.float64))
    start = p.detach().clone()
    opt = SophiaG([p], lr=0.1, betas=(0.5, 0.9), rho=0.3, weight_decay=0.0)
    opt.update_hessian([100 * torch.rand(50, generator=g, dtype=torch.float64) * torch.tensor([0.0, 1.0]).repeat(25)])
    p.grad = torch.randn(50, generator=g, dtype=torch.float64)
    opt.step()
    h = opt.state[p]["hessian"]
    for i in range(50):
        m = 0.5 * p.grad[i].item()
        ratio = min(abs(m) / (0.3 * h[i].item() + 1e-15), 1.0)
        expected = start[i].item() - 0.1 * (1 if m > 0 else -1) * ratio
        assert p[i].item() == pytest.approx(expected, abs=1e-15)
    step = (p.detach() - start).abs()
    assert step.max() <= 0.1 + 1e-15
    torch.testing.assert_close(step[0::2], torch.full((25,), 0.1, dtype=torch.float64))  # h = 0: at the clip
    assert (step[1::2] < 0.099).any()  # a large enough h keeps some steps below it


def test_weight_decay_is_decoupled():
    p = torch.nn.Parameter(torch.full((3,), 2.0))
    opt = SophiaG([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 2.0 * (1 - 0.1 * 0.5)))


def linear_softmax_case(n_tokens=32, vocab=33, seed=1):
    """Logits z = W x for one token x repeated N times: a case with a closed-form Gauss-Newton diagonal."""
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(torch.randn(vocab, 4, generator=g, dtype=torch.float64))
    x = torch.randn(4, generator=g, dtype=torch.float64)
    logits = (W @ x).expand(1, n_tokens, vocab)  # (1, N, V)
    return W, x, logits, torch.ones(1, n_tokens, dtype=torch.bool)


def test_gauss_newton_bartlett_is_the_squared_sampled_gradient_over_n():
    """G_ij = sum_t (p_i - [y_t = i]) x_j for the labels y the estimator samples; estimate = G^2 / N."""
    W, x, logits, mask = linear_softmax_case()
    labels = torch.multinomial(logits[0].detach().softmax(-1), 1, generator=torch.Generator().manual_seed(7))[:, 0]
    estimate = gauss_newton_bartlett(logits, mask, [W], generator=torch.Generator().manual_seed(7))[0]
    p = logits[0, 0].detach().softmax(-1)
    expected = torch.zeros_like(W)
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            G = sum((p[i] - float(y == i)) * x[j] for y in labels.tolist())
            expected[i, j] = G**2 / len(labels)
    torch.testing.assert_close(estimate, expected.float(), rtol=1e-5, atol=1e-7)


def test_gauss_newton_bartlett_averages_to_the_gauss_newton_diagonal():
    """For z = W x the Gauss-Newton diagonal of the mean CE is p_i (1 - p_i) x_j^2. A single estimate's
    total over W has relative spread ~sqrt(2/(V-1)) = 0.25, so 100 draws average within 10% (4 sigma)."""
    W, x, logits, mask = linear_softmax_case()
    p = logits[0, 0].detach().softmax(-1)
    exact = ((p * (1 - p))[:, None] * x[None, :] ** 2).sum()
    g = torch.Generator().manual_seed(3)
    totals = [gauss_newton_bartlett(logits, mask, [W], generator=g)[0].sum() for _ in range(100)]
    assert torch.stack(totals).mean().item() == pytest.approx(exact.item(), rel=0.1)


def test_the_estimate_ignores_masked_positions_and_leaves_gradients_alone():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 7)
    x = torch.randn(2, 5, 6)
    targets = torch.randint(0, 7, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False

    def loss_and_grads(refresh: bool):
        logits = layer(x)
        if refresh:
            estimate = gauss_newton_bartlett(logits, mask, list(layer.parameters()))
            assert layer.weight.grad is None  # autograd.grad: nothing accumulated
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        grads = [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad(set_to_none=True)
        return grads, (estimate if refresh else None)

    plain, _ = loss_and_grads(False)
    with_refresh, estimate = loss_and_grads(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, with_refresh))
    # only the 8 unmasked positions count: a masked position's logits do not enter the estimate
    with torch.no_grad():
        x[1, 3:] += 100.0
    torch.manual_seed(5)
    a = gauss_newton_bartlett(layer(x), mask, list(layer.parameters()))
    with torch.no_grad():
        x[1, 3:] -= 200.0
    torch.manual_seed(5)
    b = gauss_newton_bartlett(layer(x), mask, list(layer.parameters()))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


# --- the refresh inside training ---------------------------------------------------------------------
class CountingSophia(SophiaG):
    """SophiaG that records, at every Hessian refresh, how many optimizer steps it has taken."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.n_steps, self.refresh_steps = 0, []

    def update_hessian(self, estimates):
        self.refresh_steps.append(self.n_steps)
        super().update_hessian(estimates)

    def step(self, closure=None):
        self.n_steps += 1
        return super().step(closure)


class RandomBatches(L.LightningDataModule):
    """Random (B, T) token batches, different on every rank."""

    def __init__(self, n_batches=16, batch_size=2, seq_len=12, vocab=64):
        super().__init__()
        self.n_batches, self.batch_size, self.seq_len, self.vocab = n_batches, batch_size, seq_len, vocab

    def train_dataloader(self):
        g = torch.Generator().manual_seed(100 + self.trainer.global_rank)
        ids = torch.randint(0, self.vocab, (self.n_batches, self.batch_size, self.seq_len + 1), generator=g)
        batches = [{"input_ids": b[:, :-1], "targets": b[:, 1:]} for b in ids]
        return torch.utils.data.DataLoader(batches, batch_size=None)


def sophia_module(**optimizer_args):
    torch.manual_seed(0)
    return LanguageModelModule(
        "lswt",
        "debug",
        vocab_size=64,
        optimizer=lambda params: CountingSophia(params, lr=1e-3, **optimizer_args),
        scheduler=None,
    )


def quiet_trainer(tmp_path, **kwargs):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_training_refreshes_the_hessian_every_k_steps_under_gradient_accumulation(tmp_path):
    """§5.22: the Hessian update is called (steps 0, 3, 6 for k = 3), once per optimizer step, and
    after it every parameter's Hessian EMA is non-zero."""
    lm = sophia_module(hessian_interval=3)
    quiet_trainer(tmp_path, devices=1, max_steps=7, accumulate_grad_batches=2).fit(lm, datamodule=RandomBatches())
    optimizer = lm.optimizers(use_pl_optimizer=False)
    assert optimizer.refresh_steps == [0, 3, 6]
    for name, p in lm.model.named_parameters():
        assert optimizer.state[p]["hessian"].abs().sum() > 0, name


class _SaveSophiaState(L.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        optimizer = pl_module.optimizers(use_pl_optimizer=False)
        hessian = [optimizer.state[p]["hessian"].clone() for p in pl_module.model.parameters()]
        params = [p.detach().clone() for p in pl_module.model.parameters()]
        torch.save({"hessian": hessian, "params": params}, self.path / f"rank{trainer.global_rank}.pt")


def test_two_ddp_ranks_share_one_hessian_and_stay_in_sync(tmp_path, port, monkeypatch):
    """With ddp_fork on 2 CPU ranks, different data per rank and 2 accumulation slots, the all-reduced
    estimate gives both ranks the same Hessian EMA and the same parameters."""
    monkeypatch.setenv("MASTER_PORT", str(port))
    lm = sophia_module(hessian_interval=2)
    run = quiet_trainer(
        tmp_path, devices=2, strategy="ddp_fork", max_steps=3, accumulate_grad_batches=2,
        callbacks=[_SaveSophiaState(tmp_path)],
    )  # fmt: skip
    run.fit(lm, datamodule=RandomBatches(n_batches=8))
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(h.abs().sum() > 0 for h in rank0["hessian"])
    for a, b in zip(rank0["hessian"] + rank0["params"], rank1["hessian"] + rank1["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
