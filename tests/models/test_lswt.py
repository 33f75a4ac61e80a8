"""LSWT: the float64 reference, the XL cache, reversed and scaled RoPE, registers, row resets, sizes
(docs/architectures.md and the acceptance checks §5 items 15-20 and 23)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lctrain.models import build_model, config_for, count_parameters
from lctrain.models.layers.attention import attention
from lctrain.models.layers.rope import RotaryScaling
from lctrain.models.lswt import SEED_NAMES, LSWTConfig
from tests.reference.lswt import lswt_logits

# A small model whose every axis differs: D 24, 3 heads of 8, F 40, d_vocab 20, V 37, 2 layers.
SMALL = dict(vocab_size=37, d_vocab=20, d_model=24, n_heads=3, d_ff=40, n_layers=2, rope_base=100.0, init_std=0.2)


def small_model(dtype=torch.float64, **overrides):
    torch.manual_seed(0)
    return build_model("lswt", "debug", **{**SMALL, **overrides}).to(dtype).eval()


def ids_of(t, b=2, seed=1, vocab=37):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


# --- the reference -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(n_registers=3),
        dict(rope_reversed=False, n_registers=2, qk_norm=True),
        dict(bias=False, qk_norm=True),
    ],
    ids=["reversed", "registers", "standard-registers-qknorm", "nobias-qknorm"],
)
def test_full_forward_matches_the_float64_reference(overrides):
    """Reversed RoPE is the reference's standard rotation with negated angles. Tolerance 1e-10."""
    model = small_model(**overrides)
    with torch.no_grad():
        for block in model.blocks:  # non-trivial norms and registers, so a swapped weight shows
            for p in [*block.attention_norm.parameters(), *block.attention.parameters()]:
                if p.ndim == 1 or p.ndim == 3:
                    p.add_(0.3 * torch.randn_like(p))
    ids = ids_of(9)
    sign = -1.0 if model.config.rope_reversed else 1.0
    expected = torch.stack([lswt_logits(model, row.tolist(), angle_sign=sign) for row in ids])
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-10)


def test_reversed_rope_is_shift_invariant_and_differs_from_forward_rope():
    """§5.18: every position shifted by 7 leaves the logits unchanged (≤1e-10, float64); the same
    weights under forward RoPE give different logits."""
    model = small_model()
    ids = ids_of(12, b=1)[0].tolist()
    shifted = lswt_logits(model, ids, positions=[p + 7 for p in range(12)], angle_sign=-1.0)
    torch.testing.assert_close(model(torch.tensor([ids])).logits[0], shifted, rtol=0, atol=1e-10)
    forward = small_model(rope_reversed=False)
    assert (forward(torch.tensor([ids])).logits - shifted).abs().max() > 1e-4


def test_reversed_rope_matches_negated_angles_in_float32():
    """§5.18 in the model's default precision: ≤1e-6 of the largest logit."""
    model = small_model(torch.float32, init_std=0.02)
    ids = ids_of(16, b=1)[0].tolist()
    expected = lswt_logits(model, ids, angle_sign=-1.0)
    got = model(torch.tensor([ids])).logits[0].double()
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()


# --- the Transformer-XL cache ----------------------------------------------------------------------
@pytest.mark.parametrize("n_registers", [0, 3])
def test_split_forward_with_the_cache_matches_one_forward(n_registers):
    """§5.15: forward(0:10) then forward(10:24, state) equals forward(0:24), fp32, ≤1e-6 of max |logit|."""
    model = small_model(torch.float32, n_registers=n_registers)
    ids = ids_of(24)
    full = model(ids).logits
    first = model(ids[:, :10])
    second = model(ids[:, 10:], state=first.state)
    split = torch.cat([first.logits, second.logits], dim=1)
    assert (split - full).abs().max() <= 1e-6 * full.abs().max()


