"""An evaluation, written out for people and for programs: `report.md` (protocol, tables, pictures), the plots
(`perplexity.png`, `position.png`, one retrieval heatmap per model and task), and the raw numbers
(`results.json`, `perplexity.csv`, `position.csv`, `retrieval.csv`).

Every file is written to a temporary name beside it and then renamed, so an interrupted run leaves either the
old file or the new one. matplotlib is imported only by the plotting functions: importing this module is cheap,
and a training callback can call `perplexity_figure` to log the same picture to TensorBoard or W&B.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .results import Evaluation, ModelResults, RetrievalGrid

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MISSING = "-"  # a table cell with nothing measured


# --- numbers as text ---------------------------------------------------------------------------------------------


def significant(value: float, digits: int = 3) -> str:
    """`value` rounded to `digits` significant digits, written without an exponent: 12.3, 0.0123, 1230."""
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    decimals = digits - 1 - math.floor(math.log10(abs(value)))
    rounded = round(value, decimals)
    if rounded != 0:  # 9.996 rounds to 10.0: one digit fewer after the point
        decimals = digits - 1 - math.floor(math.log10(abs(rounded)))
    return f"{rounded:.{decimals}f}" if decimals > 0 else str(int(round(rounded, decimals)))


def parameter_count(n: int) -> str:
    """A parameter count in the usual short form: 950, 133k, 12.3M, 1.50B."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return significant(n / scale) + suffix
    return str(n)


def percent(share: float) -> str:
    """A share in [0, 1] as a percentage: whole numbers stay whole (35), others keep one decimal (33.3)."""
    value = 100 * share
    return f"{value:.0f}" if abs(value - round(value)) < 1e-9 else f"{value:.1f}"


def multiple(length: int, trained_len: int) -> str:
    """`length` as a multiple of the trained length: 4x, 0.5x, 1.5x."""
    return f"{length / trained_len:.3g}x"


def slug(text: str) -> str:
    """`text` as a file name part: lower case letters, digits, '.', '_' and '-' only ('GPT 2 (G=4)' -> 'gpt-2-g-4')."""
    return re.sub(r"[^a-z0-9._]+", "-", text.lower()).strip("-.") or "model"


def _setting(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_setting(v) for v in value)
    return str(value)


