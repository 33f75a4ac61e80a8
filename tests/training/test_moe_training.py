"""Training a mixture-of-experts model: aux losses in the loss, expert-usage monitoring on one process
and on two ranks, the synced validation balance loss (docs/architectures.md).

SerriformNet `debug` (3 MoE layers, 4 experts, top-2) without router noise, so routing depends only on
the weights and the tokens. The runs use float64, where a different batch shape cannot flip a near-tie
in the top-k choice, and learning rate 0, so every run routes every step with the same weights.
"""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch

from lctrain.training.callbacks import ExpertUsageMonitor, moe_layer_key
from lctrain.training.loggers import CSVLogger
from lctrain.training.losses import token_nll
from lctrain.training.module import LanguageModelModule
from tests.helpers import free_port

V, T, ROWS = 61, 16, 8  # ROWS training rows: two optimizer steps of ROWS // 2 rows over all ranks


def serriform_module(**kwargs) -> LanguageModelModule:
    torch.manual_seed(0)
    module = LanguageModelModule("serriform", "debug", {"router_noise": 0.0}, vocab_size=V, **kwargs)
    module.configure_model()
    return module


def batch_of(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}


# --- the balance loss is part of the training loss ------------------------------------------------


class FirstStep(L.Callback):
    """Keeps the loss of the first training step and the router gradient it produced."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.router_grad = pl_module.model.blocks[0].moe.router.weight.grad.clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss = outputs["loss"].detach()


def first_step(module: LanguageModelModule, batch: dict[str, torch.Tensor]) -> FirstStep:
    seen = FirstStep()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        callbacks=[seen],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader([batch], batch_size=None))
    return seen


def test_weighted_aux_losses_are_added_to_the_cross_entropy_and_a_zero_weight_removes_them():
    """Through the Trainer: the step's loss minus the cross-entropy is the weighted sum of the aux losses
    (float32, tolerance 1e-6), and with zero weights the loss is the cross-entropy and the router's
    gradient changes."""
    batch = batch_of(torch.randint(0, V, (3, T + 1), generator=torch.Generator().manual_seed(1)))
    weighted = serriform_module(aux_loss_weights={"moe_balance": 0.5, "router_entropy": 0.25})
    with torch.no_grad():  # debug has no dropout and router noise is off: train mode routes the same
        out = weighted.model(batch["input_ids"])
    nll, n = token_nll(out.logits, batch["targets"])
    ce, balance, entropy = nll / n, out.aux_losses["moe_balance"], out.aux_losses["router_entropy"]
    assert balance > 1 and entropy > 0  # away from their minima, so a missing term would show

    with_aux = first_step(weighted, batch)
    torch.testing.assert_close(with_aux.loss - ce, 0.5 * balance + 0.25 * entropy, rtol=0, atol=1e-6)

    without = first_step(serriform_module(aux_loss_weights={"moe_balance": 0.0}), batch)
    torch.testing.assert_close(without.loss, ce, rtol=0, atol=1e-6)
    assert not torch.allclose(with_aux.router_grad, without.router_grad, rtol=1e-2, atol=0)


# --- expert usage: one process and two ranks ------------------------------------------------------


def test_layer_keys_name_the_block_that_holds_the_layer():
    assert moe_layer_key("blocks.3.moe") == "layer3"
    assert moe_layer_key("moe") == "moe"


def test_the_monitor_rejects_a_negative_interval():
    with pytest.raises(ValueError, match="expert_usage.every_n_steps=-1 must be >= 0"):
        ExpertUsageMonitor(every_n_steps=-1)


def routed_fractions(module: LanguageModelModule, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per MoE layer, the share of routed slots per expert of one training forward over `ids`."""
    model = module.model.train()
    with torch.no_grad():
        model(ids[:, :-1])
    fractions = {}
    for name, layer in model.moe_layers():
        fractions[moe_layer_key(name)] = layer.tokens_per_expert / layer.tokens_per_expert.sum()
        layer.reset_counters()
    return fractions


