"""SelfExtend: the merged distances, both implementations, decoding, padding, row starts, registers and
the LSWT integration (with its trimmed XL cache and row resets).

Checks docs/architectures.md items 9-12 and 14 (13, the passkey run, needs a trained model). Float64
comparisons hold to 1e-12 and float32 ones to 1e-6 (absolute, on outputs of magnitude ~1), unless a
test says otherwise. Axes have distinct sizes (B 3, H 4, Hkv 2, T 29, S 37, Dh 6) so a swap fails.
"""

from __future__ import annotations

import logging

import pytest
import torch

from lctrain.models import build_model
from lctrain.models.layers import self_extend as self_extend_module
from lctrain.models.layers.attention import CausalSelfAttention, attention
from lctrain.models.layers.banded_attention import banded_attention, causal_window
from lctrain.models.layers.rope import query_key_positions, rotate
from lctrain.models.layers.self_extend import (
    SelfExtendConfig,
    extension_length,
    grouped_query_positions,
    merged_distances,
    self_extend_attention,
)
from tests.reference.lswt import lswt_logits
from tests.reference.self_extend import merged_distance, self_extend_reference

CASES = [(2, 4), (4, 8), (3, 8)]  # (G, W); G = 3 does not divide W = 8
IMPLEMENTATIONS = ["replacement", "two_pass"]
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


