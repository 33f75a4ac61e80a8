"""benchmarks/chunked_loss.py prints its table for every combination of its modes: with and without the
full-logits step (`--no-full`), with and without timing rounds (`--rounds 0`)."""

from __future__ import annotations

import sys

import pytest

from benchmarks import chunked_loss

ARGS = ["chunked_loss", "--model", "lswt=lswt:debug", "--batch", "1", "--seq", "64", "--chunk", "16"]


def table_rows(out: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| lswt |")]
    return {cells[2].strip(): [c.strip() for c in cells] for cells in rows}


@pytest.mark.parametrize("rounds", ["0", "1"])
@pytest.mark.parametrize("no_full", [False, True], ids=["with-full", "no-full"])
def test_the_table_has_a_row_per_loss_with_ratios_only_against_a_measured_full_step(
    monkeypatch, capsys, rounds, no_full
):
    monkeypatch.setattr(sys, "argv", [*ARGS, "--rounds", rounds] + (["--no-full"] if no_full else []))
    chunked_loss.main()
    rows = table_rows(capsys.readouterr().out)
    assert sorted(rows) == (["chunked 16"] if no_full else ["chunked 16", "full"])
    peak, own, rate = rows["chunked 16"][3:6]
    assert peak.endswith("GiB") == no_full and own.endswith("GiB") == no_full  # "GiB (0.9x)" with a full step
    assert (rate == "-") == (rounds == "0")
    if not no_full:
        ratio = float(peak.split("(")[1].rstrip("x)"))
        assert 0 < ratio < 1  # the chunked step holds less than the full one
        if rounds == "1":
            assert float(rate.split("(")[1].rstrip("x)")) > 0