# --- markdown -----------------------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    """A GitHub markdown table: the first `text_columns` columns left-aligned, the numbers after them right-aligned
    so that they line up. A '|' inside a cell is escaped."""

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    align = [":---" if i < text_columns else "---:" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cell(c) for c in line) + " |" for line in lines)


def models_table(models: Sequence[ModelResults]) -> str:
    """One row per model: what it is and how long its evaluation took."""
    header = ["model", "arch", "SelfExtend", "parameters", "trained length", "seconds"]
    rows = [
        [
            m.label,
            m.arch,
            m.self_extend or MISSING,
            parameter_count(m.n_params),
            MISSING if m.trained_len is None else str(m.trained_len),
            f"{m.seconds:.1f}",
        ]
        for m in models
    ]
    return markdown_table(header, rows, text_columns=3)


def _reference_length(models: Sequence[ModelResults]) -> ModelResults | None:
    """The model whose trained length the length columns are counted in: the first one that records it."""
    return next((m for m in models if m.trained_len), None)


def perplexity_table(models: Sequence[ModelResults]) -> str:
    """Rows: models; columns: window lengths; cells: perplexity of the same scored tokens (3 significant digits).
    Empty when no model has perplexity results."""
    measured = [m for m in models if m.perplexity is not None]
    if not measured:
        return ""
    lengths = sorted({n for m in measured for n in m.perplexity.lengths})
    reference = _reference_length(measured)
    header = ["model"] + [f"{n} ({multiple(n, reference.trained_len)})" if reference else str(n) for n in lengths]
    rows = []
    for m in measured:
        ppl = dict(zip(m.perplexity.lengths, m.perplexity.ppl))
        rows.append([m.label] + [significant(ppl[n]) if n in ppl else MISSING for n in lengths])
    table = markdown_table(header, rows)
    if reference:
        table += (
            f"\n\nColumns: tokens of context of the last scored token; (Nx) counts them in multiples of the trained "
            f"length of {reference.label} ({reference.trained_len} tokens)."
        )
    return table


def position_table(models: Sequence[ModelResults]) -> str:
    """Rows: models; columns: bins of context length; cells: mean loss (nats per token). A bin `a-b` holds the
    predictions made with a to b tokens of context, both included (from 0-based positions a-1 to b-1)."""
    measured = [m for m in models if m.position is not None]
    if not measured:
        return ""
    bins = sorted({(s, e) for m in measured for s, e in zip(m.position.starts, m.position.ends)})
    header = ["model"] + [f"{s + 1}-{e}" if e > s + 1 else str(e) for s, e in bins]
    rows = []
    for m in measured:
        nll = {(s, e): v for s, e, v in zip(m.position.starts, m.position.ends, m.position.nll)}
        rows.append([m.label] + [f"{nll[b]:.3f}" if b in nll else MISSING for b in bins])
    return (
        markdown_table(header, rows)
        + "\n\nColumns: tokens of context (a prediction from 0-based position p has p + 1); cells: mean loss in nats."
    )


def retrieval_table(grid: RetrievalGrid) -> str:
    """Rows x columns of one grid, accuracy in %."""
    header = [f"{grid.row_name} \\ {grid.column_name}"] + [f"{c:g}" for c in grid.columns]
    rows = [[str(r)] + [percent(a) for a in accuracy] for r, accuracy in zip(grid.rows, grid.accuracy)]
    return markdown_table(header, rows)


def markdown_tables(evaluation: Evaluation, pictures: dict[Any, str] | None = None) -> str:
    """The models, perplexity, position and retrieval sections (headings and tables), each followed by its picture
    when `pictures` names one: keys "perplexity", "position" and (model index, task); values relative paths."""
    pictures = pictures or {}
    models = evaluation.models
    sections = ["## Models\n\n" + models_table(models)] if models else []

    def image(title: str, picture: Any) -> str:
        alt = title.replace("[", "(").replace("]", ")")  # a bracket would end the link's text
        return f"\n\n![{alt}]({pictures[picture]})" if picture in pictures else ""

    def section(title: str, table: str, picture: Any) -> None:
        if table:
            sections.append(f"## {title}\n\n{table}{image(title, picture)}")

    section("Perplexity by context length", perplexity_table(models), "perplexity")
    section("Loss by position", position_table(models), "position")
    retrieval = []
    for i, m in enumerate(models):
        for task, grid in m.retrieval.items():
            if not (grid.rows and grid.columns):
                continue
            title = f"{task}: {m.label}"
            retrieval.append(
                f"### {title}\n\nAccuracy in % over {grid.examples} examples per cell.\n\n"
                f"{retrieval_table(grid)}{image(title, (i, task))}"
            )
    if retrieval:
        sections.append("## Retrieval\n\n" + "\n\n".join(retrieval))
    return "\n\n".join(sections)


# --- plots --------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    """A figure drawn by Agg and owned by no pyplot state: no window, nothing to close, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _colour(index: int) -> str:
    """A model's colour, the same in every plot: its place in the evaluation in matplotlib's default cycle."""
    return f"C{index % 10}"


def _mark_trained_lengths(axes, models: Sequence[tuple[int, ModelResults]]) -> None:
    """A vertical dotted line at each model's trained length in its colour, or one grey line when all agree.
    Drawn with `vlines` (a collection), so `axes.get_lines()` keeps one line per model."""
    lengths = {m.trained_len for _, m in models if m.trained_len}
    if not lengths:
        return
    spans = dict(ymin=0, ymax=1, transform=axes.get_xaxis_transform(), linestyles=":")
    if len(lengths) == 1 and all(m.trained_len for _, m in models):
        (length,) = lengths
        axes.vlines(length, colors="grey", label=f"trained length {length}", **spans)
        return
    for i, m in models:
        if m.trained_len:
            axes.vlines(m.trained_len, colors=_colour(i), **spans)