def qkv(b=3, h=4, hkv=2, t=29, s=37, dh=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, dh, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, s, dh, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, s, dh, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


# --- the merged distances ------------------------------------------------------------------------


def test_merged_distances_reproduce_the_paper_figure():
    d = merged_distances(torch.arange(10), torch.arange(10), group_size=2, window_size=4)
    assert d[-1].tolist() == [6, 6, 5, 5, 4, 4, 3, 2, 1, 0]
    expected = [[merged_distance(i, j, 2, 4) for j in range(10)] for i in range(10)]
    assert d.tolist() == expected


def test_grouped_distance_continues_from_the_window_with_an_integer_shift():
    n = 60
    for G, W, at_window in [(4, 8, {8}), (3, 8, {8, 9})]:
        d = merged_distances(torch.arange(n), torch.arange(n), group_size=G, window_size=W)
        assert not d.is_floating_point()
        i = torch.arange(W, n)
        # at i - j = W the distance is W (exactly, when G divides W), else W or W + 1: never W + 1/3
        assert set(d[i, i - W].tolist()) == at_window
        assert (d[i, i - W] == i // G + W - W // G - (i - W) // G).all()


def test_extension_length_keeps_every_distance_below_the_pretrained_context():
    # paper example of §2.2: L_pre 32, G 4, W 8 -> (32 - 8) * 4 + 8 = 104 tokens
    assert extension_length(32, 4, 8) == 104
    d = merged_distances(torch.arange(104), torch.arange(104), group_size=4, window_size=8)
    assert d.max().item() == 31
    assert grouped_query_positions(torch.tensor(103), 4, 8).item() == 31  # the largest rotation position used
    d = merged_distances(torch.arange(105), torch.arange(105), group_size=4, window_size=8)
    assert d.max().item() == 32
    # G = 3 does not divide W = 8: the paper's (32 - 8) * 3 + 8 = 80 would reach 32; ours stops at 78
    assert extension_length(32, 3, 8) == 78
    assert merged_distances(torch.arange(78), torch.arange(78), group_size=3, window_size=8).max().item() == 31
    assert merged_distances(torch.arange(80), torch.arange(80), group_size=3, window_size=8).max().item() == 32


def test_input_beyond_the_extension_length_warns_once(caplog, monkeypatch):
    monkeypatch.setattr(self_extend_module, "_warned", set())  # "once" is per process; start this test fresh
    q, k, v = qkv(b=1, h=2, hkv=2, t=1, s=105, dh=4)
    kw = dict(group_size=4, window_size=8, pretrained_len=32)
    with caplog.at_level(logging.WARNING, logger="lctrain.models.layers.self_extend"):
        self_extend_attention(q, k[:, :, :104], v[:, :, :104], **kw)
        assert not caplog.records
        self_extend_attention(q, k, v, **kw)
        self_extend_attention(q, k, v, **kw)
    assert len(caplog.records) == 1
    assert "105 tokens exceeds 104" in caplog.records[0].getMessage()
    assert SelfExtendConfig(group_size=4, window_size=8, pretrained_len=32).max_length == 104


# --- equivalences --------------------------------------------------------------------------------


@pytest.mark.parametrize("reversed", [False, True], ids=["standard", "reversed"])
@pytest.mark.parametrize("s", [1, 5, 8])
def test_window_covering_every_key_is_plain_rope_attention_bit_for_bit(s, reversed):
    q, k, v = qkv(t=min(s, 3), s=s, dtype=torch.float32)
    T = q.shape[2]
    q_pos, k_pos = query_key_positions(s - T, T, s - T, reversed=reversed)
    plain = attention(rotate(q, q_pos, 10000.0), rotate(k, k_pos, 10000.0), v)
    out = self_extend_attention(q, k, v, group_size=2, window_size=8, reversed=reversed)
    assert out.shape == (3, 4, T, 6)
    assert torch.equal(out, plain)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_both_implementations_reduce_to_plain_rope_attention_inside_the_window(implementation):
    q, k, v = qkv(t=8, s=8)
    every_key = torch.ones(3, 8, dtype=torch.bool)  # a padding mask takes the general path even inside W
    out = self_extend_attention(
        q, k, v, group_size=3, window_size=8, key_padding_mask=every_key, implementation=implementation, block_size=3
    )
    q_pos, k_pos = query_key_positions(0, 8, 0, reversed=False)
    plain = attention(rotate(q, q_pos, 10000.0), rotate(k, k_pos, 10000.0), v)
    assert max_diff(out, plain) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("reversed", [False, True], ids=["standard", "reversed"])
@pytest.mark.parametrize("G,W", CASES)
def test_replacement_and_two_pass_merges_agree(G, W, reversed, dtype):
    q, k, v = qkv(dtype=dtype)
    kw = dict(group_size=G, window_size=W, reversed=reversed)
    replacement = self_extend_attention(q, k, v, implementation="replacement", **kw)
    two_pass = self_extend_attention(q, k, v, implementation="two_pass", block_size=5, **kw)  # odd: block edges
    assert max_diff(replacement, two_pass) <= TOL[dtype]


@pytest.mark.parametrize("reversed", [False, True], ids=["standard", "reversed"])
@pytest.mark.parametrize("G,W", CASES)
def test_both_implementations_match_the_float64_loop_reference(G, W, reversed):
    q, k, v = qkv()
    kw = dict(group_size=G, window_size=W, reversed=reversed, key_offset=5)  # keys 0..4 were trimmed away
    reference = self_extend_reference(q, k, v, **kw)
    for implementation in IMPLEMENTATIONS:
        out = self_extend_attention(q, k, v, implementation=implementation, block_size=4, **kw)
        assert max_diff(out, reference) <= 1e-12, implementation


def test_non_causal_merge_mirrors_the_grouped_distances_for_keys_ahead():
    q, k, v = qkv()
    kw = dict(group_size=3, window_size=8, causal=False)
    reference = self_extend_reference(q, k, v, **kw)
    for implementation in IMPLEMENTATIONS:
        out = self_extend_attention(q, k, v, implementation=implementation, block_size=6, **kw)
        assert max_diff(out, reference) <= 1e-12, implementation


def test_reversed_mode_is_standard_rope_with_negated_angles():
    # R(-θ) = P R(θ) P with P negating the second half of each head (rotate-half layout), and P is orthogonal
    q, k, v = qkv()
    flip = torch.cat([torch.ones(3), -torch.ones(3)]).double()
    kw = dict(group_size=3, window_size=8)
    reversed_out = self_extend_attention(q, k, v, reversed=True, **kw)
    standard_out = self_extend_attention(q * flip, k * flip, v, reversed=False, **kw)
    assert max_diff(reversed_out, standard_out) <= 1e-12
    assert max_diff(reversed_out, self_extend_attention(q, k, v, **kw)) > 1e-3


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("reversed", [False, True], ids=["standard", "reversed"])
def test_decoding_one_token_at_a_time_matches_the_full_computation(reversed, implementation):
    q, k, v = qkv(t=37)
    kw = dict(group_size=3, window_size=8, reversed=reversed, implementation=implementation, block_size=5)
    full = self_extend_attention(q, k, v, **kw)
    for i in [0, 7, 8, 9, 20, 36]:
        step = self_extend_attention(q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], **kw)
        assert max_diff(step, full[:, :, i : i + 1]) <= 1e-12, i
    chunk = self_extend_attention(q[:, :, 20:], k, v, **kw)  # T = 17 queries after a cache of 20 keys
    assert max_diff(chunk, full[:, :, 20:]) <= 1e-12


def test_grouped_query_heads_equal_repeated_key_value_heads():
    q, k, v = qkv(hkv=2)
    kw = dict(group_size=2, window_size=4, block_size=8)
    shared = self_extend_attention(q, k, v, **kw)
    repeated = self_extend_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), **kw)
    assert max_diff(shared, repeated) <= 1e-12


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_left_padded_rows_match_their_unpadded_computation(implementation):
    q, k, v = qkv(b=2, t=37)
    pads = [0, 9]
    mask = torch.arange(37) >= torch.tensor(pads).unsqueeze(1)  # (2, 37): True for real tokens
    kw = dict(group_size=3, window_size=8, implementation=implementation, block_size=5)
    out = self_extend_attention(q, k, v, key_padding_mask=mask, **kw)
    alone = self_extend_attention(q[1:, :, 9:], k[1:, :, 9:], v[1:, :, 9:], **kw)
    assert max_diff(out[1:, :, 9:], alone) <= 1e-12
    assert max_diff(out[:1], self_extend_attention(q[:1], k[:1], v[:1], **kw)) <= 1e-12
    assert torch.equal(out[1, :, :9], torch.zeros_like(out[1, :, :9]))  # pad queries see nothing
    assert max_diff(out, self_extend_reference(q, k, v, group_size=3, window_size=8, pads=pads)) <= 1e-12


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_rows_count_positions_from_their_own_start_after_a_trimmed_past(implementation):
    """Keys 0..4 were trimmed away (key_offset 5). Row 1 hides its first 4 keys, so it began at absolute
    position 9, its first visible key; row 2 hides none but began at 4, before the keys the cache still
    holds, which only `stream_start` can say. Counted from a wrong origin (5 and 4 off: the trimmed count,
    or 0), G = 3 groups the keys differently."""
    q, k, v = qkv(t=29, s=37)
    mask = torch.arange(37) >= torch.tensor([0, 4, 0]).unsqueeze(1)  # (3, 37)
    kw = dict(group_size=3, window_size=8, key_offset=5, key_padding_mask=mask)
    ref = dict(group_size=3, window_size=8, key_offset=5, pads=[0, 4, 0])
    derived = self_extend_attention(q, k, v, implementation=implementation, block_size=5, **kw)
    assert max_diff(derived, self_extend_reference(q, k, v, starts=[0, 9, 0], **ref)) <= 1e-12
    starts = torch.tensor([0, 9, 4])
    given = self_extend_attention(q, k, v, stream_start=starts, implementation=implementation, block_size=5, **kw)
    assert max_diff(given, self_extend_reference(q, k, v, starts=[0, 9, 4], **ref)) <= 1e-12
    assert max_diff(given[2], derived[2]) > 1e-3  # row 2's start changes its grouped distances


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("reversed", [False, True], ids=["standard", "reversed"])
def test_registers_join_the_softmax_without_positions(reversed, implementation):
    """Registers (Hkv 2, R 3) against the float64 reference, with a trimmed past and a padded row; the pad
    queries of that row see only the registers."""
    q, k, v = qkv(t=29, s=37)
    g = torch.Generator().manual_seed(5)
    reg_k, reg_v = torch.randn(2, 3, 6, generator=g, dtype=torch.float64), torch.randn(2, 3, 6, generator=g).double()
    mask = torch.arange(37) >= torch.tensor([0, 11, 0]).unsqueeze(1)  # (3, 37): row 1's first 11 keys are pads
    kw = dict(group_size=3, window_size=8, reversed=reversed, key_offset=5)
    out = self_extend_attention(
        q, k, v, key_padding_mask=mask, register_keys=reg_k, register_values=reg_v,
        implementation=implementation, block_size=5, **kw,
    )  # fmt: skip
    expected = self_extend_reference(q, k, v, pads=[0, 11, 0], register_keys=reg_k, register_values=reg_v, **kw)
    assert max_diff(out, expected) <= 1e-12
    without = self_extend_attention(q, k, v, key_padding_mask=mask, implementation=implementation, **kw)
    assert max_diff(out, without) > 1e-3
    assert out[1, :, :3].abs().min() > 0  # row 1's pad queries (keys 8..10) attend to the registers


