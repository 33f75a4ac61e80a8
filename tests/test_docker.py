"""docker/Dockerfile parses and names its parts: a CUDA PyTorch base, the requirements with the deepspeed
and flash extras, the SLURM client, and the repository as the working directory (no Docker engine here)."""

from __future__ import annotations

import re

from tests.helpers import REPO

INSTRUCTIONS = {
    "FROM", "ARG", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
    "WORKDIR", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments dropped, backslash continuations joined."""
    instructions, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        keyword, _, arguments = current.strip().partition(" ")
        instructions.append((keyword, " ".join(arguments.split())))
        current = ""
    assert not current, f"a continuation line never ends: {current!r}"
    return instructions


def test_dockerfile_parses_into_known_instructions_starting_from_a_base():
    instructions = parse_dockerfile((REPO / "docker" / "Dockerfile").read_text())
    keywords = [k for k, _ in instructions]
    assert set(keywords) <= INSTRUCTIONS, set(keywords) - INSTRUCTIONS
    assert keywords[keywords.index("FROM") - 1 :: -1] == ["ARG"] * keywords.index("FROM")  # only ARGs before FROM
    assert keywords.count("FROM") == 1 and keywords[-1] == "CMD"


def test_dockerfile_names_cuda_pytorch_extras_slurm_client_and_the_repository():
    instructions = parse_dockerfile((REPO / "docker" / "Dockerfile").read_text())
    text = "\n".join(f"{k} {a}" for k, a in instructions)
    base = next(a for k, a in instructions if k == "ARG" and a.startswith("BASE="))
    assert "pytorch" in base and "cuda" in base
    torch_pin = re.search(r"^torch==([\d.]+)$", (REPO / "requirements.txt").read_text(), re.M).group(1)
    assert f":{torch_pin}-" in base  # the base image's torch is the pinned one, so pip keeps it

    runs = [a for k, a in instructions if k == "RUN"]
    assert any("apt-get install" in r and "slurm-client" in r for r in runs)
    pyproject = (REPO / "pyproject.toml").read_text()
    extras = [re.search(rf'^{name} = \["([^"]+)"\]$', pyproject, re.M).group(1) for name in ("deepspeed", "flash")]
    pip = " ".join(r for r in runs if "pip install" in r)
    assert "-r requirements.txt" in pip
    for requirement in extras:
        assert f'"{requirement}"' in pip, requirement  # the extras, spelled as in pyproject.toml
    # the checkout is installed in place, without dependencies, after the copy: `lctrain` and `python -m platform`
    assert "--no-deps -e ." in pip and runs.index(next(r for r in runs if "-e ." in r)) == len(runs) - 1

    workdir = next(a for k, a in instructions if k == "WORKDIR")
    assert ("COPY", ". .") in instructions and workdir == "/workspace/lctrain"
    assert "COPY requirements.txt" in text