def _plain_log_labels(axis) -> None:
    """Label a log axis with plain numbers (20, 30, 1024) instead of powers (2 x 10^1, 2^10); a short range
    gets labels on its minor ticks too, as matplotlib's default does."""
    from matplotlib.ticker import FuncFormatter, LogFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    minor = LogFormatter(base=axis.get_transform().base, labelOnlyBase=False, minor_thresholds=(2, 0.5))
    axis.set_minor_formatter(minor)


def _legend_label(m: ModelResults) -> str:
    return f"{m.label} ({parameter_count(m.n_params)})"


def perplexity_figure(models: Sequence[ModelResults]) -> Figure:
    """Perplexity against window length, one line per model that has perplexity results (log2 x axis with a tick
    at every length, log y axis), each model's trained length dotted."""
    from matplotlib.ticker import NullLocator

    measured = [(i, m) for i, m in enumerate(models) if m.perplexity is not None]
    if not measured:
        raise ValueError("perplexity_figure: no model has perplexity results; evaluate with at least one length")
    figure = _figure(7, 4.5)
    axes = figure.add_subplot()
    for i, m in measured:
        axes.plot(m.perplexity.lengths, m.perplexity.ppl, marker="o", color=_colour(i), label=_legend_label(m))
    lengths = sorted({n for _, m in measured for n in m.perplexity.lengths})
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(lengths, [str(n) for n in lengths])
    axes.xaxis.set_minor_locator(NullLocator())
    _plain_log_labels(axes.yaxis)
    _mark_trained_lengths(axes, measured)
    axes.set_xlabel("window length (tokens of context)")
    axes.set_ylabel("perplexity")
    axes.set_title("Perplexity by context length")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    return figure


def position_points(position) -> tuple[list[float], list[float]]:
    """x: the mean context of the predictions in each bin ((start + 1 + end) / 2 tokens); y: their mean loss."""
    x = [(s + 1 + e) / 2 for s, e in zip(position.starts, position.ends)]
    return x, list(position.nll)


def position_figure(models: Sequence[ModelResults]) -> Figure:
    """Mean loss against tokens of context (log x axis), one line per model that has position results."""
    measured = [(i, m) for i, m in enumerate(models) if m.position is not None]
    if not measured:
        raise ValueError("position_figure: no model has loss-by-position results")
    figure = _figure(7, 4.5)
    axes = figure.add_subplot()
    for i, m in measured:
        x, y = position_points(m.position)
        axes.plot(x, y, marker=".", color=_colour(i), label=_legend_label(m))
    axes.set_xscale("log", base=2)
    _plain_log_labels(axes.xaxis)
    _mark_trained_lengths(axes, measured)
    axes.set_xlabel("tokens of context (mean of each bin)")
    axes.set_ylabel("mean loss (nats per token)")
    axes.set_title("Loss by position")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    return figure


def retrieval_figure(model: ModelResults, grid: RetrievalGrid) -> Figure:
    """A heatmap of one grid: rows x columns, accuracy 0-100 % with every cell written in."""
    figure = _figure(1.5 + 0.8 * len(grid.columns), 1.5 + 0.5 * len(grid.rows))
    axes = figure.add_subplot()
    values = [[100 * a for a in row] for row in grid.accuracy]  # (rows, columns)
    image = axes.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for r, row in enumerate(values):
        for c, value in enumerate(row):
            colour = "black" if value > 60 else "white"  # readable on viridis' light and dark ends
            axes.text(c, r, percent(value / 100), ha="center", va="center", color=colour, fontsize=8)
    axes.set_xticks(range(len(grid.columns)), [f"{c:g}" for c in grid.columns])
    axes.set_yticks(range(len(grid.rows)), [str(r) for r in grid.rows])
    axes.set_xlabel(grid.column_name)
    axes.set_ylabel(grid.row_name)
    axes.set_title(f"{grid.task}: {model.label} ({grid.examples} examples per cell)")
    figure.colorbar(image, ax=axes, label="accuracy (%)")
    return figure