def test_registers_take_the_general_path_and_agree_inside_the_window():
    """Inside the window SelfExtend is plain RoPE; with registers it is plain RoPE plus the registers, and
    both implementations give one result. float64, 1e-12."""
    q, k, v = qkv(t=5, s=8)
    reg_k, reg_v = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(2, 4, 6, dtype=torch.float64)
    kw = dict(group_size=2, window_size=8, register_keys=reg_k, register_values=reg_v)
    outs = [self_extend_attention(q, k, v, implementation=impl, **kw) for impl in IMPLEMENTATIONS]
    assert max_diff(outs[0], outs[1]) <= 1e-12
    assert max_diff(outs[0], self_extend_reference(q, k, v, **kw)) <= 1e-12


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_future_keys_leave_earlier_outputs_unchanged(implementation):
    q, k, v = qkv(t=37)
    kw = dict(group_size=3, window_size=8, implementation=implementation, block_size=5)
    changed_k, changed_v = k.clone(), v.clone()
    changed_k[:, :, 20:] += 3.0
    changed_v[:, :, 20:] -= 2.0
    a, b = self_extend_attention(q, k, v, **kw), self_extend_attention(q, changed_k, changed_v, **kw)
    assert torch.equal(a[:, :, :20], b[:, :, :20])
    assert max_diff(a[:, :, 20:], b[:, :, 20:]) > 1e-3


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("t,s", [(1, 1), (1, 12), (3, 3), (3, 12)])
def test_single_queries_and_inputs_shorter_than_the_window_work(b, t, s):
    q, k, v = qkv(b=b, t=t, s=s)
    kw = dict(group_size=2, window_size=6)
    for implementation in IMPLEMENTATIONS:
        out = self_extend_attention(q, k, v, implementation=implementation, **kw)
        assert out.shape == (b, 4, t, 6)
        assert max_diff(out, self_extend_reference(q, k, v, **kw)) <= 1e-12