def test_trimmed_cache_attends_to_the_last_cached_keys_and_the_segment_causally():
    """§5.15: with cache_len 4 the second segment sees keys 6..9 of the first plus its own causal keys."""
    model = small_model(cache_len=4, n_registers=2)
    ids = ids_of(24, b=1)
    first = model(ids[:, :10])
    assert first.state.layers[0].length == 4
    second = model(ids[:, 10:], state=first.state)
    visible = lambda i, j: j <= i and (i < 10 or j >= 6)  # noqa: E731
    expected = lswt_logits(model, ids[0].tolist(), angle_sign=-1.0, visible=visible)
    got = torch.cat([first.logits, second.logits], dim=1)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_the_cache_holds_keys_rotated_once_at_their_negated_absolute_positions():
    """§5.17: keys (B, H, T, Dh) are the key projection of the normed layer input, rotated once by reversed
    RoPE's angles at their absolute positions (standard RoPE at -p), so later calls never re-rotate them."""
    model = small_model()
    ids = ids_of(11)
    state = model(ids).state
    h0 = model.input_norm(model.input_proj(model.embed(ids)))
    attn = model.blocks[0].attention
    raw = attn.key(model.blocks[0].attention_norm(h0)).view(2, 11, 3, 8).transpose(1, 2)  # (B, H, T, Dh)
    frequencies = 100.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)  # (Dh/2,)
    angles = -torch.arange(11, dtype=torch.float64)[:, None] * frequencies  # (T, Dh/2)
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)  # rotate-half pairs i and i + Dh/2
    expected = raw * cos + torch.cat([-raw[..., 4:], raw[..., :4]], dim=-1) * sin
    assert state.layers[0].keys.shape == (2, 3, 11, 8)
    assert (state.layers[0].rotary_base, state.layers[0].rotary_sign) == (100.0, -1)
    torch.testing.assert_close(state.layers[0].keys, expected, rtol=0, atol=1e-12)


def test_a_cache_reused_at_a_later_length_gives_what_recomputing_gives():
    """§5.17: a cache made at length 10 serves a 3-token call and then a 7-token call (their positions
    all shift, since RoPE is re-applied to the whole key sequence) as one 20-token forward would."""
    model = small_model(n_registers=2)
    ids = ids_of(20)
    out = model(ids[:, :10])
    out2 = model(ids[:, 10:13], state=out.state)
    out3 = model(ids[:, 13:], state=out2.state)
    torch.testing.assert_close(out3.logits, model(ids).logits[:, 13:], rtol=0, atol=1e-10)


# --- registers -------------------------------------------------------------------------------------
def test_registers_are_visible_to_the_first_query_and_never_cached():
    """§5.19: changing the register values changes token 0's output; the state holds only tokens."""
    model = small_model(n_registers=3)
    ids = ids_of(5)
    before = model(ids)
    with torch.no_grad():
        model.blocks[0].attention.register_values.mul_(5.0)
    after = model(ids)
    assert (before.logits[:, 0] - after.logits[:, 0]).abs().max() > 1e-3
    assert all(kv.length == 5 for kv in before.state.layers)


@pytest.mark.parametrize("rope_reversed", [True, False])
def test_register_scores_do_not_depend_on_the_tokens_that_follow(rope_reversed):
    """§5.19, the original's defect fixed: tokens 0..9 agree between a 10-token and a 24-token call."""
    model = small_model(torch.float32, n_registers=4, rope_reversed=rope_reversed, init_std=0.02)
    ids = ids_of(24)
    short, long = model(ids[:, :10]).logits, model(ids).logits[:, :10]
    assert (short - long).abs().max() <= 1e-6 * long.abs().max()


@pytest.mark.parametrize("prefill", [1, 6])
def test_decoding_with_registers_matches_the_full_forward(prefill):
    """§5.16 with registers on: prefill then one token per call, fp32, ≤1e-5 of max |logit|."""
    model = small_model(torch.float32, n_registers=4, init_std=0.02)
    ids = ids_of(15)
    full = model(ids).logits
    out = model(ids[:, :prefill])
    pieces = [out.logits]
    for t in range(prefill, 15):
        out = model(ids[:, t : t + 1], state=out.state)
        pieces.append(out.logits)
    assert (torch.cat(pieces, 1) - full).abs().max() <= 1e-5 * full.abs().max()


def test_future_tokens_leave_past_logits_unchanged_with_registers():
    model = small_model(n_registers=4)
    ids = ids_of(24)
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 5) % 37
    a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


