"""Export -> `AutoModelForCausalLM.from_pretrained` gives the platform's model back: same weights, same logits,
and `generate()` decodes as the platform's own sampler, for every family and each option that changes the
weights (or, for SelfExtend and the XL cache, the state that generate carries)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lctrain.hf import LctrainForCausalLM, read_hf_model
from lctrain.models.sampling import generate
from lctrain.models.seqcond_config import SeqCondConfig
from lctrain.models.spec import ModelSpec

SELF_EXTEND = {"group_size": 2, "window_size": 4}
ONLY = {"use_conv": False, "use_recurrence": False, "use_moe": False, "use_lowrank_ff": False}  # every stage off
CASES = {
    "lswt": ModelSpec("lswt"),
    "lswt-registers": ModelSpec("lswt", overrides={"n_registers": 4}),
    "lswt-projections": ModelSpec("lswt", overrides={"d_vocab": 48}),  # d_vocab != d_model: the in/out projections
    "lswt-qknorm-nobias": ModelSpec("lswt", overrides={"qk_norm": True, "bias": False}),
    "lswt-selfextend": ModelSpec("lswt", overrides={"n_registers": 2, "self_extend": SELF_EXTEND}),
    "lswt-xl-cache": ModelSpec("lswt", overrides={"cache_len": 8}),
    "seqcond": ModelSpec("seqcond"),
    "seqcond-anchors": ModelSpec("seqcond", overrides={"num_anchor_heads": 2}),
    "seqcond-untied-noconv": ModelSpec("seqcond", overrides={"tie_weights": False, "use_conv": False}),
    "serriform-full": ModelSpec("serriform"),  # conv, recurrence and MoE (configs/serriform/full.yaml)
    "serriform-conv-only": ModelSpec("serriform", overrides={**ONLY, "use_conv": True}),
    "serriform-recurrence-only": ModelSpec("serriform", overrides={**ONLY, "use_recurrence": True}),
    "serriform-moe-only": ModelSpec("serriform", overrides={**ONLY, "use_moe": True}),
    "serriform-lowrank-ff": ModelSpec("serriform", overrides={"use_moe": False}),
}  # fmt: skip
FAMILIES = {"lswt": CASES["lswt-registers"], "seqcond": CASES["seqcond-anchors"], "serriform": CASES["serriform-full"]}


def greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The platform's own decoding at temperature 0 (what `python -m platform.generate --temperature 0` runs)."""
    return torch.stack(list(generate(model, ids, n, temperature=0)), dim=1)  # (B, n)


@torch.no_grad()
def decode_logits(model, prompt: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The platform's logits (B, n, V) for each of the n tokens `new` (B, n) after `prompt` (B, T): the prompt
    once, then one token per call with the state, as its own decoding does."""
    out = model(prompt)
    logits = [out.logits[:, -1]]
    for t in range(new.shape[1] - 1):
        out = model(new[:, t : t + 1], state=out.state)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)


def generated(hf, ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """generate()'s new tokens (B, n) and the logits (B, n, V) each was chosen from."""
    out = hf.generate(ids, return_dict_in_generate=True, output_logits=True, **kwargs)
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("case", CASES)
def test_export_loads_back_with_equal_weights_logits_and_greedy_decoding(case, tmp_path, export_random):
    spec = CASES[case]
    model = export_random(spec, tmp_path / "hf")

    read_spec, weights = read_hf_model(tmp_path / "hf")
    assert read_spec.arch == spec.arch and read_spec.config() == spec.config()
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert isinstance(hf, LctrainForCausalLM) and hf.config.model_type == spec.arch
    buffers = dict(model.named_buffers())  # not saved (the MoE usage counters): rebuilt as a new model has them
    assert all(torch.equal(b, buffers[name.removeprefix("model.")]) for name, b in hf.named_buffers())
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=1e-5)

    new, logits = generated(hf, ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert torch.equal(new, greedy(model, ids, 12))
    torch.testing.assert_close(logits, decode_logits(model, ids, new), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_load_equals_the_platform_model_cast_to_bf16(family, tmp_path, export_random):
    model = export_random(FAMILIES[family], tmp_path / "hf").to(torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
        assert expected.dtype == torch.bfloat16
        torch.testing.assert_close(hf(ids).logits, expected, rtol=0, atol=1e-5)


PADDED = ["lswt-registers", "lswt-selfextend", "lswt-xl-cache", "seqcond-anchors", "serriform-full"]


@pytest.mark.parametrize("case", PADDED)
def test_left_padded_rows_decode_as_each_prompt_alone(case, tmp_path, export_random):
    """Rows of different lengths, padded on the left, generate what each prompt generates by itself; the
    prompt's logits of a padded forward equal the row's own."""
    model = export_random(CASES[case], tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    prompts = [torch.randint(0, 256, (1, n)) for n in (10, 4, 7)]
    ids = torch.full((3, 10), 256)
    mask = torch.zeros(3, 10, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 10 - p.shape[1] :], mask[row, 10 - p.shape[1] :] = p[0], 1

    new, step_logits = generated(hf, ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=256)
    with torch.no_grad():
        logits = hf(ids, attention_mask=mask).logits
    for row, p in enumerate(prompts):
        assert new[row].tolist() == greedy(model, p, 8)[0].tolist(), f"row {row}"
        torch.testing.assert_close(step_logits[row], decode_logits(model, p, new[row : row + 1])[0], rtol=0, atol=1e-5)
        with torch.no_grad():
            alone = model(p).logits[0]
        torch.testing.assert_close(logits[row, 10 - p.shape[1] :], alone, rtol=0, atol=1e-5)


def test_decoding_with_the_state_equals_rerunning_the_whole_sequence(tmp_path, export_random):
    """use_cache=False re-runs every prefix without state: the state generate carries changes nothing."""
    export_random(CASES["serriform-full"], tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 256, (2, 6))
    with_state = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=256)
    without = hf.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=256)
    assert torch.equal(with_state, without)


def test_beam_search_reorders_the_state_with_its_beams(tmp_path, export_random):
    """Beam search keeps reordering the state rows; without a state every beam re-runs its whole prefix."""
    export_random(CASES["lswt-registers"], tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 256, (2, 6))
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=256)
    with_state = hf.generate(ids, **kwargs)
    assert torch.equal(with_state, hf.generate(ids, use_cache=False, **kwargs))


def test_config_holds_the_whole_family_config_and_registers_with_autoconfig(tmp_path, export_random):
    export_random(CASES["seqcond-anchors"], tmp_path / "hf")
    config = AutoConfig.from_pretrained(tmp_path / "hf")
    assert config.model_type == "seqcond" and config.size == "debug"
    assert set(config.model_config) == {f.name for f in dataclasses.fields(SeqCondConfig)}  # every field
    assert config.model_config["num_anchor_heads"] == 2
    assert config.spec().config() == CASES["seqcond-anchors"].config()
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (512, 64, 2)
    assert config.auto_map["AutoModelForCausalLM"] == "modeling_lctrain.SeqCondForCausalLM"
