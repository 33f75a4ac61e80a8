"""The folder platform/ keeps the standard library's `platform` module working when a checkout runs it
under that name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

ROOT = REPO
PROBE = (
    "import json, platform, torch, lightning, uuid; "
    "print(json.dumps([platform.system(), platform.python_version(), platform.machine(), platform.node(), "
    "platform.release(), platform.python_implementation(), platform.platform(), str(uuid.uuid4())[:0]]))"
)


def run_python(code: str, cwd: Path) -> list:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_stdlib_platform_api_works_from_the_repository_root(tmp_path):
    ours = run_python(PROBE, ROOT)
    stdlib = run_python(PROBE, tmp_path)  # outside the checkout the standard module is imported
    assert ours == stdlib
    assert ours[0] == "Linux" and ours[1] == ".".join(map(str, sys.version_info[:3]))


def test_platform_is_this_package_and_forwards_every_stdlib_name(tmp_path):
    code = "import platform, json; print(json.dumps([platform.__file__, sorted(n for n in dir(platform))]))"
    ours_file, ours_names = run_python(code, ROOT)
    std_file, std_names = run_python(code, tmp_path)
    assert Path(ours_file) == ROOT / "platform" / "__init__.py"
    assert Path(std_file).name == "platform.py"
    assert set(n for n in std_names if not n.startswith("__")) <= set(ours_names)


def test_fit_help_runs_as_a_module_from_the_root():
    out = subprocess.run([sys.executable, "-m", "platform.fit", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--ckpt_path" in out.stdout and "--model.arch" in out.stdout and "--data.seq_len" in out.stdout