# --- resetting rows of the state ---------------------------------------------------------------------
@pytest.mark.parametrize("n_registers", [0, 2])
def test_reset_rows_start_fresh_while_the_other_rows_continue(n_registers):
    model = small_model(n_registers=n_registers)
    past, ids = ids_of(9, b=3, seed=1), ids_of(6, b=3, seed=2)
    state = model(past).state.reset_rows(torch.tensor([True, False, True]))
    got = model(ids, state=state).logits
    fresh = model(ids).logits
    continued = model(ids, state=model(past).state).logits
    torch.testing.assert_close(got[[0, 2]], fresh[[0, 2]], rtol=0, atol=1e-10)
    torch.testing.assert_close(got[1], continued[1], rtol=0, atol=1e-10)


def test_reset_rows_do_not_mutate_the_state_and_the_mask_leaves_with_the_trimmed_past():
    model = small_model(cache_len=6)
    state = model(ids_of(6)).state
    reset = state.reset_rows(torch.tensor([True, False]))
    assert state.layers[0].valid is None
    assert reset.layers[0].valid[0].any().item() is False and reset.layers[0].valid[1].all().item()
    after = model(ids_of(6, seed=3), state=reset).state  # the hidden past is trimmed out entirely
    assert after.layers[0].valid is None
    partly = model(ids_of(3, seed=3), state=reset).state  # 3 hidden positions remain in the cache
    assert partly.layers[0].valid.tolist() == [[False] * 3 + [True] * 3, [True] * 6]


# --- RoPE scaling ------------------------------------------------------------------------------------
def test_ntk_scaling_uses_the_scaled_base():
    """§3.1: base' = base * s^(d/(d-2)); the model with rope_ntk_scale=4 equals the reference at base'."""
    model = small_model(rope_ntk_scale=4.0)
    ids = ids_of(10, b=1)[0].tolist()
    base = 100.0 * 4.0 ** (8 / 6)
    expected = lswt_logits(model, ids, angle_sign=-1.0, base=base)
    torch.testing.assert_close(model(torch.tensor([ids])).logits[0], expected, rtol=0, atol=1e-10)


def test_dynamic_scaling_is_inactive_within_the_trained_length_and_scales_past_it():
    plain = small_model()
    dynamic = small_model(rope_dynamic=True, rope_positions=8)
    ids = ids_of(16)
    torch.testing.assert_close(dynamic(ids[:, :8]).logits, plain(ids[:, :8]).logits, rtol=0, atol=0)
    assert (dynamic(ids).logits - plain(ids).logits).abs().max() > 1e-6
    base, temperature = RotaryScaling(2.0, 8, 0.07, 1.0).base_and_temperature(100.0, 8, 16)
    assert base == pytest.approx(100.0 * (2.0 * 2.0**2) ** (8 / 6))
    assert temperature == pytest.approx(0.07 * math.log(2.0) + 1.0)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="model.rope_dynamic=true needs model.rope_positions"):
        build_model("lswt", "debug", rope_dynamic=True)
    with pytest.raises(ValueError, match="model.self_extend does not combine with RoPE scaling"):
        build_model("lswt", "debug", rope_ntk_scale=2.0, self_extend={"group_size": 2, "window_size": 4})
    with pytest.raises(ValueError, match="model.n_registers=-1 must be >= 0"):
        build_model("lswt", "debug", n_registers=-1)


# --- the seed's parameter names --------------------------------------------------------------------------
def test_the_seeds_names_are_converted_to_the_config_fields():
    """The seed's LSWTConfig names and its Hugging Face attribute_map, through the one converter."""
    seed = dict(d_ffn=96, rope_base_freq=1000.0, enable_bias=False, num_hidden_layers=3, num_attention_heads=2)
    config = config_for("lswt", "debug", **seed, max_position_embeddings=128, rope_dynamic=True)
    assert (config.d_ff, config.rope_base, config.bias, config.n_layers, config.n_heads) == (96, 1000.0, False, 3, 2)
    assert config.rope_positions == 128
    assert config_for("lswt", "tiny", hidden_size=1536).d_model == 1536
    fields = {f.name for f in dataclasses.fields(LSWTConfig)}
    assert not fields & set(SEED_NAMES) and set(SEED_NAMES.values()) <= fields


