"""EleutherAI's lm-eval evaluates an export with its "hf" model class on a task made of local files, offline,
and its accuracy is the one computed here from the platform model's own log-likelihoods."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lctrain.models.spec import ModelSpec

if importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("accelerate") is None:
    pytest.skip(
        "lm-eval is not installed: pip install '.[eval]' (or pip install 'lm-eval[hf]>=0.4,<0.5')",
        allow_module_level=True,
    )

pytestmark = pytest.mark.slow

DOCS = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "answer": 0},
    {"question": "Two plus two is", "choices": ["four", "five"], "answer": 0},
    {"question": "Water is", "choices": ["square", "wet", "dry"], "answer": 1},
    {"question": "Fire feels", "choices": ["cold", "hot"], "answer": 1},
    {"question": "A cat says", "choices": ["woof", "moo", "meow"], "answer": 2},
    {"question": "Ice is", "choices": ["frozen water", "warm"], "answer": 0},
]

TASK = """\
task: lctrain_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

EVALUATE = textwrap.dedent(
    """
    import json, sys
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={sys.argv[1]},trust_remote_code=True",
        tasks=["lctrain_local_choice"],
        task_manager=TaskManager(include_path=sys.argv[2]),
        device="cpu",
        batch_size=4,
    )
    print(json.dumps(results["results"]["lctrain_local_choice"]))
    """
)


def expected_accuracy(model) -> float:
    """lm-eval's multiple-choice accuracy from the equations: per document, the choice whose bytes (after the
    question and one space) have the largest summed log-probability, in float64."""
    correct = 0
    for doc in DOCS:
        scores = []
        for choice in doc["choices"]:
            context, continuation = list(doc["question"].encode()), list((" " + choice).encode())
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logp = model(ids).logits[0].double().log_softmax(dim=-1)  # (T, V)
            scores.append(sum(logp[len(context) + i - 1, t].item() for i, t in enumerate(continuation)))
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    return correct / len(DOCS)


def test_lm_eval_scores_an_export_on_a_local_task(tmp_path, export_random, lctrain_site):
    model = export_random(ModelSpec("lswt", overrides={"n_registers": 2}), tmp_path / "hf")
    task = tmp_path / "task"
    task.mkdir()
    (task / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (task / "local_choice.yaml").write_text(TASK.format(data=task / "data.jsonl", cache=tmp_path / "datasets"))
    env = {
        **os.environ,
        "PYTHONPATH": str(lctrain_site),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    out = subprocess.run(
        [sys.executable, "-c", EVALUATE, str(tmp_path / "hf"), str(task)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["sample_len"] == len(DOCS)
    assert result["acc,none"] == pytest.approx(expected_accuracy(model))