def test_invalid_inputs_get_one_line_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="implementation='dense' is unknown"):
        self_extend_attention(q, k, v, group_size=2, window_size=4, implementation="dense")
    with pytest.raises(ValueError, match="left padding"):
        mask = torch.ones(3, 37, dtype=torch.bool)
        mask[0, 30] = False
        self_extend_attention(q, k, v, group_size=2, window_size=4, key_padding_mask=mask)
    with pytest.raises(ValueError, match="queries T=37 at most keys S=29"):
        self_extend_attention(k.repeat(1, 2, 1, 1), q[:, :2], q[:, :2], group_size=2, window_size=4)
    with pytest.raises(ValueError, match=r"stream_start must be integer \(B,\) = \(3,\)"):
        self_extend_attention(q, k, v, group_size=2, window_size=4, stream_start=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="register_keys and register_values go together"):
        self_extend_attention(q, k, v, group_size=2, window_size=4, register_keys=k[0, :, :3])
    with pytest.raises(ValueError, match=r"must both be \(Hkv, R, Dh\) with Hkv=2, Dh=6"):
        self_extend_attention(q, k, v, group_size=2, window_size=4, register_keys=q[0], register_values=q[0])


# --- the banded kernel ---------------------------------------------------------------------------


@pytest.mark.parametrize("lo,hi", [(-7, 0), (None, -8), (-3, 4), (8, None), (None, None)])
def test_banded_kernel_matches_dense_masked_softmax_and_its_logsumexp(lo, hi):
    q, k, v = qkv(t=29, s=37)
    key_mask = torch.rand(3, 37, generator=torch.Generator().manual_seed(3)) > 0.2
    out, lse = banded_attention(q, k, v, lo=lo, hi=hi, key_mask=key_mask, block_size=6)
    offset = torch.arange(37) - torch.arange(8, 37).unsqueeze(1)  # (T, S): j - i, queries at keys 8..36
    visible = torch.ones_like(offset, dtype=torch.bool)
    visible &= offset >= (lo if lo is not None else -99)
    visible &= offset <= (hi if hi is not None else 99)
    visible = visible & key_mask[:, None, None, :]  # (B, 1, T, S)
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 6**0.5
    scores = scores.masked_fill(~visible, float("-inf"))
    expected_lse = scores.logsumexp(-1)
    expected = (scores.softmax(-1).nan_to_num(0.0)) @ v.repeat_interleave(2, 1)
    assert torch.equal(lse == float("-inf"), expected_lse == float("-inf"))
    finite = expected_lse > float("-inf")
    assert max_diff(lse[finite], expected_lse[finite]) <= 1e-12
    assert max_diff(out, expected) <= 1e-12