@pytest.mark.parametrize(
    "overrides,named",
    [
        (dict(d_ffn=96, d_ff=128), ("d_ffn", "d_ff")),
        (dict(d_ffn=96, intermediate_size=96), ("d_ffn", "intermediate_size")),
    ],
    ids=["seed-and-field", "two-seed-names"],
)
def test_a_field_given_under_two_names_is_an_error_naming_both(overrides, named):
    with pytest.raises(ValueError, match="lswt config field 'd_ff' is given twice") as error:
        config_for("lswt", "debug", **overrides)
    assert all(f"'{name}'" in str(error.value) for name in named), error.value


# --- the attention kernel ------------------------------------------------------------------------------
def softmax_attention_loops(q, k, v, key_mask, scale):
    """float64 reference: per (row, head, query) a softmax over the visible keys (bottom-right causal)."""
    B, H, T, _ = q.shape
    S = k.shape[2]
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for n in range(H):
            for i in range(T):
                keys = [j for j in range(S) if j <= i + S - T and (key_mask is None or key_mask[b, j])]
                scores = torch.tensor([float(q[b, n, i].double() @ k[b, n, j].double()) * scale for j in keys])
                weights = torch.softmax(scores, 0)
                out[b, n, i] = sum(wt * v[b, n, j].double() for wt, j in zip(weights, keys))
    return out


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_path_equals_softmax_attention_scaled_by_one_over_sqrt_head_dim(masked):
    """§5.23: the fallback scales by d_key^-1/2 (the original used n_heads^-1/2), fp32 vs float64 loops."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 16, generator=g), torch.randn(2, 3, 9, 16, generator=g), torch.randn(2, 3, 9, 16)
    key_mask = torch.tensor([[False] * 3 + [True] * 6, [True] * 9]) if masked else None
    got = attention(q, k, v, backend="sdpa", key_mask=key_mask)
    expected = softmax_attention_loops(q, k, v, key_mask, 16**-0.5)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n_registers", [0, 4])
def test_cuda_attention_in_bf16_matches_the_float32_cpu_model(n_registers):
    """§5.23 on a GPU: the bf16 kernel path (flash-attn when installed, else SDPA) against fp32 on CPU;
    bf16 keeps ~3 significant digits, so 2% of the largest logit."""
    model = small_model(torch.float32, n_registers=n_registers, init_std=0.02)
    ids = ids_of(64)
    expected = model(ids).logits
    got = model.to("cuda", torch.bfloat16)(ids.cuda()).logits.float().cpu()
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


# --- sizes and initialisation ----------------------------------------------------------------------------
SEED_TABLE = {"tiny": 153e6, "small": 343e6, "medium": 949e6, "large": 2.5e9, "xl": 7.3e9, "xxl": 13e9}


@pytest.mark.parametrize("size", list(SEED_TABLE))
def test_named_sizes_match_the_seed_table_within_two_percent(size):
    with torch.device("meta"):
        model = build_model("lswt", size)
    assert abs(count_parameters(model) / SEED_TABLE[size] - 1) <= 0.02


@pytest.mark.parametrize(
    "size,overrides,expected",
    [("tiny", dict(d_ff=2048), 125e6), ("tiny", dict(), 153e6), ("medium", dict(d_ff=4096, n_layers=18), 551e6)],
    ids=["tiny-head", "tiny-dec2023", "medium-head"],
)
def test_parameter_counts_of_the_original_generations(size, overrides, expected):
    """§5.20: Tiny/HEAD ≈ 125M, Tiny/Dec-2023 ≈ 153M, Medium/HEAD ≈ 551M (within 1%)."""
    with torch.device("meta"):
        model = build_model("lswt", size, n_registers=0, **overrides)
    assert abs(count_parameters(model) / expected - 1) <= 0.01


def test_init_weights_after_to_empty_from_meta_gives_the_seed_init():
    with torch.device("meta"):
        model = build_model("lswt", "debug", n_registers=4, qk_norm=True)
    model.to_empty(device="cpu")
    model.init_weights()
    attn = model.blocks[0].attention
    assert torch.equal(attn.q_norm.weight, torch.ones(16))
    assert torch.equal(attn.query.bias, torch.zeros(64))
    assert 0.1 < attn.register_keys.std().item() < 0.4  # N(0, 1/sqrt(16)) = 0.25
    assert 0.015 < model.embed.weight.std().item() < 0.025
