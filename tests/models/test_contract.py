"""The model contract, checked for every registered architecture at its debug size."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from lctrain.models import ModelOutput, ModelState, build_model, count_parameters, list_models
from lctrain.models.contract import LanguageModel, State
from lctrain.models.registry import FAMILIES

ARCHS = sorted(FAMILIES)
B, T = 2, 13


def debug_model(arch: str, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    return build_model(arch, "debug", **overrides).to(dtype).eval()


def tokens(model, b=B, t=T, seed=1):
    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_returns_logits_state_and_named_aux_losses(arch):
    model = debug_model(arch)
    ids = tokens(model)
    out = model(ids)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (B, T, model.config.vocab_size)
    assert isinstance(out.state, ModelState)
    assert all(isinstance(k, str) and v.ndim == 0 for k, v in out.aux_losses.items())
    assert out.hidden is None
    hidden = model(ids, return_hidden=True).hidden
    assert hidden.shape[:2] == (B, T)


@pytest.mark.parametrize("arch", ARCHS)
def test_future_tokens_leave_past_logits_unchanged(arch):
    """float64; unchanged to 1e-12 (a mixture of experts may round a row of a batched matmul differently
    when later tokens change the matrix height; any real leak is many orders of magnitude larger)."""
    model = debug_model(arch, torch.float64)
    ids = tokens(model, t=24)
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % model.config.vocab_size
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prefill", [1, 5])
def test_stepwise_decoding_matches_full_forward(arch, prefill):
    """fp32; tolerance 1e-5 of the largest logit."""
    model = debug_model(arch)
    ids = tokens(model)
    full = model(ids).logits
    out = model(ids[:, :prefill])
    pieces = [out.logits]
    for t in range(prefill, T):
        out = model(ids[:, t : t + 1], state=out.state)
        pieces.append(out.logits)
    stepped = torch.cat(pieces, dim=1)
    tol = 1e-5 * full.abs().max().item()
    assert (stepped - full).abs().max().item() <= tol


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_forward_with_state_matches_full_forward(arch):
    model = debug_model(arch, torch.float64)
    ids = tokens(model, t=20)
    full = model(ids).logits
    first = model(ids[:, :7])
    second = model(ids[:, 7:], state=first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
def test_continuing_from_a_state_differs_from_starting_fresh(arch):
    model = debug_model(arch)
    ids = tokens(model)
    state = model(ids).state
    nxt = tokens(model, t=3, seed=2)
    assert not torch.allclose(model(nxt, state=state).logits, model(nxt).logits, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_does_not_mutate_the_given_state(arch):
    model = debug_model(arch)
    ids = tokens(model)
    state = model(ids).state
    snapshot = state.map_tensors(torch.clone)
    model(tokens(model, t=3, seed=2), state=state)
    flat_a, flat_b = [], []
    state.map_tensors(lambda t: flat_a.append(t) or t)
    snapshot.map_tensors(lambda t: flat_b.append(t) or t)
    assert all(torch.equal(x, y) for x, y in zip(flat_a, flat_b, strict=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_detached_state_carries_no_gradient_to_the_previous_step(arch):
    model = debug_model(arch).train()
    ids = tokens(model)
    state = model(ids).state.detach()
    grads_flow = []
    state.map_tensors(lambda t: grads_flow.append(t.requires_grad) or t)
    assert not any(grads_flow)
    model(tokens(model, t=3, seed=2), state=state).logits.sum().backward()  # no error: graph is cut


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_receives_a_finite_nonzero_gradient(arch):
    model = debug_model(arch).train()
    ids = tokens(model, b=4, t=32)
    out = model(ids)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids.roll(-1, 1).flatten())
    loss = loss + sum(out.aux_losses.values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_falls_well_below_uniform_on_a_repeated_batch(arch):
    model = debug_model(arch).train()
    ids = tokens(model, b=4, t=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        out = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        (loss + sum(out.aux_losses.values(), torch.tensor(0.0))).backward()
        optimizer.step()
    assert loss.item() < 0.3 * math.log(model.config.vocab_size)


@pytest.mark.parametrize("arch", ARCHS)
def test_model_and_state_follow_the_declared_contract(arch):
    model = debug_model(arch)
    assert isinstance(model, LanguageModel)
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) > 0
    assert isinstance(model.embed, nn.Embedding) and model.embed.num_embeddings == model.config.vocab_size
    for name, layer in model.moe_layers():
        assert model.get_submodule(name) is layer
        assert layer.tokens_per_expert.ndim == 1 and callable(layer.reset_counters)
    state = model(tokens(model)).state
    assert isinstance(state, State)
    assert isinstance(state.detach(), State) and isinstance(state.to("cpu", torch.float64), State)
    assert isinstance(state.reset_rows(torch.tensor([True, False])), State)


@pytest.mark.parametrize("arch", ARCHS)
def test_init_weights_sets_every_parameter_of_a_model_materialised_from_meta(arch):
    """What a sharded strategy relies on: storage from `to_empty` holds garbage (NaN here) until init_weights,
    which then draws the same weights from the same seed."""
    with torch.device("meta"):
        model = build_model(arch, "debug")
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(float("nan") if tensor.is_floating_point() else 7)
    torch.manual_seed(3)
    model.init_weights()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(tensor).all(), name
    again = build_model(arch, "debug")
    torch.manual_seed(3)
    again.init_weights()
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


RESET_CASES = [(arch, {}) for arch in ARCHS] + [("lswt", dict(cache_len=8, n_registers=2))]  # + XL memory


@pytest.mark.parametrize("arch,overrides", RESET_CASES, ids=[f"{a}{'-xl' if o else ''}" for a, o in RESET_CASES])
def test_a_reset_row_continues_as_a_fresh_start_and_the_other_rows_are_untouched(arch, overrides):
    """float64, 3 rows with row 1 reset, over the chunk after the reset and the one after that. Equal to
    1e-12: a mixture of experts batches row 1 with the others or alone, which rounds a matmul differently."""
    model = debug_model(arch, torch.float64, **overrides)
    past, first, second = (tokens(model, b=3, t=t, seed=s) for t, s in [(11, 1), (9, 2), (5, 3)])
    state = model(past).state
    reset = torch.tensor([False, True, False])
    reset_state = state.reset_rows(reset)
    out = model(first, state=reset_state)
    fresh, kept = model(first[1:2]), model(first, state=state)
    torch.testing.assert_close(out.logits[1:2], fresh.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.logits[[0, 2]], kept.logits[[0, 2]], rtol=0, atol=1e-12)
    assert not torch.allclose(kept.logits[1:2], fresh.logits, atol=1e-6)  # row 1's past mattered: the reset did
    out = model(second, state=out.state)
    torch.testing.assert_close(out.logits[1:2], model(second[1:2], state=fresh.state).logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.logits[[0, 2]], model(second, state=kept.state).logits[[0, 2]], rtol=0, atol=1e-12)
    torch.testing.assert_close(model(first, state=state).logits, kept.logits, rtol=0, atol=0)  # `state` unchanged


@pytest.mark.parametrize("arch,size", list_models())
def test_every_named_size_builds_on_the_meta_device(arch, size):
    with torch.device("meta"):
        model = build_model(arch, size)
    assert count_parameters(model) > 0
    assert all(p.is_meta for p in model.parameters())


def test_unknown_size_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown size 'xxxl' for lswt; choose one of: debug, tiny"):
        build_model("lswt", "xxxl")


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="unknown lswt config key 'n_layer'"):
        build_model("lswt", "debug", n_layer=3)


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="unknown architecture 'gpt'"):
        build_model("gpt")


def test_importing_models_does_not_import_lightning():
    code = "import platform, sys, lctrain.models; print('lightning' in sys.modules, 'pytorch_lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
