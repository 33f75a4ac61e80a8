"""Throughput and MFU: the FLOP count per family (one config counted by hand), the GPU peak table, and the
tokens/s and MFU the progress line logs."""

from __future__ import annotations

import csv
import types

import pytest
import torch

from lctrain.cluster.planner import Layout, format_plan, plan_memory
from lctrain.models.flops import flops_per_token, peak_flops
from lctrain.models.registry import build_model, config_for
from lctrain.training.cli import fit
from lctrain.training.progress import ProgressLine
from tests.helpers import quick_fit_args


def test_lswt_debug_flops_counted_by_hand():
    """LSWT debug (vocab 512, d_vocab 64, d_model 64, 2 layers, 4 heads, d_ff 192, biases) on rows of 128."""
    embed, input_proj, layer_norm = 512 * 64, 64 * 64, 2 * 64
    attention = 4 * (64 * 64 + 64)  # query, key, value, out with biases
    swiglu = (64 * 384 + 384) + (192 * 64 + 64)  # up (gate and value together), down
    block = layer_norm + attention + layer_norm + swiglu
    output_proj = 64 * 64
    n = embed + input_proj + layer_norm + 2 * block + layer_norm + output_proj  # the tied embedding counts once
    assert n == 149_632
    attention_scores = 12 * 2 * 64 * 128  # 12 * layers * d_model * keys
    assert flops_per_token("lswt", config_for("lswt", "debug"), 128) == 6 * n + attention_scores == 1_094_400


def test_registers_add_keys_not_matmul_weights():
    plain = flops_per_token("lswt", config_for("lswt", "debug"), 128)
    with_registers = flops_per_token("lswt", config_for("lswt", "debug", n_registers=16), 128)
    assert with_registers - plain == 12 * 2 * 64 * 16


def test_an_untied_input_embedding_is_a_lookup():
    """Untying adds a V x D head but the embedding becomes a lookup: the same FLOPs, V*D more parameters."""
    tied, untied = (build_model("seqcond", "debug", tie_weights=t) for t in (True, False))
    extra = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert extra == tied.config.vocab_size * tied.config.d_model
    assert flops_per_token("seqcond", untied.config, 64) == flops_per_token("seqcond", tied.config, 64)


def test_the_condenser_scan_grows_with_its_chunk():
    short, long = (config_for("seqcond", "debug", chunk_size=c) for c in (16, 32))
    K, H, M = short.memory_heads, short.channels_per_head, short.num_thetas
    condensers = short.n_layers - len(short.attention_layers)
    difference = flops_per_token("seqcond", long, 64) - flops_per_token("seqcond", short, 64)
    assert difference == 6 * condensers * 16 * K * (2 * H * M + 1) > 0


def test_moe_counts_only_the_routed_experts():
    every, one = (config_for("serriform", "debug", num_experts=4, top_k_experts=k) for k in (4, 1))
    model = build_model("serriform", "debug", num_experts=4)
    experts = sum(p.numel() for name, p in model.named_parameters() if ".moe." in name and "router" not in name)
    assert flops_per_token("serriform", every, 64) - flops_per_token("serriform", one, 64) == 6 * experts * 3 // 4


def test_an_unknown_arch_is_named():
    with pytest.raises(ValueError, match="no FLOP count for arch 'gpt'"):
        flops_per_token("gpt", None, 8)


@pytest.mark.parametrize(
    "name, peak",
    [("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", None)],
)
def test_the_peak_table(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops("cuda:0") == peak
    assert peak_flops("cpu") is None


class _Logger:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))


def test_mfu_is_the_per_device_rate_times_flops_over_the_peak():
    line = ProgressLine(show="never")
    logger = _Logger()
    trainer = types.SimpleNamespace(world_size=4, loggers=[logger], global_step=20)
    line.reset_counters(now=100.0, step=10)
    line.tokens, line.flops, line.peak = 8_000_000, (1024, 3e9), 1e15
    line.measure_throughput(trainer, now=104.0)  # 2M tokens/s in total, 0.5M per device
    expected = {"perf/tokens_per_s": 2e6, "perf/tokens_per_s_per_device": 5e5, "perf/mfu": 5e5 * 3e9 / 1e15}
    assert logger.logged == [(20, pytest.approx(expected))]
    line.peak = None  # a CPU: no MFU
    line.measure_throughput(trainer, now=104.0 + 4.0)
    assert "perf/mfu" not in logger.logged[-1][1]


def test_a_run_logs_tokens_per_second_without_mfu_on_cpu(tmp_path, builtin_data):
    run = tmp_path / "run"
    args = ("--progress.show", "never", "--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "true")
    cli = fit(quick_fit_args(run, builtin_data, *args, steps=4))
    bar = cli.trainer.progress_bar_callback.get_metrics(cli.trainer, cli.model)
    assert "tok/s" in bar and "mfu" not in bar
    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/tokens_per_s")]
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(float(r["perf/tokens_per_s"]) == float(r["perf/tokens_per_s_per_device"]) > 0 for r in rows)
    assert "perf/mfu" not in rows[0] or not rows[0]["perf/mfu"]


def test_the_plan_prints_flops_per_token():
    layout = Layout(strategy="single", micro_batch=2, seq_len=128)
    text = format_plan(plan_memory("lswt", "debug", config_for("lswt", "debug"), layout))
    assert "compute: 1.09 MFLOPs per token, forward and backward" in text  # 1,094,400 (counted above)
    assert "; 280 MFLOPs per optimizer step" in text  # 2 x 128 tokens