@pytest.mark.parametrize("lo,hi", [(-7, 0), (None, -8), (-9, -3), (None, -40)])
def test_causal_bands_translate_to_a_bottom_right_causal_window(lo, hi):
    """The call the flash-attn path makes: keys [0, S + hi), the last queries, a left window."""
    q, k, v = qkv(t=29, s=37)
    out, lse = banded_attention(q, k, v, lo=lo, hi=hi, block_size=7)
    n_q, n_k, left = causal_window(29, 37, lo, hi)
    assert (lse[:, :, : 29 - n_q] == float("-inf")).all()
    if n_q:
        window_out, window_lse = banded_attention(
            q[:, :, 29 - n_q :], k[:, :, :n_k], v[:, :, :n_k], lo=None if left < 0 else -left, hi=0
        )
        assert max_diff(window_out, out[:, :, 29 - n_q :]) <= 1e-12
        assert max_diff(window_lse, lse[:, :, 29 - n_q :]) <= 1e-12


def test_flash_backend_without_flash_attn_names_the_fix():
    q, k, v = qkv(dtype=torch.float32)
    with pytest.raises(ImportError, match="needs flash-attn, a CUDA GPU"):
        self_extend_attention(q, k, v, group_size=2, window_size=4, backend="flash")


# --- configuration and the LSWT integration ------------------------------------------------------


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(group_size=0, window_size=4), "model.self_extend.group_size=0 must be >= 1"),
        (dict(group_size=2, window_size=64, pretrained_len=64), "window_size=64 must be smaller than pretrained_len"),
        (dict(group_size=2, window_size=4, implementation="dense"), "implementation='dense' is unknown"),
    ],
)
def test_invalid_self_extend_config_names_the_key(fields, message):
    with pytest.raises(ValueError, match=message):
        SelfExtendConfig(**fields)


def test_lswt_config_accepts_a_dict_and_names_bad_keys():
    model = build_model("lswt", "debug", self_extend={"group_size": 2, "window_size": 4})
    assert model.config.self_extend == SelfExtendConfig(group_size=2, window_size=4)
    assert all(b.attention.self_extend is model.config.self_extend for b in model.blocks)
    with pytest.raises(ValueError, match="unknown model.self_extend key 'group'"):
        build_model("lswt", "debug", self_extend={"group": 2, "window_size": 4})
    with pytest.raises(ValueError, match="model.self_extend needs window_size"):
        build_model("lswt", "debug", self_extend={"group_size": 2})


def lswt_pair(dtype=torch.float32, **overrides):
    return model_pair("lswt", dtype, **overrides)


def lswt_ids(t, seed=1):
    return torch.randint(0, 512, (2, t), generator=torch.Generator().manual_seed(seed))


def model_pair(arch, dtype=torch.float32, **overrides):
    """A debug model of `arch` without and with SelfExtend, same weights."""
    torch.manual_seed(0)
    plain = build_model(arch, "debug", **overrides).to(dtype).eval()
    extended = build_model(arch, "debug", self_extend={"group_size": 2, "window_size": 8}, **overrides)
    extended.load_state_dict(plain.state_dict(), strict=True)  # no new parameters or buffers
    return plain, extended.to(dtype).eval()


@pytest.mark.parametrize(
    "arch,overrides",
    [("lswt", {"rope_reversed": True}), ("lswt", {"rope_reversed": False}), ("seqcond", {})],
    ids=["lswt-reversed", "lswt-standard", "seqcond"],
)
def test_self_extend_inside_the_window_gives_identical_logits(arch, overrides):
    plain, extended = model_pair(arch, **overrides)
    ids = lswt_ids(8)
    assert torch.equal(extended(ids).logits, plain(ids).logits)
    a, b = plain(ids[:, :5]), extended(ids[:, :5])
    assert torch.equal(extended(ids[:, 5:], state=b.state).logits, plain(ids[:, 5:], state=a.state).logits)
    assert set(extended.state_dict()) == set(plain.state_dict())


