"""`model.generate()`'s sampling arguments on an exported model, and its greedy text equal to the platform's
`generate` command on a trained run."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lctrain.cluster.consolidate import export_cli
from lctrain.inference.generation import generate_text
from lctrain.models.sampling import generate
from lctrain.models.spec import ModelSpec


@pytest.fixture
def exported(tmp_path, export_random):
    """(platform model, HF model) of a small LSWT with registers."""
    model = export_random(ModelSpec("lswt", overrides={"n_registers": 4}), tmp_path / "hf")
    return model, AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


def greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack(list(generate(model, ids, n, temperature=0)), dim=1)  # (B, n)


def test_sampling_that_leaves_one_candidate_is_greedy(exported):
    model, hf = exported
    ids = torch.randint(0, 256, (2, 7))
    expected = greedy(model, ids, 10)
    for kwargs in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4, top_k=0)):
        out = hf.generate(ids, max_new_tokens=10, do_sample=True, **kwargs)
        assert torch.equal(out[:, 7:], expected), kwargs


def test_sampled_tokens_come_from_the_top_k_of_the_platform_logits(exported):
    """Teacher-forced check: every sampled token is among the k most likely under the platform model."""
    model, hf = exported
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (3, 5))
    out = hf.generate(ids, max_new_tokens=16, do_sample=True, top_k=3, temperature=1.5)
    assert out.shape == (3, 21)
    with torch.no_grad():
        logits = model(out[:, :-1]).logits[:, 4:]  # (B, 16, V): the logits each new token was drawn from
    top3 = logits.topk(3, dim=-1).indices  # (B, 16, 3)
    assert bool((top3 == out[:, 5:, None]).any(dim=-1).all())
    assert len(set(out[:, 5:].flatten().tolist())) > 3  # sampled, not a fixed sequence


def test_eos_token_stops_a_row_and_pads_it(exported):
    model, hf = exported
    ids = torch.randint(0, 256, (1, 6))
    expected = greedy(model, ids, 10)[0].tolist()
    eos = expected[3]
    stop = expected.index(eos)  # the first time greedy decoding emits it
    out = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=256)
    assert out[0, 6:].tolist() == expected[: stop + 1]


def test_input_embeddings_a_foreign_cache_and_right_padded_prompts_are_refused(exported):
    _, hf = exported
    with pytest.raises(ValueError, match="takes input_ids"):
        hf(inputs_embeds=torch.zeros(1, 3, 64))
    from transformers import DynamicCache

    with pytest.raises(ValueError, match="carries its own state as the cache; got a DynamicCache"):
        hf(torch.zeros(1, 3, dtype=torch.long), cache=DynamicCache())
    with pytest.raises(ValueError, match="pads between real tokens"):
        hf(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 0, 1, 1]]))
    right_padded = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="^generate\\(\\) needs prompts padded on the left"):
        hf.generate(torch.zeros(2, 3, dtype=torch.long), attention_mask=right_padded, max_new_tokens=2)


def test_rope_dynamic_lswt_refuses_left_padding_in_one_line(tmp_path, export_random):
    spec = ModelSpec("lswt", overrides={"rope_dynamic": True, "rope_positions": 8, "rope_ntk_scale": 2.0})
    export_random(spec, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids, mask = torch.randint(0, 256, (2, 5)), torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    line = "^LSWT with rope_dynamic cannot decode a left-padded batch: .*one prompt at a time"
    with pytest.raises(ValueError, match=line):
        hf.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=256)
    assert hf.generate(ids[:1], max_new_tokens=2, do_sample=False).shape == (1, 7)  # unpadded rows still work


def test_loss_with_labels_is_the_mean_next_token_cross_entropy(exported):
    _, hf = exported
    ids = torch.randint(0, 256, (2, 6))
    labels = ids.clone()
    labels[0, 3] = -100
    out = hf(ids, labels=labels)
    logp = out.logits.double().log_softmax(dim=-1)
    terms = [-logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(5) if labels[b, t + 1] != -100]
    assert len(terms) == 9
    torch.testing.assert_close(out.loss.double(), torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_export_command_writes_a_directory_whose_greedy_text_equals_the_generate_command(
    trained_run, tmp_path, capsys
):
    out = tmp_path / "hf"
    export_cli(["--checkpoint", str(trained_run), "--format", "hf", "--out", str(out)])
    prompt = "The history of "
    expected = generate_text(str(trained_run), prompt, max_new_tokens=40, temperature=0)
    capsys.readouterr()

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    new = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1] :]
    assert len(expected) > 0
    assert tokenizer.decode(new, skip_special_tokens=True) == expected
