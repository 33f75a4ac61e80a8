"""Passkey retrieval past the trained context, with and without SelfExtend (docs/architectures.md).

Trains a small RoPE model on passkey examples of L_pre tokens (`platform.fit` with configs/passkey/lswt.yaml),
writes evaluation sets at 1x, 2x, 4x and 8x L_pre with the key at fixed depths (`platform.prepare` with
configs/passkey/data.yaml), and scores every example by greedy exact match: each answer token must be the
argmax given the ones before it, which is exactly when greedy decoding writes the key. Plain attention is
compared with a few SelfExtend (G, W) settings. Prints the settings, the table (method x length), the mean
NLL of the key tokens and the depth breakdown. From the root:

    python -m benchmarks.passkey [--quick] [--checkpoint RUN] [--output passkey.md] [--fit_arg=--model...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import markdown_table
from lctrain.data.datamodule import TokenDataModule
from lctrain.data.prepare import prepare_cli
from lctrain.data.shards import INDEX
from lctrain.inference import checkpoint_file, load_model
from lctrain.models.layers.self_extend import SelfExtendConfig
from lctrain.models.registry import count_parameters
from lctrain.training.cli import fit
from lctrain.training.losses import token_nll
from lctrain.training.metrics import AnswerExactMatch

log = logging.getLogger(__name__)

PREPARE_CONFIG = "configs/passkey/data.yaml"
# (G, W) for L_pre = 256: the hard bound (L_pre - W)·G + W reaches 832, 1600, 3616 and 7200 tokens, and the
# paper's rule (1/2 ... 2/3)·L_pre > W + (N - W)/G holds up to about 2x, 4x, 8x and 8x L_pre.
DEFAULT_METHODS = ["4,64", "8,64", "16,32", "32,32"]
DEFAULT_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


@dataclasses.dataclass(frozen=True)
class Method:
    label: str
    self_extend: SelfExtendConfig | None  # None: plain RoPE attention

    @classmethod
    def parse(cls, text: str) -> Method:
        """'vanilla' or 'G,W'."""
        if text == "vanilla":
            return cls("vanilla", None)
        try:
            group_size, window_size = (int(v) for v in text.split(","))
        except ValueError:
            raise SystemExit(f"--method {text!r} is neither 'vanilla' nor 'G,W' (e.g. 16,32)") from None
        return cls(f"SelfExtend G={group_size} W={window_size}", SelfExtendConfig(group_size, window_size))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few minutes: short training, few examples, two lengths")
    p.add_argument("--config", default="configs/passkey/lswt.yaml", help="training config of the passkey model")
    p.add_argument("--run_dir", help="run directory to train into (default runs/passkey/lswt, --quick: .../quick)")
    p.add_argument("--checkpoint", help="evaluate this run directory or checkpoint instead of training")
    p.add_argument("--steps", type=int, help="training steps (default: the config's; --quick: 30)")
    p.add_argument("--pretrained_len", type=int, default=256, help="L_pre: tokens per training example")
    p.add_argument("--fit_arg", action="append", default=[], help="extra `platform.fit` argument (repeatable)")
    p.add_argument("--data_root", default="data/passkey", help="where the training and evaluation sets go")
    p.add_argument("--multiples", type=int, nargs="+", help="evaluation lengths in units of L_pre (1 2 4 8)")
    p.add_argument("--depths", type=float, nargs="+", default=DEFAULT_DEPTHS, help="key depths of every length")
    p.add_argument("--examples", type=int, help="examples per (length, depth) cell (default 20; --quick: 2)")
    p.add_argument("--method", action="append", dest="methods", help="'G,W' (repeatable); vanilla always runs")
    p.add_argument("--eval_seed", type=int, default=4321, help="seed of the evaluation examples")
    p.add_argument("--device", default="cpu", help="cpu or cuda (training and evaluation)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: see benchmarks/common.py)")
    p.add_argument("--output", help="also write the report (markdown) to this file")
    args = p.parse_args(argv)
    quick = args.quick
    args.run_dir = Path(args.run_dir or ("runs/passkey/quick" if quick else "runs/passkey/lswt"))
    args.multiples = args.multiples or ([1, 2] if quick else [1, 2, 4, 8])
    args.examples = args.examples or (2 if quick else 20)
    args.methods = [Method("vanilla", None)] + [Method.parse(m) for m in args.methods or DEFAULT_METHODS]
    if quick and args.steps is None:
        args.steps = 30
    return args


def prepared(output: Path, *overrides: str) -> Path:
    """Passkey shards at `output` from configs/data/passkey.yaml with `overrides`, written unless present."""
    if not (output / INDEX).is_file():
        prepare_cli(["--config", PREPARE_CONFIG, "--output", str(output), "--progress", "false", *overrides])
    return output


def train(args: argparse.Namespace) -> tuple[Path, float]:
    """Fit the passkey model (resuming an interrupted or finished run of the same directory) -> (run, seconds)."""
    data_dir = prepared(Path(args.data_root) / f"train-{args.pretrained_len}", f"--task.length={args.pretrained_len}")
    fit_args = [
        "--config", args.config,
        "--trainer.default_root_dir", str(args.run_dir),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--data.data_dir", str(data_dir),
        "--data.source", "null",
        "--data.seq_len", str(args.pretrained_len - 1),  # an example is L_pre tokens with its end-of-text id
        "--ckpt_path", "auto",
    ]  # fmt: skip
    if args.steps is not None:
        fit_args += ["--trainer.max_steps", str(args.steps), "--trainer.val_check_interval", str(min(args.steps, 250))]
    if args.device.startswith("cuda"):
        fit_args += ["--trainer.accelerator", "gpu"]
    started = time.perf_counter()
    fit(fit_args + args.fit_arg)
    return args.run_dir, time.perf_counter() - started


def evaluation_set(args: argparse.Namespace, length: int) -> Path:
    depths = "[" + ", ".join(str(d) for d in args.depths) + "]"
    name = f"eval-{length}-d{len(args.depths)}x{args.examples}-s{args.eval_seed}"
    return prepared(
        Path(args.data_root) / name,
        f"--task.length={length}",
        "--task.train_examples=0",
        f"--task.val_examples={len(args.depths) * args.examples}",
        f"--task.depths={depths}",
        f"--task.seed={args.eval_seed}",
    )


@dataclasses.dataclass
class Cell:
    """Scores of one (method, length): exact-match rate per depth, and the mean NLL of the key tokens."""

    exact: list[float]
    answer_nll: float

    @property
    def percent(self) -> float:
        return 100 * sum(self.exact) / len(self.exact)


@torch.inference_mode()
def score(model: torch.nn.Module, data_dir: Path, length: int, depths: list[float], device: str) -> Cell:
    """A batch holds one example of each depth, in the order the task cycles them."""
    data = TokenDataModule(str(data_dir), seq_len=length - 1, batch_size=len(depths), layout="documents")
    data.setup()
    metrics = [AnswerExactMatch() for _ in depths]
    nll_sum, n_answers = 0.0, 0
    for batch in data.val_dataloader():
        logits = model(batch["input_ids"].to(device)).logits.float().cpu()  # (B, T, V), row i at depths[i]
        targets, mask = batch["targets"], batch["answer_mask"]
        for i, metric in enumerate(metrics):
            metric.update(logits[i : i + 1], targets[i : i + 1], mask[i : i + 1])
        nll, n = token_nll(logits, torch.where(mask, targets, -100))
        nll_sum, n_answers = nll_sum + nll.item(), n_answers + n.item()
    return Cell([metric.compute().item() for metric in metrics], nll_sum / max(n_answers, 1))


def largest_distance(method: Method, n: int) -> int:
    """The largest relative position the attention uses on n tokens (docs/architectures.md)."""
    if method.self_extend is None:
        return n - 1
    G, W = method.self_extend.group_size, method.self_extend.window_size
    return (n - 1) // G + W - W // G if n > W else n - 1


def report(args: argparse.Namespace, settings: list[str], results: dict, lengths: list[int], trained_len: int) -> str:
    """The settings, the method x length table, the key-token NLL and the depth breakdown, as markdown."""
    n = len(args.depths) * args.examples
    headers = ["method", "max N: (L_pre-W+⌊W/G⌋)·G", f"largest distance at {lengths[-1]}"]
    length_headers = [f"{m}x = {length}" for m, length in zip(args.multiples, lengths)]
    rows, nll_rows = [], []
    for method in args.methods:
        cfg = method.self_extend
        limit = "-" if cfg is None else str(dataclasses.replace(cfg, pretrained_len=trained_len).max_length)
        row = [method.label, limit, str(largest_distance(method, lengths[-1] - 1))]
        rows.append(row + [f"{results[method.label, length].percent:.0f}" for length in lengths])
        nll_rows.append([method.label] + [f"{results[method.label, length].answer_nll:.2f}" for length in lengths])
    depth_headers = ["method", "length"] + [f"depth {d:g}" for d in args.depths]
    depth_rows = [
        [method.label, str(length)] + [f"{100 * r:.0f}" for r in results[method.label, length].exact]
        for method in args.methods
        for length in lengths
    ]
    return "\n".join(
        [
            "## Passkey retrieval: exact match (%), greedy",
            "",
            *(f"- {line}" for line in settings),
            "",
            f"Exact match (%), {n} examples per length:",
            "",
            markdown_table(headers + length_headers, rows),
            "",
            "Mean NLL of the key tokens (nats per token; a uniform guess of a digit is ln 10 = 2.30):",
            "",
            markdown_table(["method"] + length_headers, nll_rows),
            "",
            f"Exact match (%) by key depth (0 = start of the filler, 1 = its end), {args.examples} examples each:",
            "",
            markdown_table(depth_headers, depth_rows),
        ]
    )


def run(args: argparse.Namespace) -> tuple[str, dict]:
    """Train (or load), evaluate every method at every length; returns the report and the scores
    {(method label, length): Cell}."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        run_dir, train_seconds = Path(args.checkpoint), 0.0
    else:
        run_dir, train_seconds = train(args)
    ckpt = torch.load(checkpoint_file(run_dir), map_location="cpu", weights_only=True)
    hp, data_hp = ckpt["hyper_parameters"], ckpt["datamodule_hyper_parameters"]
    trained_len = data_hp["seq_len"]
    pretrained_len = trained_len + 1  # the training examples' length: seq_len inputs plus the end-of-text id
    lengths = [m * pretrained_len for m in args.multiples]
    sets = {length: evaluation_set(args, length) for length in lengths}
    task = json.loads((sets[lengths[0]] / INDEX).read_text())["source"]

    results, eval_seconds = {}, 0.0
    for method in args.methods:
        overrides = {} if method.self_extend is None else {"self_extend": method.self_extend}
        model, _ = load_model(run_dir, device=args.device, **overrides)
        for length in lengths:
            started = time.perf_counter()
            results[method.label, length] = score(model, sets[length], length, args.depths, args.device)
            eval_seconds += time.perf_counter() - started
            log.info("%s at %d tokens: %s", method.label, length, results[method.label, length])

    config = model.config
    rope = f"{'reversed' if config.rope_reversed else 'standard'} RoPE, base {config.rope_base:g}"
    digits = task["key_digits"]
    settings = [
        f"model: {hp['arch']} {hp['size']} ({count_parameters(model) / 1e3:.0f}k parameters, d_model "
        f"{config.d_model}, {config.n_layers} layers, {config.n_heads} heads of {config.head_dim}), {rope}",
        f"training: {ckpt['global_step']} steps on passkey examples of L_pre = {pretrained_len} byte tokens "
        f"(key of {digits} digits at a uniform random depth), {trained_len} inputs per row, batch "
        f"{data_hp['batch_size']}, answer_loss_weight {hp.get('answer_loss_weight', 1.0):g}; run {run_dir}"
        + (f", {train_seconds / 60:.1f} min this call" if train_seconds else ""),
        f"evaluation: {args.examples} examples per (length, depth), depths {args.depths}, seed {args.eval_seed}; "
        f"SelfExtend pretrained_len = {trained_len} (positions 0 ... {trained_len - 1} were trained); "
        f"{eval_seconds / 60:.1f} min; device {args.device}, {torch.get_num_threads()} thread(s)",
        f"chance: a {digits}-digit key guessed at random is right with probability {1 / (9 * 10 ** (digits - 1)):.1g}",
    ]
    return report(args, settings, results, lengths, trained_len), results


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    text, results = run(args)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