@pytest.mark.parametrize(
    "arch,overrides",
    [("lswt", {}), ("lswt", {"n_registers": 4}), ("seqcond", {})],
    ids=["lswt", "registers", "seqcond"],
)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("prefill", [1, 9])
def test_self_extend_decoding_matches_full_forward(prefill, implementation, arch, overrides):
    """fp32; tolerance 1e-5 of the largest logit, as the model contract."""
    torch.manual_seed(0)
    se = dict(group_size=3, window_size=4, implementation=implementation)
    model = build_model(arch, "debug", self_extend=se, **overrides)
    model.eval()
    ids = lswt_ids(21)
    full = model(ids).logits
    out = model(ids[:, :prefill])
    pieces = [out.logits]
    for t in range(prefill, 21):
        out = model(ids[:, t : t + 1], state=out.state)
        pieces.append(out.logits)
    assert max_diff(torch.cat(pieces, dim=1), full) <= 1e-5 * full.abs().max().item()


def test_lswt_self_extend_changes_only_the_logits_past_the_window():
    plain, extended = lswt_pair(torch.float64, init_std=0.2)  # sharper attention than the default init
    ids = lswt_ids(24)
    a, b = plain(ids).logits, extended(ids).logits
    assert max_diff(a[:, :8], b[:, :8]) <= 1e-12  # every key within W = 8: the same distances
    assert max_diff(a[:, 8:], b[:, 8:]) > 1e-3 * a.abs().max().item()


@pytest.mark.parametrize("arch", ["lswt", "seqcond"])
def test_self_extend_model_is_causal(arch):
    _, model = model_pair(arch, torch.float64)
    ids = lswt_ids(24)
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % 512
    a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[:, :12], b[:, :12])
    assert max_diff(a[:, 12:], b[:, 12:]) > 1e-6


# A small LSWT whose every axis differs (D 24, 3 heads of 8, F 40, d_vocab 20, V 37, 2 layers), with a
# large init so attention is sharp and a misplaced position shows in the logits.
SMALL_LSWT = dict(vocab_size=37, d_vocab=20, d_model=24, n_heads=3, d_ff=40, n_layers=2, rope_base=100.0, init_std=0.2)


def small_lswt(**overrides):
    torch.manual_seed(0)
    return build_model("lswt", "debug", **{**SMALL_LSWT, **overrides}).double().eval()


