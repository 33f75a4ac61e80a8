"""Every bad input a user can give fit, prepare, generate, export or evaluate ends in one `error:` line that names the
key, file or value, exit code 2, and leaves the run directory, the data and any output as they were.

Each case runs the command's entry point in this process (as `python -m platform.<cmd>` does, minus the
interpreter start-up); a few at the end run the real commands in a subprocess.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lctrain.cluster.consolidate import export_cli
from lctrain.data.prepare import prepare_cli
from lctrain.entry import run_entry_point
from lctrain.evaluation.cli import evaluate_cli
from lctrain.inference.generation import generate_cli
from lctrain.training.cli import fit
from tests.helpers import REPO, quick_fit_args

COMMANDS = {
    "fit": fit,
    "prepare": prepare_cli,
    "generate": generate_cli,
    "export": export_cli,
    "evaluate": evaluate_cli,
}


@dataclass
class World:
    """The files the cases point at, all under `root`, which no case may change."""

    root: Path
    data: Path  # prepared shards (a copy of the built-in corpus)
    run: Path  # a trained run: config.yaml, checkpoints/{step-*.ckpt, last.ckpt}
    new_run: Path  # a run directory that does not exist yet (one per case)
    other_family: Path  # a checkpoint of a SerriformNet run
    other_size: Path  # a checkpoint of the same family with other shapes
    exported: Path  # an exported model file

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.root / "inputs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, builtin_data, trained_run) -> World:
    root = tmp_path_factory.mktemp("bad-inputs")
    data = root / "data"
    shutil.copytree(builtin_data, data)
    run = root / "run"
    shutil.copytree(trained_run, run, symlinks=True)
    other = tmp_path_factory.mktemp("other")
    fit(quick_fit_args(other / "serriform", data, "--model.arch", "serriform", "--model.size", "tiny", steps=2))
    fit(quick_fit_args(other / "narrow", data, "--model.model_config.d_model", "32", steps=2))
    exported = root / "exported" / "model.ckpt"
    assert run_entry_point(export_cli, ["--checkpoint", str(run), "--out", str(exported)]) == 0
    last = run / "checkpoints" / "last.ckpt"
    world = World(
        root=root,
        data=data,
        run=run,
        new_run=root / "new-run",
        other_family=other / "serriform" / "checkpoints" / "last.ckpt",
        other_size=other / "narrow" / "checkpoints" / "last.ckpt",
        exported=exported,
    )
    raw = last.resolve().read_bytes()
    world.file("garbage.ckpt", bytes(range(256)) * 64)
    world.file("empty.ckpt", b"")
    world.file("truncated.ckpt", raw[: len(raw) // 2])
    torch.save({"weights": torch.zeros(3)}, world.file("foreign.ckpt", b""))
    world.file("broken.yaml", "model:\n  arch: lswt\n  size: [debug\ntrainer:\n  max_steps: 4\n")
    world.file("list.yaml", "- model\n- trainer\n")
    world.file("text.txt", "some text to tokenize\n" * 50)
    world.file("empty.txt", "")
    (root / "inputs" / "empty-dir").mkdir()
    (root / "inputs" / "empty-run").mkdir()
    garbage = root / "garbage-data"
    shutil.copytree(data, garbage)
    for shard in sorted(garbage.glob("**/*.bin"))[:1]:
        shard.write_bytes(b"\xff" * shard.stat().st_size)
    return world


def snapshot(paths: list[Path]) -> dict[str, str]:
    """Every file (and link target) under `paths`, with its content hash: what a case must leave alone."""
    state = {}
    for top in paths:
        for path in sorted(top.rglob("*")):
            if path.is_symlink():
                state[str(path)] = "-> " + str(path.readlink())
            elif path.is_file():
                state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@dataclass
class Case:
    id: str
    command: str  # fit (a short run into a new directory), fit-run (into the trained run), fit-raw, prepare, ...
    args: str  # split like a shell line after {root}, {inputs}, {data}, {run}, {exported}, ... are filled in
    names: str  # what the one line must contain (the key, file or value)

    def arguments(self, world: World) -> list[str]:
        places = {f.name: str(getattr(world, f.name)) for f in dataclasses.fields(world)}
        args = shlex.split(self.args.format(inputs=world.root / "inputs", **places))
        if self.command == "fit":
            return quick_fit_args(world.new_run, world.data, *args, steps=4)
        if self.command == "fit-run":
            return quick_fit_args(world.run, world.data, *args, steps=4)
        if self.command == "evaluate-run":  # the trained run on the data: the case changes one thing
            return ["--models+", str(world.run), "--data.data_dir", str(world.data), *args]
        return args


CASES = [
    # fit: values the parser, the classes or the cross-checks refuse
    Case("max_steps negative", "fit", "--trainer.max_steps -5", "max_steps"),
    Case("max_steps not a number", "fit", "--trainer.max_steps abc", "max_steps"),
    Case("batch size not a number", "fit", "--data.batch_size=abc", "data.batch_size"),
    Case("batch size zero", "fit", "--data.batch_size 0", "data.batch_size"),
    Case("seq_len zero", "fit", "--data.seq_len 0", "data.seq_len"),
    Case("num_workers negative", "fit", "--data.num_workers -1", "data.num_workers"),
    Case("learning rate negative", "fit", "--model.optimizer.init_args.lr -1", "learning rate"),
    Case("accumulate zero", "fit", "--trainer.accumulate_grad_batches 0", "accumulate_grad_batches"),
    Case("checkpoint interval negative", "fit", "--checkpoint.every_n_train_steps -3", "every_n_train_steps"),
    Case("save_top_k below -1", "fit", "--checkpoint.save_top_k -2", "save_top_k"),
    Case("d_model negative", "fit", "--model.model_config.d_model -8", "d_model"),
    Case("n_layers zero", "fit", "--model.model_config.n_layers 0", "n_layers"),
    Case("heads do not divide d_model", "fit", "--model.model_config.n_heads 7", "n_heads"),
    Case("model config field unknown", "fit", "--model.model_config.widht 8", "widht"),
    Case("vocab_size given by hand", "fit", "--model.model_config.vocab_size 7", "vocab_size"),
    Case("unknown key", "fit", "--model.learning_rate 1", "learning_rate"),
    Case("unknown arch", "fit", "--model.arch gpt9", "gpt9"),
    Case("unknown size", "fit", "--model.size huge", "huge"),
    Case("layout unknown, choices listed", "fit", "--data.layout sideways", "streams"),
    Case("precision unknown", "fit", "--trainer.precision 7", "precision"),
    Case("gradient clip negative", "fit", "--trainer.gradient_clip_val -1", "gradient_clip_val"),
    Case("val interval negative", "fit", "--trainer.val_check_interval -1", "val_check_interval"),
    Case("grad norm interval negative", "fit", "--grad_norm.every_n_steps -1", "every_n_steps"),
    Case("nan guard limit negative", "fit", "--nan_guard.max_consecutive -1", "max_consecutive"),
    Case("warmup negative", "fit", "--model.scheduler.init_args.warmup_steps -1", "warmup_steps"),
    Case("accuracy top k zero", "fit", "--model.accuracy_top_k 0", "accuracy_top_k"),
    Case("cuda without cuda", "fit", "--trainer.accelerator cuda", "cuda"),
    Case("strategy unknown", "fit", "--parallelism.strategy zero9", "zero9"),
    Case(
        "streams longer than the data",
        "fit",
        "--data.layout streams --data.batch_size 200000 --model.carry_state true",
        "batch_size",
    ),
    Case("carry_state without streams", "fit", "--model.carry_state true", "carry_state"),
    # fit: files and directories
    Case("config file missing", "fit-raw", "--config {root}/nope.yaml", "nope.yaml"),
    Case("config invalid YAML", "fit-raw", "--config {inputs}/broken.yaml", "broken.yaml: invalid YAML at line 4"),
    Case("config not a mapping", "fit-raw", "--config {inputs}/list.yaml", "list.yaml"),
    Case("data dir missing", "fit", "--data.data_dir {root}/no-data --data.source null", "no-data"),
    Case("data dir without shards", "fit", "--data.data_dir {inputs}/empty-dir --data.source null", "empty-dir"),
    Case(
        "garbage shards, checksums off",
        "fit",
        "--data.data_dir {root}/garbage-data --data.verify_checksums false",
        "garbage-data",
    ),  # fmt: skip
    Case("garbage shards, checksums on", "fit", "--data.data_dir {root}/garbage-data", "garbage-data"),
    Case("root dir is a file", "fit", "--trainer.default_root_dir {inputs}/text.txt", "text.txt"),
    Case("fresh fit over checkpoints", "fit-run", "", "--ckpt_path auto"),
    Case("resume: path missing", "fit-run", "--ckpt_path {root}/gone.ckpt", "gone.ckpt"),
    Case("resume: path is a directory", "fit-run", "--ckpt_path {inputs}", "inputs"),
    Case("resume: garbage file", "fit-run", "--ckpt_path {inputs}/garbage.ckpt", "garbage.ckpt"),
    Case("resume: empty file", "fit-run", "--ckpt_path {inputs}/empty.ckpt", "empty.ckpt"),
    Case("resume: truncated file", "fit-run", "--ckpt_path {inputs}/truncated.ckpt", "truncated.ckpt"),
    Case("resume: not a training checkpoint", "fit-run", "--ckpt_path {inputs}/foreign.ckpt", "foreign.ckpt"),
    Case("resume: exported weights only", "fit-run", "--ckpt_path {exported}", "weights only"),
    Case("resume: other family", "fit-run", "--ckpt_path {other_family}", "serriform"),
    Case("resume: other shapes", "fit-run", "--ckpt_path {other_size}", "d_model"),
    Case(
        "resume: last without checkpoints",
        "fit",
        "--ckpt_path last --trainer.default_root_dir {inputs}/empty-run",
        "last",
    ),  # fmt: skip
    # prepare
    Case("config missing", "prepare", "--config {root}/nope.yaml", "nope.yaml"),
    Case("invalid YAML", "prepare", "--config {inputs}/broken.yaml", "broken.yaml: invalid YAML at line 4"),
    Case("input missing", "prepare", "--inputs {root}/missing.txt --output {root}/p1", "missing.txt"),
    Case("input empty", "prepare", "--inputs {inputs}/empty.txt --output {root}/p2 --progress false", "empty.txt"),
    Case("no source", "prepare", "--output {root}/p3", "builtin"),
    Case("two sources", "prepare", "--builtin true --inputs {inputs}/text.txt --output {root}/p4", "inputs"),
    Case("output exists", "prepare", "--builtin true --output {data}", "--overwrite"),
    Case("output is a file", "prepare", "--builtin true --output {inputs}/text.txt", "text.txt"),
    Case("val fraction", "prepare", "--builtin true --output {root}/p5 --val_fraction 1.5", "val_fraction"),
    Case("shard tokens", "prepare", "--builtin true --output {root}/p6 --shard_tokens 0", "shard_tokens"),
    Case(
        "tokenizer missing",
        "prepare",
        "--inputs {inputs}/text.txt --output {root}/p7 --tokenizer {root}/no-tok",
        "no-tok",
    ),  # fmt: skip
    Case(
        "bpe vocabulary",
        "prepare",
        "--inputs {inputs}/text.txt --output {root}/p8 --tokenizer bpe --bpe_vocab_size 3",
        "bpe_vocab_size",
    ),  # fmt: skip
    Case("task length", "prepare", "--task PasskeyTask --task.length -1 --output {root}/p9", "task.length"),
    Case("num_proc", "prepare", "--builtin true --output {root}/p10 --num_proc 0", "num_proc"),
    Case("unknown key", "prepare", "--builtin true --output {root}/p11 --shards 3", "shards"),
    # generate
    Case("checkpoint missing", "generate", "--checkpoint {root}/gone.ckpt --prompt a", "gone.ckpt"),
    Case("run without checkpoints", "generate", "--checkpoint {inputs}/empty-run --prompt a", "empty-run"),
    Case("garbage file", "generate", "--checkpoint {inputs}/garbage.ckpt --prompt a", "garbage.ckpt"),
    Case("empty file", "generate", "--checkpoint {inputs}/empty.ckpt --prompt a", "empty.ckpt"),
    Case("truncated file", "generate", "--checkpoint {inputs}/truncated.ckpt --prompt a", "truncated.ckpt"),
    Case("foreign file", "generate", "--checkpoint {inputs}/foreign.ckpt --prompt a", "foreign.ckpt"),
    Case("empty prompt", "generate", "--checkpoint {run} --prompt ''", "prompt"),
    Case("missing prompt", "generate", "--checkpoint {run}", "prompt"),
    Case("max_new_tokens", "generate", "--checkpoint {run} --prompt a --max_new_tokens -1", "max_new_tokens"),
    Case("top_k", "generate", "--checkpoint {run} --prompt a --top_k -3", "top_k"),
    Case("top_p", "generate", "--checkpoint {run} --prompt a --top_p 1.5", "top_p"),
    Case("temperature", "generate", "--checkpoint {run} --prompt a --temperature -1", "temperature"),
    Case("cuda without cuda", "generate", "--checkpoint {run} --prompt a --device cuda", "cuda"),
    Case("device unknown", "generate", "--checkpoint {run} --prompt a --device tpu9", "tpu9"),
    Case("self_extend group", "generate", "--checkpoint {run} --prompt a --self_extend.group_size 0", "group_size"),
    # export
    Case("checkpoint missing", "export", "--checkpoint {root}/gone --out {root}/e1.ckpt", "gone"),
    Case("garbage file", "export", "--checkpoint {inputs}/garbage.ckpt --out {root}/e2.ckpt", "garbage.ckpt"),
    Case("truncated file", "export", "--checkpoint {inputs}/truncated.ckpt --out {root}/e3.ckpt", "truncated.ckpt"),
    Case("foreign file", "export", "--checkpoint {inputs}/foreign.ckpt --out {root}/e4.ckpt", "foreign.ckpt"),
    Case("empty directory", "export", "--checkpoint {inputs}/empty-dir --out {root}/e5.ckpt", "empty-dir"),
    Case("out exists", "export", "--checkpoint {run} --out {exported}", "--overwrite"),
    Case(
        "out in checkpoints",
        "export",
        "--checkpoint {run} --out {run}/checkpoints/last.ckpt --overwrite true",
        "checkpoints/",
    ),  # fmt: skip
    Case("out not .ckpt", "export", "--checkpoint {run} --out {root}/model.bin", "model.bin"),
    Case("out is a directory", "export", "--checkpoint {run} --out {inputs}/empty-dir.ckpt/", "empty-dir"),
    Case("out under a file", "export", "--checkpoint {run} --out {inputs}/text.txt/m.ckpt", "text.txt"),
    # evaluate (evaluate-run: the trained run on the data, plus the case's arguments)
    Case("no models", "evaluate", "--data.data_dir {data}", "--models"),
    Case("nothing to measure", "evaluate", "--models+ {run}", "--data.data_dir"),
    Case("model missing", "evaluate", "--models+ {root}/gone --data.data_dir {data}", "gone"),
    Case("model garbage", "evaluate", "--models+ {inputs}/garbage.ckpt --data.data_dir {data}", "garbage.ckpt"),
    Case("model truncated", "evaluate", "--models+ {inputs}/truncated.ckpt --data.data_dir {data}", "truncated"),
    Case("model entry key", "evaluate", "--models+ '{{path: {run}, group: 4}}' --data.data_dir {data}", "group"),
    Case(
        "self_extend without attention",
        "evaluate",
        "--models+ '{{path: {other_family}, self_extend: {{group_size: 4, window_size: 8}}}}' --data.data_dir {data}",
        "self_extend",
    ),  # fmt: skip
    Case("length below 2", "evaluate-run", "--perplexity.lengths [1,64]", "lengths"),
    Case("data shorter", "evaluate-run", "--perplexity.lengths [128,99999]", "99999"),
    Case("score_len", "evaluate-run", "--perplexity.score_len 500", "score_len"),
    Case("data missing", "evaluate", "--models+ {run} --data.data_dir {root}/no-data", "no-data"),
    Case("split unknown", "evaluate-run", "--data.split test", "data.split"),
    Case("output is a file", "evaluate-run", "--output {inputs}/text.txt", "text.txt"),
    Case(
        "passkey too short",
        "evaluate",
        "--models+ {run} --retrieval.tasks [passkey] --retrieval.lengths [20]",
        "retrieval.lengths",
    ),  # fmt: skip
    Case("validate without checkpoint", "evaluate", "--mode validate", "--checkpoint"),
    Case("validate garbage", "evaluate", "--mode validate --checkpoint {inputs}/garbage.ckpt", "garbage.ckpt"),
    Case("devices zero", "evaluate-run", "--devices 0", "devices"),
    Case("cuda without cuda", "evaluate-run", "--accelerator cuda", "cuda"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.command.split('-')[0]}: {c.id}" for c in CASES])
def test_a_bad_input_is_one_line_exit_2_and_changes_nothing(case: Case, world: World, capsys, tmp_path):
    world = dataclasses.replace(world, new_run=tmp_path / "new-run")
    args = case.arguments(world)
    before = snapshot([world.root, tmp_path])
    code = run_entry_point(COMMANDS[case.command.split("-")[0]], args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert case.names in errors[0], errors[0]
    if table := os.environ.get("BAD_INPUT_TABLE"):  # the list of inputs and answers, for the docs
        with open(table, "a") as f:
            f.write(f"| {case.command.split('-')[0]} | {case.id} | {code} | {errors[0].replace('|', '/')} |\n")
    after = snapshot([world.root, tmp_path])
    assert after == before, sorted(set(after.items()) ^ set(before.items()))


def test_the_suite_covers_every_command_with_enough_cases():
    per_command = {name: sum(c.command.split("-")[0] == name for c in CASES) for name in COMMANDS}
    assert len(CASES) >= 60 and min(per_command.values()) >= 8, per_command


@pytest.mark.parametrize(
    "command, args",
    [
        ("fit", ["--data.batch_size=abc"]),
        ("generate", ["--checkpoint", "no/such/run", "--prompt", "a"]),
        ("export", ["--checkpoint", "no/such/run", "--out", "x.ckpt"]),
        ("prepare", ["--output", "nowhere"]),
    ],
)
def test_the_real_commands_print_one_line_and_exit_2(command, args, tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", f"platform.{command}", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert process.returncode == 2 and len(lines) == 1 and "Traceback" not in process.stderr, process.stderr[-2000:]
