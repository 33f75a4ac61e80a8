"""`pip install .` gives the package `lctrain` and the command `lctrain`, usable from any directory.

The wheel is built from this checkout and installed (without dependencies, which this environment already
has) into a folder put on PYTHONPATH, so the test runs in minutes and without a second copy of torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The folder `pip install .` put lctrain (and bin/lctrain) into."""
    root = tmp_path_factory.mktemp("install")
    wheels, target, source = root / "wheels", root / "site", root / "source"

    # A copy of the sources, so the build's own folders (build/, *.egg-info) never land in the checkout.
    def ignore(folder: str, names: list[str]) -> set[str]:
        local = {".git", ".venv", "runs", "data", "build"} if Path(folder) == REPO else set()
        return {n for n in names if n in local or n == "__pycache__" or n.endswith(".egg-info")}

    shutil.copytree(REPO, source, ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("lctrain-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return target


def run_outside(installed: Path, cwd: Path, *command: str) -> subprocess.CompletedProcess:
    """A command run from `cwd`, outside the checkout, seeing the installed package only."""
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_wheel_holds_lctrain_and_never_a_package_named_platform(installed):
    (wheel,) = installed.parent.glob("wheels/lctrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"lctrain"}
    folders = {str(Path(n).parent) for n in names if n.endswith("/__init__.py") or n.endswith(".py")}
    packages = {
        str(p.parent.relative_to(REPO)).replace("platform", "lctrain", 1) for p in REPO.glob("platform/**/*.py")
    }
    assert packages <= folders  # every subfolder of the source is in the wheel


def test_import_after_torch_from_another_directory(installed, tmp_path):
    code = "import torch, lctrain; from lctrain.models import build_model; print(type(build_model('lswt', 'debug')))"
    out = run_outside(installed, tmp_path, sys.executable, "-c", code)
    assert out.returncode == 0, out.stderr
    assert "lctrain.models.lswt.LSWT" in out.stdout
    code = "import lctrain, platform; print(lctrain.__file__); print(platform.system())"
    out = run_outside(installed, tmp_path, sys.executable, "-c", code)
    lctrain_file, system = out.stdout.split()
    assert Path(lctrain_file).is_relative_to(installed) and system == "Linux"  # the standard module is intact


def test_the_lctrain_command_trains_from_another_directory(installed, tmp_path, builtin_data):
    run = tmp_path / "run"
    out = run_outside(
        installed, tmp_path, str(installed / "bin" / "lctrain"), "fit", "--config", str(REPO / "configs/tiny.yaml"),
        "--trainer.max_steps=3", "--trainer.default_root_dir", str(run), "--data.data_dir", str(builtin_data),
        "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "config.yaml").exists()
    out = run_outside(
        installed, tmp_path, str(installed / "bin" / "lctrain"), "generate", "--checkpoint", str(run),
        "--prompt", "The ", "--max_new_tokens", "5", "--temperature", "0",
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.startswith("The "), out.stderr[-3000:]


def test_every_subcommand_answers_help_and_an_unknown_one_is_named(installed, tmp_path):
    command = str(installed / "bin" / "lctrain")
    for sub, option in [("fit", "--model.model_config.n_registers"), ("prepare", "--tokenizer"),
                        ("generate", "--max_new_tokens"), ("export", "--out"),
                        ("evaluate", "--perplexity.lengths")]:  # fmt: skip
        out = run_outside(installed, tmp_path, command, sub, "--help")
        assert out.returncode == 0 and option in out.stdout, (sub, out.stderr[-2000:])
    out = run_outside(installed, tmp_path, command, "train")
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: unknown command 'train'; choose one of: fit, prepare, generate, export, evaluate"
    )
