"""`python -m platform.generate`: streams the requested tokens, reproducibly."""

from __future__ import annotations

import subprocess
import sys

import torch

from lctrain.inference import load_model
from lctrain.inference.generation import generate_text
from lctrain.models.sampling import generate, sample_next
from tests.helpers import REPO


def test_generate_yields_the_requested_number_of_tokens_with_one_call_per_token(trained_run):
    model, tokenizer = load_model(trained_run)
    calls = []
    original = model.forward
    model.forward = lambda ids, state=None, **kw: calls.append(ids.shape[1]) or original(ids, state=state, **kw)
    prompt = torch.tensor([tokenizer.encode("def ")])
    tokens = list(generate(model, prompt, 17, temperature=1.0, generator=torch.Generator().manual_seed(0)))
    assert len(tokens) == 17
    assert calls == [4] + [1] * 16  # the prompt once, then one token per call: no prefix is re-run


def test_equal_seeds_give_equal_text_and_other_seeds_differ(trained_run, capsys):
    a = generate_text(str(trained_run), "The ", max_new_tokens=40, seed=7, stop_at_end_of_text=False)
    b = generate_text(str(trained_run), "The ", max_new_tokens=40, seed=7, stop_at_end_of_text=False)
    c = generate_text(str(trained_run), "The ", max_new_tokens=40, seed=8, stop_at_end_of_text=False)
    assert a == b and a != c
    assert capsys.readouterr().out.startswith("The ")


def test_greedy_sampling_picks_the_argmax_and_top_k_one_is_greedy():
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5]])
    assert sample_next(logits, temperature=0).item() == 1
    g = torch.Generator().manual_seed(0)
    assert all(sample_next(logits, temperature=1.5, top_k=1, generator=g).item() == 1 for _ in range(20))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    drawn = {sample_next(logits, top_p=0.75, generator=g).item() for _ in range(200)}
    assert drawn == {0, 1}


def test_generate_cli_streams_to_stdout(trained_run):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "platform.generate",
            "--checkpoint",
            str(trained_run),
            "--prompt",
            "import ",
            "--max_new_tokens",
            "12",
            "--seed",
            "3",
            "--stop_at_end_of_text",
            "false",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("import ") and len(out.stdout) > len("import ")


def test_generate_cli_names_a_missing_checkpoint(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "platform.generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: --checkpoint") and "nope" in out.stderr
