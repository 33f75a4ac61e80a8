"""The attention layer's fast paths compute what the plain computation does (float64).

Registers are merged with the tokens' fused attention by log-sum-exp instead of one softmax over a
widened query (tests/reference/register_attention.py keeps that computation); the KV state holds keys
rotated once and grows into spare capacity instead of re-rotating and re-copying the cache per token.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lctrain.models import build_model
from lctrain.models.layers import attention as attention_module
from lctrain.models.layers.attention import CausalSelfAttention, KVState
from lctrain.models.layers.self_extend import SelfExtendConfig
from lctrain.models.output import state_from_tree, state_to_tree
from tests.reference.register_attention import old_register_attention

D, H, BASE = 24, 4, 100.0

# (call lengths, cache_len): one forward, Transformer-XL segments, decoding, decoding with a trimmed cache
SCHEDULES = {
    "forward": ([12], 0),
    "xl": ([9, 6, 5], 7),
    "decoding": ([6] + [1] * 8, 0),
    "decoding-xl": ([6] + [1] * 8, 5),
}


def layer_of(n_kv_heads=H, reversed=True, n_registers=3, **kwargs) -> CausalSelfAttention:
    torch.manual_seed(0)
    layer = CausalSelfAttention(
        D, H, n_kv_heads, bias=True, rope_base=BASE, rope_reversed=reversed, n_registers=n_registers, **kwargs
    )
    return layer.double()


def heads(t: torch.Tensor, n: int) -> torch.Tensor:
    B, T, _ = t.shape
    return t.view(B, T, n, -1).transpose(1, 2)  # (B, n, T, Dh)


def run_schedule(layer, x, lengths, cache_len, reset_after_first=None):
    """The layer's outputs over the calls, and the old computation's for the same calls (B, T, D) each."""
    Hkv = layer.n_kv_heads
    state, got, expected = None, [], []
    raw_k = raw_v = valid = None  # the old computation's cache: un-rotated keys
    offset = 0
    for n in lengths:
        xs = x[:, offset : offset + n]
        y, state = layer(xs, state, offset)
        got.append(y)
        q, k, v = heads(layer.query(xs), H), heads(layer.key(xs), Hkv), heads(layer.value(xs), Hkv)
        n_cached = 0 if raw_k is None else raw_k.shape[2]
        if raw_k is not None:
            k, v = torch.cat([raw_k, k], dim=2), torch.cat([raw_v, v], dim=2)
            valid = None if valid is None else torch.cat([valid, valid.new_ones(x.shape[0], n)], dim=1)
        out = old_register_attention(
            q, k, v, layer.register_keys, layer.register_values, n_cached=n_cached, offset=offset,
            reversed=layer.rope_reversed, base=BASE, valid=valid,
        )  # fmt: skip
        expected.append(layer.out(out.transpose(1, 2).flatten(2)))
        raw_k, raw_v = k, v
        if cache_len:
            state = state.trim(cache_len)
            raw_k, raw_v = raw_k[:, :, -cache_len:], raw_v[:, :, -cache_len:]
            valid = None if valid is None else valid[:, -cache_len:]
        if reset_after_first is not None and offset == 0:
            state = state.reset_rows(reset_after_first)
            valid = torch.ones(x.shape[0], raw_k.shape[2], dtype=torch.bool) & ~reset_after_first[:, None]
        offset += n
    return torch.cat(got, dim=1), torch.cat(expected, dim=1)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("n_kv_heads", [H, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("reversed", [True, False], ids=["reversed", "standard"])
def test_registers_merged_by_lse_equal_the_old_joint_softmax(schedule, n_kv_heads, reversed):
    layer = layer_of(n_kv_heads, reversed)
    x = torch.randn(2, 30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, expected = run_schedule(layer, x, *SCHEDULES[schedule])
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-12


@pytest.mark.parametrize("schedule", ["xl", "decoding"])
def test_a_reset_row_with_registers_equals_the_old_computation_with_its_past_hidden(schedule):
    layer = layer_of()
    x = torch.randn(2, 30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, expected = run_schedule(layer, x, *SCHEDULES[schedule], reset_after_first=torch.tensor([True, False]))
    assert (got - expected).abs().max() <= 1e-12


@pytest.mark.parametrize("schedule", ["forward", "decoding"])
def test_the_widened_query_path_off_cpu_equals_the_old_joint_softmax(schedule, monkeypatch):
    """Off CPU (no fused kernel returns its lse with gradients there) the registers join the shared kernel
    through a widened query: run that path here."""
    monkeypatch.setattr(attention_module, "FUSED_REGISTER_DEVICES", ())
    layer = layer_of(n_kv_heads=2)
    x = torch.randn(2, 30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, expected = run_schedule(layer, x, *SCHEDULES[schedule])
    assert (got - expected).abs().max() <= 1e-12


@pytest.mark.parametrize("implementation", ["two_pass", "replacement"])
@pytest.mark.parametrize("schedule", ["forward", "decoding"])
def test_self_extend_inside_its_window_with_registers_equals_the_old_joint_softmax(implementation, schedule):
    """Every key inside the window: SelfExtend's register merge is the old computation."""
    config = SelfExtendConfig(group_size=2, window_size=64, implementation=implementation)
    layer = layer_of(self_extend=config)
    x = torch.randn(2, 30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got, expected = run_schedule(layer, x, *SCHEDULES[schedule])
    assert (got - expected).abs().max() <= 1e-12


@pytest.mark.parametrize(
    "lengths,cache_len,n_kv_heads,reset",
    [([12], 0, H, False), ([9, 5], 7, H, False), ([9, 5], 7, 2, True)],
    ids=["forward", "xl", "xl-gqa-reset"],
)
def test_gradients_through_the_fused_merge_equal_the_old_ones(lengths, cache_len, n_kv_heads, reset):
    """The custom backward (the kernel's, fed the joint output and lse, plus the registers' block) gives the
    gradients autograd gives through the old computation, for every parameter and the input."""
    layer = layer_of(n_kv_heads)
    x = torch.randn(2, sum(lengths), D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x.requires_grad_(True)
    weights = torch.randn(2, sum(lengths), D, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    rows = torch.tensor([True, False]) if reset else None
    got, expected = run_schedule(layer, x, lengths, cache_len, reset_after_first=rows)
    inputs = [x, *layer.parameters()]
    grads_got = torch.autograd.grad((got * weights).sum(), inputs)
    grads_expected = torch.autograd.grad((expected * weights).sum(), inputs)
    for name, a, b in zip(["x", *(n for n, _ in layer.named_parameters())], grads_got, grads_expected, strict=True):
        assert (a - b).abs().max() <= 1e-11, name


def seed_like_model(**overrides):
    torch.manual_seed(0)
    small = dict(vocab_size=37, d_vocab=20, d_model=24, n_heads=3, d_ff=40, n_layers=2, rope_base=100.0)
    return build_model("lswt", "debug", **{**small, "n_registers": 3, "init_std": 0.2, **overrides}).double().eval()


@pytest.mark.parametrize("rope_reversed", [True, False], ids=["reversed", "standard"])
def test_decoding_300_tokens_with_the_growing_state_equals_the_full_forward(rope_reversed):
    """300 one-token calls after a 10-token prefill give the full forward's logits; the state's keys live
    in a few buffers that double (not one copy of the cache per token)."""
    model = seed_like_model(rope_reversed=rope_reversed)
    ids = torch.randint(0, 37, (2, 310), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :10])
        steps, buffers = [out.logits], set()
        for t in range(10, 310):
            out = model(ids[:, t : t + 1], state=out.state)
            steps.append(out.logits)
            buffers.add(out.state.layers[0].keys.untyped_storage().data_ptr())
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-10 * full.abs().max()
    assert len(buffers) <= 7  # capacities 22, 46, 94, 190, 382 (and a prefix) instead of 300 copies


def test_a_state_continued_twice_keeps_both_continuations_apart():
    """Two continuations of one state: the second cannot write over the first's tokens in the shared buffer."""
    model = seed_like_model()
    ids = torch.randint(0, 37, (1, 20), generator=torch.Generator().manual_seed(8))
    other = (ids + 5) % 37
    with torch.no_grad():
        state = model(ids[:, :10]).state
        state = model(ids[:, 10:11], state=state).state  # now in a buffer with spare room
        a = model(ids[:, 11:12], state=state)
        b = model(other[:, 11:12], state=state)
        a_next = model(ids[:, 12:13], state=a.state).logits
        b_next = model(other[:, 12:13], state=b.state).logits
        expected_a = model(ids[:, :13]).logits[:, -1:]
        expected_b = model(torch.cat([ids[:, :11], other[:, 11:13]], dim=1)).logits[:, -1:]
    assert (a_next - expected_a).abs().max() <= 1e-10
    assert (b_next - expected_b).abs().max() <= 1e-10


def test_a_state_with_unrotated_keys_continues_as_the_rotated_one():
    """A state saved before keys were stored rotated (rotary_base None) is converted on its next call."""
    model = seed_like_model()
    ids = torch.randint(0, 37, (2, 16), generator=torch.Generator().manual_seed(9))
    layer = model.blocks[0].attention
    with torch.no_grad():
        first = model(ids[:, :12])
        unrotated = []
        for kv in first.state.layers:
            positions = torch.arange(12)  # absolute positions; reversed RoPE rotated them by -p
            keys = attention_module.rotate(kv.keys, positions, layer.rope_base)
            unrotated.append(KVState(keys, kv.values))
        old_state = dataclasses.replace(first.state, layers=unrotated)
        got = model(ids[:, 12:], state=old_state).logits
        expected = model(ids[:, 12:], state=first.state).logits
    assert (got - expected).abs().max() <= 1e-12 * expected.abs().max()


def test_a_saved_state_leaves_out_the_buffer_bookkeeping_and_continues_the_same():
    model = seed_like_model()
    ids = torch.randint(0, 37, (1, 14), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        state = model(ids[:, :10]).state
        state = model(ids[:, 10:11], state=state).state
        assert state.layers[0].tail is not None
        tree = state_to_tree(state)
        assert "tail" not in tree["layers"][0]
        restored = state_from_tree(tree)
        got = model(ids[:, 11:], state=restored).logits
        expected = model(ids[:, 11:], state=state).logits
    assert torch.equal(got, expected)