class RankRows(L.LightningDataModule):
    """Global batch g is rows g·n ... (g+1)·n; rank r of W reads its r-th share in order, as the platform's
    data layouts do, so one process and two ranks train on the same rows at every step."""

    def __init__(self, ids: torch.Tensor, val_ids: torch.Tensor):
        super().__init__()
        self.ids, self.val_ids = ids, val_ids

    def shares(self, ids: torch.Tensor, rows_per_batch: int) -> torch.utils.data.DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        per_rank = rows_per_batch // world
        starts = range(rank * per_rank, len(ids), rows_per_batch)
        return torch.utils.data.DataLoader([batch_of(ids[s : s + per_rank]) for s in starts], batch_size=None)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self.shares(self.ids, ROWS // 2)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self.shares(self.val_ids, len(self.val_ids))


def frozen_module(dtype: torch.dtype = torch.float64) -> LanguageModelModule:
    module = serriform_module(optimizer=lambda params: torch.optim.SGD(params, lr=0.0), scheduler=None)
    return module.to(dtype)


def fit_and_read_csv(ids, val_ids, run_dir, devices: int = 1, accelerator="cpu", precision="64-true") -> list[dict]:
    """One epoch, so two optimizer steps, then validation."""
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy="ddp_fork" if devices > 1 else "auto",
        precision=precision,
        max_epochs=1,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # RankRows shares the rows out itself
        callbacks=[ExpertUsageMonitor(every_n_steps=1)],
        logger=CSVLogger(save_dir=str(run_dir)),
        log_every_n_steps=50,  # the monitor writes every step whatever this is
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # float32 weights: the precision plugin makes them float64 ("64-true") or autocasts them ("bf16-mixed")
    trainer.fit(frozen_module(torch.float32), datamodule=RankRows(ids, val_ids))
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def training_rows() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randint(0, V, (ROWS, T + 1), generator=g), torch.randint(0, V, (4, T + 1), generator=g)


@pytest.fixture(scope="module")
def usage_runs(tmp_path_factory):
    """The same rows trained by one process and by two `ddp_fork` ranks: (ids, val_ids, one, two)."""
    ids, val_ids = training_rows()
    root = tmp_path_factory.mktemp("usage")
    one = fit_and_read_csv(ids, val_ids, root / "one", devices=1)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MASTER_PORT", str(free_port()))
        two = fit_and_read_csv(ids, val_ids, root / "two", devices=2)
    return ids, val_ids, one, two


def usage_by_step(rows: list[dict]) -> dict[int, dict[str, float]]:
    usage = {}
    for row in rows:
        values = {k: float(v) for k, v in row.items() if k.startswith("moe/") and v}
        if values:
            usage[int(row["step"])] = values
    return usage


def expected_usage(ids: torch.Tensor) -> dict[int, dict[str, float]]:
    """The logged values one training forward per step gives, computed on the CPU without Lightning."""
    reference, usage = frozen_module(), {}
    for step, rows in ((0, ids[: ROWS // 2]), (1, ids[ROWS // 2 :])):
        fractions = routed_fractions(reference, rows)
        assert sorted(fractions) == ["layer0", "layer1", "layer2"]
        usage[step] = {}
        for layer, fraction_E in fractions.items():
            usage[step][f"moe/{layer}/min_fraction"] = fraction_E.min().item()
            usage[step][f"moe/{layer}/max_fraction"] = fraction_E.max().item()
            usage[step][f"moe/{layer}/imbalance"] = (fraction_E.max() / fraction_E.mean()).item()
    return usage


def assert_usage_equal(logged: dict[int, dict[str, float]], expected: dict[int, dict[str, float]]) -> None:
    """The same steps (every step, as every_n_steps=1 asks) and keys; values to 1e-9 (float64 counts,
    float32 CSV values)."""
    assert sorted(logged) == sorted(expected)
    for step, values in expected.items():
        assert logged[step] == pytest.approx(values, rel=1e-9), step


def test_two_ranks_log_the_fractions_of_one_process_over_all_tokens(usage_runs):
    ids, _, one, two = usage_runs
    expected = expected_usage(ids)
    assert_usage_equal(usage_by_step(one), expected)
    assert_usage_equal(usage_by_step(two), expected)
    reference = frozen_module()
    for rows in (ids[: ROWS // 2], ids[ROWS // 2 :]):
        expected = routed_fractions(reference, rows)
        # rank 0's rows alone route differently, so the agreement above needs the sum over ranks
        rank0 = routed_fractions(reference, rows[: len(rows) // 2])
        assert any(not torch.allclose(rank0[k], expected[k]) for k in expected)


def test_validation_balance_loss_is_the_token_weighted_mean_over_both_ranks(usage_runs):
    _, val_ids, _, two = usage_runs
    model = frozen_module().model.eval()
    with torch.no_grad():  # rank r validates rows 2r, 2r + 1 as one batch; equal sizes, so a plain mean
        per_rank = [model(val_ids[2 * r : 2 * r + 2, :-1]).aux_losses["moe_balance"].item() for r in (0, 1)]
    assert per_rank[0] != pytest.approx(per_rank[1], rel=1e-6)
    logged = [float(r["val/moe_balance"]) for r in two if r.get("val/moe_balance")]
    assert logged == [pytest.approx(sum(per_rank) / 2, rel=1e-6)]  # logged in float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_monitor_logs_the_cpu_fractions_and_bf16_mixed_training_logs_usage(tmp_path):
    """float64 on the GPU routes as float64 on the CPU; bf16-mixed may route differently, so only the
    keys and the range of its values are checked."""
    ids, val_ids = training_rows()
    rows = fit_and_read_csv(ids, val_ids, tmp_path / "fp64", accelerator="gpu")
    assert_usage_equal(usage_by_step(rows), expected_usage(ids))
    usage = usage_by_step(fit_and_read_csv(ids, val_ids, tmp_path / "bf16", accelerator="gpu", precision="bf16-mixed"))
    assert sorted(usage) == [0, 1]
    assert all(1 <= v <= 4 for step in usage.values() for k, v in step.items() if k.endswith("imbalance"))
