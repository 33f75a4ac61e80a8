"""The report of an evaluation: every file is written, the CSV and JSON files give back the input numbers, the
markdown tables show them as documented and link only to pictures that exist, and the plots draw the input data."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys

import pytest
from PIL import Image

from lctrain.evaluation.report import (
    parameter_count,
    perplexity_figure,
    position_figure,
    significant,
    write_atomic,
    write_report,
)
from lctrain.evaluation.results import Evaluation, LossByPosition, ModelResults, PerplexityByLength, RetrievalGrid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LENGTHS = [128, 256, 512, 1024]


def passkey(accuracy: list[list[float]]) -> RetrievalGrid:
    return RetrievalGrid("passkey", "length", [256, 512], "depth", [0.0, 0.5, 1.0], accuracy, examples=12)


def evaluation() -> Evaluation:
    """Three models: a plain one, the same with SelfExtend, and one measured on retrieval only."""
    plain = ModelResults(
        label="tiny",
        arch="lswt",
        n_params=133_456,
        trained_len=256,
        self_extend=None,
        perplexity=PerplexityByLength(LENGTHS, [3.1, 3.0, 3.05, 3.4], scored_tokens=4096, windows=8),
        position=LossByPosition([0, 1, 2, 4, 8], [1, 2, 4, 8, 16], [5.5, 4.25, 3.875, 3.5, 3.25], windows=8),
        retrieval={
            "passkey": passkey([[1.0, 0.5, 0.0], [0.75, 0.25, 1 / 3]]),
            "mqar": RetrievalGrid("mqar", "length", [128], "pairs", [4, 8], [[0.5, 0.125]], examples=8),
        },
        seconds=12.34,
    )
    extended = ModelResults(
        label="tiny G=4 W=64",
        arch="lswt",
        n_params=133_456,
        trained_len=256,
        self_extend="G=4 W=64",
        perplexity=PerplexityByLength(LENGTHS, [3.1, 3.0, 2.95, 2.9], scored_tokens=4096, windows=8),
        position=LossByPosition([0, 1, 2, 4, 8], [1, 2, 4, 8, 16], [5.5, 4.25, 3.75, 3.5, 3.0], windows=8),
        retrieval={"passkey": passkey([[1.0, 1.0, 1.0], [1.0, 0.75, 0.5]])},
        seconds=20.0,
    )
    retrieval_only = ModelResults(
        label="serriform | big",
        arch="serriform",
        n_params=12_345_678,
        trained_len=512,
        self_extend=None,
        retrieval={"passkey": passkey([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])},
        seconds=3.0,
    )
    settings = {"data": "data/tiny", "split": "val", "score_len": 64, "lengths": LENGTHS, "dtype": "float32"}
    return Evaluation([plain, extended, retrieval_only], settings)


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def table_rows(markdown: str, first_header_cell: str) -> list[list[str]]:
    """The rows of the markdown table whose header starts with `first_header_cell`, header included, as cells."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header_cell} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return [rows[0]] + rows[2:]  # without the alignment row


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    markdown = write_report(evaluation(), out)
    return out, markdown


def test_every_file_is_written_and_every_picture_is_a_png(report):
    out, markdown = report
    expected = {
        "report.md",
        "results.json",
        "perplexity.csv",
        "position.csv",
        "retrieval.csv",
        "perplexity.png",
        "position.png",
        "passkey-tiny.png",
        "mqar-tiny.png",
        "passkey-tiny-g-4-w-64.png",
        "passkey-serriform-big.png",
    }
    assert {p.name for p in out.iterdir()} == expected  # no temporary file left behind
    assert (out / "report.md").read_text() == markdown
    for name in expected:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == PNG_MAGIC
            with Image.open(out / name) as image:
                assert image.width > 0 and image.height > 0


def test_report_links_exactly_the_pictures_it_wrote(report):
    out, markdown = report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(links) == len(set(links))
    assert set(links) == {p.name for p in out.glob("*.png")}


