"""The memory planner: what fits where, its numbers per strategy, the dry run, and its activation estimate
against the peak memory measured on CPU (torch's allocator accounting, benchmarks/activation_memory.py)."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.activation_memory import estimated_activation_peak, measured_activation_peak
from lctrain.cluster.planner import TEMPLATE_SIGNAL_LEAD_S, GiB, Layout, check_fits, plan_memory
from lctrain.models.registry import config_for
from lctrain.training.cli import fit, run_entry_point
from tests.helpers import REPO

XL_ON_ONE_NODE = Layout(
    strategy="fsdp2", precision="bf16-mixed", activation_checkpointing=True, micro_batch=4, seq_len=2048,
    accumulation=8, nodes=1, gpus_per_node=8, gpu_memory_gib=80,
)  # fmt: skip


def plan(size: str, layout: Layout):
    return plan_memory("lswt", size, config_for("lswt", size), layout)


def test_xl_fits_on_one_node_of_eight_80gb_gpus_when_sharded():
    xl = plan("xl", XL_ON_ONE_NODE)
    assert 7.2e9 < xl.n_params < 7.4e9
    assert xl.fits and xl.total < 60 * GiB
    check_fits(xl)  # does not raise


def test_xxl_on_one_80gb_gpu_without_sharding_is_refused_with_what_to_change():
    one_gpu = dataclasses.replace(XL_ON_ONE_NODE, strategy="ddp", gpus_per_node=1)
    xxl = plan("xxl", one_gpu)
    assert not xxl.fits and xxl.weights + xxl.gradients + xxl.optimizer > 150 * GiB  # 13B x 16 bytes
    with pytest.raises(ValueError, match=r"cluster.gpu_memory_gb=80; shard it with parallelism.strategy=fsdp2"):
        check_fits(xxl)


def test_sharding_divides_weights_gradients_and_optimizer_states_by_the_ranks_that_share_them():
    ddp = plan("small", dataclasses.replace(XL_ON_ONE_NODE, strategy="ddp", precision="32-true"))
    full = plan("small", dataclasses.replace(XL_ON_ONE_NODE, precision="32-true"))
    hybrid = plan("small", dataclasses.replace(full.layout, sharding="hybrid", nodes=4))
    n = ddp.n_params
    assert ddp.weights == 4 * n and ddp.optimizer == 8 * n and ddp.gradients == 2 * 4 * n  # DDP buckets: 2 copies
    assert full.weights == 4 * n / 8 and full.gradients == 4 * n / 8 and full.optimizer == 8 * n / 8
    assert hybrid.weights == full.weights  # sharded within a node of 8, replicated across the 4 nodes
    assert dataclasses.replace(full.layout, nodes=4).tokens_per_step == 4 * full.layout.tokens_per_step


def test_zero_stages_and_offload_move_what_the_deepspeed_config_says():
    base = dataclasses.replace(XL_ON_ONE_NODE, strategy="deepspeed")
    stages = [plan("xl", dataclasses.replace(base, zero_stage=s)) for s in (1, 2, 3)]
    assert stages[0].optimizer == stages[1].optimizer == stages[2].optimizer  # sharded from stage 1
    assert stages[0].gradients > stages[1].gradients == stages[2].gradients  # from stage 2
    assert stages[1].weights > stages[2].weights  # from stage 3
    offload = plan("xl", dataclasses.replace(base, zero_stage=3, offload_optimizer=True, offload_parameters=True))
    assert offload.optimizer == 0 and offload.weights == 0 and any("CPU memory" in n for n in offload.notes)


def test_checkpointing_keeps_far_fewer_activations_at_scale():
    xl = plan("xl", XL_ON_ONE_NODE).activations
    assert xl.with_checkpointing < 0.25 * xl.without_checkpointing


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("size,batch,seq_len", [("debug", 8, 256), ("tiny", 1, 128)])
def test_activation_estimate_is_within_25_percent_of_the_measured_cpu_peak(size, batch, seq_len, checkpointing):
    """Tolerance 25%; benchmarks/activation_memory.py shows ratios of 0.91-1.01 here and at larger batches."""
    measured = measured_activation_peak("lswt", size, batch, seq_len, checkpointing)
    estimate = estimated_activation_peak("lswt", size, batch, seq_len, checkpointing)
    assert estimate == pytest.approx(measured, rel=0.25), (estimate / 2**20, measured / 2**20)


def test_dry_run_prints_the_plan_for_a_cluster_shape(capsys):
    args = ["--config", "configs/xl.yaml", "--dry_run", "--cluster.nodes", "4", "--cluster.gpus_per_node", "8"]
    assert run_entry_point(fit, args) == 0
    out = capsys.readouterr().out
    assert "plan: lswt xl, 7.30B parameters" in out and "32 data-parallel rank(s): 1,048,576 tokens" in out
    for row in ("weights", "gradients", "optimizer states", "activations, checkpointing on", "verdict: fits"):
        assert row in out


def test_dry_run_refuses_a_layout_that_does_not_fit_with_one_error_line(capsys):
    args = ["--config", "configs/xxl.yaml", "--dry_run", "--cluster.nodes", "1", "--cluster.gpus_per_node", "1",
            "--parallelism.strategy", "ddp"]  # fmt: skip
    assert run_entry_point(fit, args) == 2
    captured = capsys.readouterr()
    assert "verdict: does not fit" in captured.out
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: lswt xxl needs") and "GiB per GPU" in errors[0]


def xxl_dry_run(capsys, *extra: str) -> str:
    args = ["--config", "configs/xxl.yaml", "--dry_run", "--cluster.nodes", "2", "--cluster.gpus_per_node", "8"]
    assert run_entry_point(fit, [*args, *extra]) == 0
    return capsys.readouterr().out


def test_the_plan_warns_when_sigusr1_leaves_less_than_twice_a_save_before_the_time_limit(capsys, monkeypatch):
    """XXL: 12.94B parameters x (4 bytes of fp32 weights + 8 of Adam moments) = 155 GB, 77.6 GB per node on
    2 nodes, so ~78 s at 1 GB/s: 60 s of lead is too short, 600 s is plenty."""
    monkeypatch.delenv("SBATCH_SIGNAL", raising=False)
    short = xxl_dry_run(capsys, "--cluster.signal_lead_s", "60")
    assert "checkpoint: 155.3 GB, 77.6 GB written per node: ~78 s at 1 GB/s" in short
    warning = [line for line in short.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "SIGUSR1 comes 60 s before the time limit" in warning[0]
    assert "--signal=SIGUSR1@160" in warning[0]  # 2 x 77.6 s, rounded up to ten seconds
    assert "warning:" not in xxl_dry_run(capsys, "--cluster.signal_lead_s", "600")
    assert "warning:" not in xxl_dry_run(capsys, "--cluster.signal_lead_s", "60", "--cluster.storage_gb_per_s", "4")
    monkeypatch.setenv("SBATCH_SIGNAL", "B:USR1@30")  # sbatch's own variable for --signal, when set
    assert "SIGUSR1 comes 30 s before" in xxl_dry_run(capsys)


def test_a_full_state_dict_is_written_by_one_node():
    sharded = plan("xl", dataclasses.replace(XL_ON_ONE_NODE, nodes=4))
    full = plan("xl", dataclasses.replace(sharded.layout, state_dict="full"))
    assert sharded.checkpoint_bytes == full.checkpoint_bytes == sharded.n_params * (4 + 2 * 4)
    assert sharded.checkpoint_bytes_per_node == full.checkpoint_bytes_per_node / 4
    assert full.save_seconds == pytest.approx(full.checkpoint_bytes / 1e9)


def test_the_slurm_templates_send_sigusr1_with_the_lead_time_the_planner_assumes():
    for template in sorted((REPO / "slurm").glob("*.sbatch")):
        assert f"#SBATCH --signal=SIGUSR1@{TEMPLATE_SIGNAL_LEAD_S}\n" in template.read_text(), template.name
