"""benchmarks/passkey.py end to end in its --quick mode: prepare, a short fit, evaluation with and without
SelfExtend, the printed table."""

from __future__ import annotations

import math

import pytest

from benchmarks import passkey


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("passkey")
    args = ["--quick", "--examples", "1", "--run_dir", str(root / "run"), "--data_root", str(root / "data")]
    args += ["--method", "2,254", "--method", "4,16", "--output", str(root / "table.md")]
    results = passkey.main(args)
    return results, (root / "table.md").read_text()


def test_the_table_has_a_row_per_method_and_a_column_per_length(quick_run):
    results, table = quick_run
    assert "| method | max N: (L_pre-W+⌊W/G⌋)·G | largest distance at 512 | 1x = 256 | 2x = 512 |" in table
    for label, limit in [("vanilla", "-"), ("SelfExtend G=2 W=254", "256"), ("SelfExtend G=4 W=16", "972")]:
        assert f"| {label} | {limit} |" in table
    assert sorted(results) == sorted(
        (m, n) for m in ("vanilla", "SelfExtend G=2 W=254", "SelfExtend G=4 W=16") for n in (256, 512)
    )
    assert all(len(cell.exact) == len(passkey.DEFAULT_DEPTHS) for cell in results.values())


def test_selfextend_inside_its_window_scores_like_plain_attention(quick_run):
    """At 1x every distance (at most 254) keeps its true value under W = 254, so the scores must match."""
    results, _ = quick_run
    vanilla, extended = results["vanilla", 256], results["SelfExtend G=2 W=254", 256]
    assert extended.exact == vanilla.exact
    assert extended.answer_nll == pytest.approx(vanilla.answer_nll, rel=1e-5)


def test_the_short_fit_already_makes_the_key_likelier_than_a_uniform_byte(quick_run):
    """The untrained model scores ln 257 = 5.55 nats per key token (5.55 after 5 steps); 30 steps gave 4.92."""
    results, _ = quick_run
    assert results["vanilla", 256].answer_nll < math.log(257) - 0.3