def test_csv_files_give_back_the_input_numbers(report):
    out, _ = report
    models = evaluation().models
    perplexity = read_csv(out / "perplexity.csv")
    expected = [
        (m.label, n, nll, math.exp(nll), m.perplexity.scored_tokens)
        for m in models
        if m.perplexity is not None
        for n, nll in zip(m.perplexity.lengths, m.perplexity.nll)
    ]
    got = [
        (r["model"], int(r["length"]), float(r["nll"]), float(r["ppl"]), int(r["scored_tokens"])) for r in perplexity
    ]
    assert got == expected

    position = read_csv(out / "position.csv")
    expected = [
        (m.label, s, e, v) for m in models[:2] for s, e, v in zip(m.position.starts, m.position.ends, m.position.nll)
    ]
    assert [(r["model"], int(r["start"]), int(r["end"]), float(r["nll"])) for r in position] == expected

    retrieval = read_csv(out / "retrieval.csv")
    expected = [
        (m.label, task, g.row_name, row, g.column_name, column, g.accuracy[r][c], g.examples)
        for m in models
        for task, g in m.retrieval.items()
        for r, row in enumerate(g.rows)
        for c, column in enumerate(g.columns)
    ]
    got = [
        (
            r["model"],
            r["task"],
            r["row_name"],
            int(r["row"]),
            r["column_name"],
            float(r["column"]),
            float(r["accuracy"]),
            int(r["examples"]),
        )
        for r in retrieval
    ]
    assert got == expected
    assert len(got) == 6 + 2 + 6 + 6


def test_results_json_round_trips_to_the_same_numbers(report):
    out, _ = report
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(evaluation().to_dict()))
    loaded = json.loads((out / "results.json").read_text())
    assert loaded["models"][1]["perplexity"]["nll"] == [3.1, 3.0, 2.95, 2.9]
    assert loaded["models"][2]["perplexity"] is None
    assert loaded["settings"]["lengths"] == LENGTHS


def test_protocol_lists_every_setting(report):
    _, markdown = report
    for line in ["- data: data/tiny", "- split: val", "- score_len: 64", "- lengths: 128, 256, 512, 1024"]:
        assert line in markdown.splitlines()


def test_models_table_shows_sizes_lengths_and_self_extend(report):
    _, markdown = report
    assert table_rows(markdown, "model | arch") == [
        ["model", "arch", "SelfExtend", "parameters", "trained length", "seconds"],
        ["tiny", "lswt", "-", "133k", "256", "12.3"],
        ["tiny G=4 W=64", "lswt", "G=4 W=64", "133k", "256", "20.0"],
        ["serriform | big", "serriform", "-", "12.3M", "512", "3.0"],
    ]


def test_perplexity_table_has_three_significant_digits_and_lengths_in_trained_lengths(report):
    _, markdown = report
    # exp(3.1) = 22.198, exp(3.0) = 20.086, exp(3.05) = 21.115, exp(3.4) = 29.964, exp(2.95) = 19.106,
    # exp(2.9) = 18.174; the model without perplexity has no row.
    header = ["model", "128 (0.5x)", "256 (1x)", "512 (2x)", "1024 (4x)"]
    rows = table_rows(markdown.split("## Perplexity")[1], "model")
    assert rows == [header, ["tiny", "22.2", "20.1", "21.1", "30.0"], ["tiny G=4 W=64", "22.2", "20.1", "19.1", "18.2"]]


def test_position_table_columns_count_tokens_of_context(report):
    _, markdown = report
    rows = table_rows(markdown.split("## Loss by position")[1], "model")
    assert rows == [
        ["model", "1", "2", "3-4", "5-8", "9-16"],
        ["tiny", "5.500", "4.250", "3.875", "3.500", "3.250"],
        ["tiny G=4 W=64", "5.500", "4.250", "3.750", "3.500", "3.000"],
    ]