def lswt_reference(model, ids, *, segment=None, cache_len=0):
    """float64 logits (T, V) of one stream from its start, fed in segments of `segment` tokens (None: one
    call) after which the cache keeps the newest `cache_len` keys (0: all), with SelfExtend's distances."""
    G, W = model.config.self_extend.group_size, model.config.self_extend.window_size
    sign = -1.0 if model.config.rope_reversed else 1.0

    def visible(i, j):
        return j <= i and (segment is None or not cache_len or j >= i // segment * segment - cache_len)

    return lswt_logits(model, ids, angle_sign=sign, visible=visible, distance=lambda i, j: merged_distance(i, j, G, W))


@pytest.mark.parametrize("n_registers", [0, 2], ids=["plain", "registers"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_lswt_xl_segments_with_a_reset_row_match_fresh_float64_references(implementation, n_registers):
    """Five segments of 7 tokens, cache_len 9, row 0 reset before segment 2 (position 14; G = 3 divides
    neither 14 nor the trimmed count 5). The reset row must equal a fresh run on its tokens since the
    reset, trimmed the same way: in segment 2 its hidden past is still cached, from segment 4 on it has
    been trimmed away. Row 1 is one stream from 0. float64, atol 1e-10 (measured ~1e-15)."""
    L, C = 7, 9
    se = dict(group_size=3, window_size=4, implementation=implementation, block_size=4)
    model = small_lswt(cache_len=C, n_registers=n_registers, self_extend=se)
    ids = torch.randint(0, 37, (2, 5 * L), generator=torch.Generator().manual_seed(1))
    state, pieces, masked = None, [], []
    for s in range(5):
        if s == 2:
            state = state.reset_rows(torch.tensor([True, False]))
        masked.append(state is not None and state.layers[0].valid is not None)
        out = model(ids[:, s * L : (s + 1) * L], state=state)
        pieces.append(out.logits)
        state = out.state
    assert masked == [False, False, True, True, False]  # both phases of the reset row are exercised
    got = torch.cat(pieces, dim=1)  # (2, 35, V)
    kw = dict(segment=L, cache_len=C)
    torch.testing.assert_close(got[0, :14], lswt_reference(model, ids[0, :14].tolist(), **kw), rtol=0, atol=1e-10)
    torch.testing.assert_close(got[0, 14:], lswt_reference(model, ids[0, 14:].tolist(), **kw), rtol=0, atol=1e-10)
    torch.testing.assert_close(got[1], lswt_reference(model, ids[1].tolist(), **kw), rtol=0, atol=1e-10)


@pytest.mark.parametrize("rope_reversed", [True, False], ids=["reversed", "standard"])
def test_lswt_with_registers_and_self_extend_matches_the_float64_reference(rope_reversed):
    """Registers score against the un-rotated query, tokens by their merged distances. float64, 1e-10."""
    model = small_lswt(n_registers=3, rope_reversed=rope_reversed, self_extend=dict(group_size=3, window_size=4))
    ids = torch.randint(0, 37, (2, 20), generator=torch.Generator().manual_seed(2))
    expected = torch.stack([lswt_reference(model, row.tolist()) for row in ids])
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-10)
    with torch.no_grad():
        model.blocks[0].attention.register_values.mul_(3.0)
    assert (model(ids).logits - expected).abs().max() > 1e-3  # the registers are part of the sum


def test_lswt_with_registers_inside_the_window_equals_plain_attention_with_registers():
    plain, extended = lswt_pair(torch.float64, n_registers=4)
    ids = lswt_ids(8)
    assert max_diff(extended(ids).logits, plain(ids).logits) <= 1e-12


def test_named_size_with_its_registers_runs_with_self_extend():
    """LSWT tiny (16 registers per layer, 153M parameters) builds and runs with SelfExtend; one decoding step
    after a 23-token prefill equals the last position of a 24-token forward (fp32, 1e-5 of the largest logit)."""
    torch.manual_seed(0)
    model = build_model("lswt", "tiny", self_extend={"group_size": 4, "window_size": 8}).eval()
    assert model.config.n_registers == 16 and model.blocks[0].attention.self_extend is model.config.self_extend
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        step = model(ids[:, 23:], state=model(ids[:, :23]).state).logits
    assert full.shape == (1, 24, model.config.vocab_size) and full.isfinite().all()
    assert max_diff(step[:, 0], full[:, 23]) <= 1e-5 * full.abs().max().item()


def test_attention_state_holds_unrotated_keys_with_self_extend_on():
    config = SelfExtendConfig(group_size=2, window_size=4)
    layer = CausalSelfAttention(24, 4, 2, self_extend=config).double()
    x = torch.randn(3, 11, 24, dtype=torch.float64)
    _, state = layer(x)
    raw = layer.key(x).view(3, 11, 2, 6).transpose(1, 2)  # (B, Hkv, T, Dh)
    assert torch.equal(state.keys, raw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("registers", [False, True], ids=["tokens", "registers"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_cuda_matches_cpu(implementation, registers):
    """fp32 on the GPU within 1e-5 of the CPU; bf16 within 3e-2 (8 mantissa bits). With registers the
    bf16 two-pass path merges flash-attn's passes with the registers' torch pass."""
    q, k, v = qkv(t=200, s=300, dtype=torch.float32)
    kw = dict(group_size=4, window_size=32, implementation=implementation, block_size=64)
    reg_k = reg_v = None
    if registers:
        reg_k, reg_v = k[0, :, :5].clone(), v[0, :, :5].clone()  # (Hkv, R, Dh)
    cpu = self_extend_attention(q, k, v, register_keys=reg_k, register_values=reg_v, **kw)

    def on_gpu(t, dtype=torch.float32):
        return None if t is None else t.cuda().to(dtype)

    gpu = self_extend_attention(
        on_gpu(q), on_gpu(k), on_gpu(v), register_keys=on_gpu(reg_k), register_values=on_gpu(reg_v), **kw
    )
    assert max_diff(gpu.cpu(), cpu) <= 1e-5
    bf16 = [on_gpu(t, torch.bfloat16) for t in (q, k, v, reg_k, reg_v)]
    half = self_extend_attention(*bf16[:3], register_keys=bf16[3], register_values=bf16[4], **kw)
    assert half.dtype == torch.bfloat16
    assert max_diff(half.float().cpu(), cpu) <= 3e-2