# --- files --------------------------------------------------------------------------------------------------------


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary file beside `path`, flushed to disk, then renamed over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    """Floats are written by `repr` (csv's default), so reading them back gives the same numbers."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    _write_text(path, buffer.getvalue())


def _save_figure(path: Path, figure: Figure) -> None:
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))


def write_csvs(evaluation: Evaluation, out_dir: Path) -> None:
    """`perplexity.csv`, `position.csv` and `retrieval.csv`: one row per number, header only when none."""
    perplexity, position, retrieval = [], [], []
    for m in evaluation.models:
        if m.perplexity is not None:
            p = m.perplexity
            for length, nll, ppl in zip(p.lengths, p.nll, p.ppl):
                perplexity.append([m.label, length, nll, ppl, p.scored_tokens])
        if m.position is not None:
            for start, end, nll in zip(m.position.starts, m.position.ends, m.position.nll):
                position.append([m.label, start, end, nll])
        for task, grid in m.retrieval.items():
            for row, accuracy in zip(grid.rows, grid.accuracy):
                for column, value in zip(grid.columns, accuracy):
                    retrieval.append(
                        [m.label, task, grid.row_name, row, grid.column_name, column, value, grid.examples]
                    )
    _write_csv(out_dir / "perplexity.csv", ["model", "length", "nll", "ppl", "scored_tokens"], perplexity)
    _write_csv(out_dir / "position.csv", ["model", "start", "end", "nll"], position)
    header = ["model", "task", "row_name", "row", "column_name", "column", "accuracy", "examples"]
    _write_csv(out_dir / "retrieval.csv", header, retrieval)


def retrieval_files(models: Sequence[ModelResults]) -> dict[tuple[int, str], str]:
    """`<task>-<slug(label)>.png` for each model and task; a name two models would share gets -2, -3, ..."""
    names: dict[tuple[int, str], str] = {}
    taken: set[str] = set()
    for i, m in enumerate(models):
        for task, grid in m.retrieval.items():
            if not (grid.rows and grid.columns):
                continue  # nothing to draw
            stem, n = f"{slug(task)}-{slug(m.label)}", 1
            name = f"{stem}.png"
            while name in taken:
                n += 1
                name = f"{stem}-{n}.png"
            taken.add(name)
            names[(i, task)] = name
    return names


def write_report(evaluation: Evaluation, out_dir: Path, title: str = "Evaluation") -> str:
    """Write report.md, the plots, results.json and the CSV files into `out_dir` (created if needed); return the
    markdown of report.md."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"report directory {out_dir} is a file; choose a directory for the report")
    out_dir.mkdir(parents=True, exist_ok=True)
    models = evaluation.models
    pictures: dict[Any, str] = {}
    if any(m.perplexity is not None for m in models):
        _save_figure(out_dir / "perplexity.png", perplexity_figure(models))
        pictures["perplexity"] = "perplexity.png"
    if any(m.position is not None for m in models):
        _save_figure(out_dir / "position.png", position_figure(models))
        pictures["position"] = "position.png"
    for (i, task), name in retrieval_files(models).items():
        _save_figure(out_dir / name, retrieval_figure(models[i], models[i].retrieval[task]))
        pictures[(i, task)] = name

    _write_text(out_dir / "results.json", json.dumps(evaluation.to_dict(), indent=2, default=str) + "\n")
    write_csvs(evaluation, out_dir)

    protocol = "\n".join(f"- {key}: {_setting(value)}" for key, value in evaluation.settings.items())
    parts = [f"# {title}"]
    if protocol:
        parts.append("## Protocol\n\n" + protocol)
    tables = markdown_tables(evaluation, pictures)
    if tables:
        parts.append(tables)
    markdown = "\n\n".join(parts) + "\n"
    _write_text(out_dir / "report.md", markdown)
    return markdown