def test_retrieval_tables_show_accuracy_in_percent(report):
    _, markdown = report
    passkey_tiny = markdown.split("### passkey: tiny\n")[1]
    assert table_rows(passkey_tiny, "length \\ depth") == [
        ["length \\ depth", "0", "0.5", "1"],
        ["256", "100", "50", "0"],
        ["512", "75", "25", "33.3"],
    ]
    assert table_rows(markdown.split("### mqar: tiny\n")[1], "length \\ pairs") == [
        ["length \\ pairs", "4", "8"],
        ["128", "50", "12.5"],
    ]
    assert "### passkey: serriform | big" in markdown


def test_sections_without_results_are_left_out(tmp_path):
    bare = ModelResults(label="bare", arch="lswt", n_params=950, trained_len=None, self_extend=None)
    markdown = write_report(Evaluation([bare], {}), tmp_path)
    assert "## Models" in markdown and "| bare | lswt | - | 950 | - | 0.0 |" in markdown
    for absent in ["## Protocol", "## Perplexity", "## Loss by position", "## Retrieval", "!["]:
        assert absent not in markdown
    assert not list(tmp_path.glob("*.png"))
    assert read_csv(tmp_path / "perplexity.csv") == []


def test_perplexity_figure_draws_one_line_per_measured_model():
    models = evaluation().models
    figure = perplexity_figure(models)
    axes = figure.axes[0]
    lines = axes.get_lines()
    assert len(lines) == 2  # the retrieval-only model has no line
    for line, model in zip(lines, models[:2]):
        assert list(line.get_xdata()) == LENGTHS
        assert list(line.get_ydata()) == pytest.approx([math.exp(v) for v in model.perplexity.nll], rel=1e-12)
        assert line.get_marker() == "o"
    assert axes.get_xscale() == "log" and axes.get_yscale() == "log"
    assert list(axes.get_xticks()) == LENGTHS
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert labels == ["tiny (133k)", "tiny G=4 W=64 (133k)", "trained length 256"]  # both trained on 256: one mark


def test_trained_lengths_that_differ_are_marked_in_each_models_colour():
    from matplotlib.colors import to_rgba

    models = evaluation().models[:2]
    models[1].trained_len = 512
    axes = perplexity_figure(models).axes[0]
    marks = {segment[0][0]: tuple(c.get_color()[0]) for c in axes.collections for segment in c.get_segments()}
    lines = axes.get_lines()
    assert marks == {256: to_rgba(lines[0].get_color()), 512: to_rgba(lines[1].get_color())}
    assert lines[0].get_color() != lines[1].get_color()


def test_position_figure_draws_mean_loss_at_the_mean_context_of_each_bin():
    models = evaluation().models
    axes = position_figure(models).axes[0]
    lines = axes.get_lines()
    assert len(lines) == 2
    for line, model in zip(lines, models[:2]):
        assert list(line.get_xdata()) == [1.0, 2.0, 3.5, 6.5, 12.5]  # (start + 1 + end) / 2 tokens of context
        assert list(line.get_ydata()) == model.position.nll
    assert axes.get_xscale() == "log"


def test_number_formats():
    assert [significant(v) for v in [22.198, 9.996, 1234.5, 0.012345, 0.0, math.inf]] == [
        "22.2",
        "10.0",
        "1230",
        "0.0123",
        "0",
        "inf",
    ]
    assert [parameter_count(n) for n in [950, 133_456, 12_345_678, 1_500_000_000]] == ["950", "133k", "12.3M", "1.50B"]


def test_an_interrupted_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("good")

    def write_half(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, write_half)
    assert path.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_importing_the_report_does_not_import_matplotlib():
    code = "import platform, sys; import lctrain.evaluation.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_file_in_place_of_the_report_directory_is_a_one_line_error(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(ValueError, match="out is a file"):
        write_report(evaluation(), tmp_path / "out")
