"""SeqCond: the condenser against a float64 loop, its scan paths, relative decay, decoding state, the
hybrid stack and its sizes (docs/architectures.md items 1-8, with §0's relative decay)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lctrain.models import build_model, config_for, count_parameters
from lctrain.models.condenser import CondenserState, SequenceCondenser, decayed_prefix_sum
from lctrain.models.seqcond import SeqCond, SeqCondConfig
from lctrain.models.seqcond_config import SEED_NAMES, from_seed_names
from tests.reference import seqcond as reference

# §5.1-5.2's model: D=64, 4 layers, ratio 1, K=8, K_q=4, M=2.
ACCEPTANCE = dict(
    vocab_size=97, d_model=64, d_ff=80, n_layers=4, n_heads=4, seqcond_ratio=1, seqcond_heads=8, num_query_heads=4,
    num_thetas=2, max_seq_len=64,
)  # fmt: skip


def seqcond(dtype=torch.float32, **overrides) -> SeqCond:
    torch.manual_seed(0)
    return SeqCond(SeqCondConfig(**{**ACCEPTANCE, **overrides})).to(dtype).eval()


def ids(b: int, t: int, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def mixer(dtype=torch.float64, **overrides) -> SequenceCondenser:
    """A condenser with randomised parameters, so decays, grids and scales all differ from their init."""
    config = SeqCondConfig(**{**ACCEPTANCE, "d_model": 24, "seqcond_heads": 6, "num_query_heads": 3, **overrides})
    torch.manual_seed(0)
    m = SequenceCondenser(config)
    for linear in (m.in_proj, m.gate, m.out):
        torch.nn.init.normal_(linear.weight, std=linear.in_features**-0.5)
    with torch.no_grad():
        m.theta_raw.normal_(0.0, 1.0)
        m.integration_raw.normal_(0.0, 1.0)
        m.decay_raw.uniform_(-3.0, 0.5)  # lambda from 0.05 to 0.97: strong decay inside a 7-token chunk
        m.score_scale.normal_(1.0, 0.5)
        m.score_bias.normal_(0.0, 0.5)
        m.phase_scale.normal_(1.0, 0.5)
        m.norm.weight.normal_(1.0, 0.2)
    return m.to(dtype).eval()


def inputs(b: int, t: int, d: int, dtype=torch.float64, seed: int = 2) -> torch.Tensor:
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


def step_by_step(model, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    out = model(tokens[:, :prefill]) if prefill else None
    pieces = [out.logits] if out else []
    for t in range(prefill, tokens.shape[1]):
        out = model(tokens[:, t : t + 1], state=out.state if out else None)
        pieces.append(out.logits)
    return torch.cat(pieces, dim=1)


# --- the condenser against the float64 loop (§1.1) -------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(chunk_size=7),
        dict(chunk_size=7, num_anchor_heads=2),
        dict(chunk_size=64, num_thetas=1, use_conv=False),
        dict(use_square_matrix=True, num_anchor_heads=6),
    ],
    ids=["chunk7", "chunk7-anchors", "M1-noconv", "square-all-anchors"],
)
@pytest.mark.parametrize("T", [1, 23])
def test_condenser_matches_the_float64_loop_reference(overrides, T):
    """Output and final state; float64, tolerance 1e-10 (the two differ only in summation order)."""
    m = mixer(**overrides)
    x = inputs(2, T, m.config.d_model)
    out, state = m(x)
    params = {name: p.detach() for name, p in m.named_parameters()}
    kernel = m.config.conv_kernel_size if m.config.use_conv else None
    ref, den, num = reference.condenser(
        x, params, query_heads=m.Kq, anchor_heads=m.config.num_anchor_heads, kernel=kernel
    )
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(state.den, den, rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.complex(state.re, state.im), num, rtol=1e-10, atol=1e-12)
    assert torch.equal(state.position, torch.tensor([T, T]))


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
def test_chunked_scan_agrees_with_the_masked_square_form(chunk):
    """§5.3: fp32, tolerance 1e-5 of the largest output; T = 63 reaches partial chunks."""
    m = mixer(torch.float32)
    x = inputs(2, 63, m.config.d_model, torch.float32)
    square = m.__class__(dataclasses.replace(m.config, use_square_matrix=True)).eval()
    square.load_state_dict(m.state_dict())
    chunked = m.__class__(dataclasses.replace(m.config, chunk_size=chunk)).eval()
    chunked.load_state_dict(m.state_dict())
    a, b = chunked(x)[0], square(x)[0]
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_decayed_prefix_sum_carries_an_initial_state_and_pads_partial_chunks():
    values = torch.randn(2, 11, 3, 5, dtype=torch.float64)
    log_decay = -torch.tensor([0.0, 0.3, 2.0], dtype=torch.float64)
    initial = torch.randn(2, 3, 5, dtype=torch.float64)
    expected, h = [], initial
    for t in range(11):
        h = torch.exp(log_decay)[:, None] * h + values[:, t]
        expected.append(h)
    out = decayed_prefix_sum(values, log_decay, initial, chunk_size=4)
    torch.testing.assert_close(out, torch.stack(expected, 1), rtol=1e-12, atol=1e-12)


def test_fast_heads_forget_the_distant_past_at_any_position():
    """Relative decay: with lambda = 0.1 the last output of a 3000-token input equals that of its last
    300 tokens (the dropped weights are below e^-29 of the kept ones). The original anchored decay at
    maxlen and floored weights at 1e-4, which turns such a head into a uniform average over the prefix."""
    m = mixer(torch.float32)
    with torch.no_grad():
        m.decay_raw.fill_(math.log(math.expm1(0.1)))
    x = inputs(1, 3000, m.config.d_model, torch.float32)
    long, _ = m(x)
    short, _ = m(x[:, -300:])
    torch.testing.assert_close(long[:, -1], short[:, -1], rtol=0, atol=1e-5 * short[:, -1].abs().max().item())
    with torch.no_grad():  # slow heads (lambda = 0.001) do remember: the check has teeth
        m.decay_raw.fill_(math.log(math.expm1(0.001)))
    assert not torch.allclose(m(x)[0][:, -1], m(x[:, -300:])[0][:, -1], atol=1e-3)


def test_rows_at_different_positions_step_together():
    """Per-row positions: states of a 12-token and a 5-token prefix, batched, step like each row alone.
    Anchor heads make the absolute position matter."""
    m = mixer(num_anchor_heads=3)
    x = inputs(2, 13, m.config.d_model)
    _, a = m(x[:1, :12])
    _, b = m(x[1:, :5])
    both = CondenserState(*(torch.cat([getattr(a, f.name), getattr(b, f.name)]) for f in dataclasses.fields(a)))
    nxt = torch.cat([x[:1, 12:13], x[1:, 5:6]])
    out, state = m(nxt, both)
    torch.testing.assert_close(out[:1], m(x[:1, :13])[0][:, 12:], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1:], m(x[1:, :6])[0][:, 5:], rtol=0, atol=1e-12)
    assert state.position.tolist() == [13, 6]


def test_conv_tail_of_a_prefill_shorter_than_the_kernel_is_zero_padded():
    m = mixer()
    x = inputs(2, 9, m.config.d_model)
    _, state = m(x[:, :2])
    assert state.conv.shape == (2, 3, sum(m.widths))
    assert torch.equal(state.conv[:, 0], torch.zeros_like(state.conv[:, 0]))
    out, _ = m(x[:, 2:], state)
    torch.testing.assert_close(out, m(x)[0][:, 2:], rtol=0, atol=1e-12)


def test_condenser_state_holds_the_same_bytes_after_20_or_400_tokens():
    """O(1) decoding state: no field grows with length or keeps a view of the call's tensors alive."""
    m = mixer()

    def stored_bytes(state: CondenserState) -> int:
        return sum(getattr(state, f.name).untyped_storage().nbytes() for f in dataclasses.fields(state))

    short = m(inputs(2, 20, m.config.d_model))[1]
    long = m(inputs(2, 400, m.config.d_model))[1]
    assert stored_bytes(short) == stored_bytes(long)
    # B = 2 rows of float64 (conv tail, den, re, im) and int64 (position)
    assert stored_bytes(long) == 2 * 8 * (3 * sum(m.widths) + m.K + 2 * m.K * m.H * m.M + 1)


# --- parameter ranges (§5.6) --------------------------------------------------------------------------


@pytest.mark.parametrize("M", [1, 3])
def test_frequencies_stay_in_range_and_monotone_for_any_raw_values(M):
    m = mixer(num_thetas=M)
    with torch.no_grad():
        m.theta_raw.normal_(0.0, 30.0)
    theta = m.frequencies()
    assert theta.min() >= 0.001 and theta.max() <= 3.0
    if M > 1:
        assert (theta.diff(dim=-1) >= 0).all()


def test_initial_frequency_grid_is_geometric_from_0_001_to_3():
    single = SequenceCondenser(SeqCondConfig(**{**ACCEPTANCE, "num_thetas": 1})).frequencies()
    expected = torch.logspace(-3, math.log10(3.0), 8)
    torch.testing.assert_close(single[:, 0, 0], expected, rtol=0.05, atol=0.005)  # ends held 1e-3 inside (0, 1)
    assert (single == single[:, :1]).all()  # the same for every channel of a head
    grid = SequenceCondenser(SeqCondConfig(**ACCEPTANCE)).frequencies()
    assert grid[..., 0].max() < 0.01 and torch.allclose(grid[..., -1], torch.tensor(3.0))


def test_token_weights_are_clipped_and_integration_weights_sum_to_one():
    m = mixer()
    scores = torch.linspace(-1e4, 1e4, 1001, dtype=torch.float64)[:, None].expand(-1, m.K)
    p = m.token_weights(scores)
    assert p.min() == 1e-4 and p.max() == 5000.0
    torch.testing.assert_close(m.integration_weights().sum(-1), torch.ones(m.Kq, m.K // m.Kq, m.H, dtype=p.dtype))
    fresh = SequenceCondenser(m.config)
    assert torch.allclose(fresh.integration_weights(), torch.full_like(fresh.integration_weights(), 1 / m.M))


# --- the model: causality, decoding, length (§5.1, 5.2, 5.7, 5.8) ------------------------------------------


def test_future_tokens_leave_past_logits_unchanged():
    """§5.1: perturbing t0 = 10 of 20 leaves logits before it equal; fp32, tolerance 1e-6."""
    model = seqcond()
    tokens = ids(2, 20)
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 97
    a, b = model(tokens).logits, model(changed).logits
    assert (a[:, :10] - b[:, :10]).abs().max() <= 1e-6
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


@pytest.mark.parametrize("prefill", [0, 12])
@pytest.mark.parametrize(
    "overrides",
    [{}, dict(num_anchor_heads=3, num_thetas=1), dict(use_conv=False, qk_norm=True), dict(use_square_matrix=True)],
    ids=["default", "anchors-M1", "noconv-qknorm", "square"],
)
def test_stepwise_decoding_matches_the_forward(prefill, overrides):
    """§5.2: init state (prefill 0) or prefill(12), then single-token steps; fp32, 1e-4 of max |logit|."""
    model = seqcond(**overrides)
    tokens = ids(2, 20)
    full = model(tokens).logits
    assert (step_by_step(model, tokens, prefill) - full).abs().max() <= 1e-4 * full.abs().max()


def test_prefix_logits_do_not_depend_on_the_call_length():
    """§5.7: the logits of a t-token prefix are the same in a call of length t and one of length 40."""
    model = seqcond(torch.float64)
    tokens = ids(2, 40)
    full = model(tokens).logits
    for t in (1, 9, 33):
        torch.testing.assert_close(model(tokens[:, :t]).logits, full[:, :t], rtol=0, atol=1e-12)


def test_logits_do_not_depend_on_max_seq_len():
    short = seqcond(max_seq_len=16)
    long = seqcond(max_seq_len=100_000)
    long.load_state_dict(short.state_dict())
    tokens = ids(2, 12)
    assert torch.equal(short(tokens).logits, long(tokens).logits)


def test_running_past_max_seq_len_warns_and_keeps_every_position():
    """§5.8: nothing is clamped or overwritten past max_seq_len: the KV state keeps every token and
    decoding still equals the forward."""
    model = seqcond(max_seq_len=16)
    tokens = ids(2, 24)
    with pytest.warns(UserWarning, match="past model.max_seq_len=16"):
        full = model(tokens)
    with pytest.warns(UserWarning, match="past model.max_seq_len=16"):
        stepped = step_by_step(model, tokens, prefill=14)
    assert full.state.position == 24
    assert all(layer.length == 24 for layer in full.state.layers if hasattr(layer, "length"))
    assert (stepped - full.logits).abs().max() <= 1e-4 * full.logits.abs().max()


def test_bf16_forward_runs_and_stays_close_to_fp32():
    """bf16 weights and activations, fp32 condenser sums: logits within 5% of the largest fp32 logit
    (bf16 keeps 8 bits of mantissa; measured 1.9%). The states stay fp32."""
    model = seqcond()
    tokens = ids(2, 20)
    reference = model(tokens).logits
    out = seqcond(torch.bfloat16)(tokens)
    assert out.logits.dtype == torch.bfloat16
    assert (out.logits.float() - reference).abs().max() <= 0.05 * reference.abs().max()
    assert all(layer.den.dtype == torch.float32 for layer in out.state.layers if isinstance(layer, CondenserState))


# --- the stack, sizes and configuration (§5.4, 5.5) ---------------------------------------------------------


def test_layer_pattern_puts_a_transformer_block_after_every_ratio_condensers():
    assert SeqCondConfig(n_layers=12, seqcond_ratio=3).attention_layers == (3, 7, 11)
    pattern = SeqCondConfig(n_layers=24, seqcond_ratio=2).attention_layers
    assert len(pattern) == 8 and pattern[:2] == (2, 5)
    model = seqcond(n_layers=6, seqcond_ratio=2)
    kinds = [type(block).__name__ for block in model.blocks]
    assert kinds == ["CondenserBlock", "CondenserBlock", "AttentionBlock"] * 2


def test_large_preset_has_the_original_shapes_and_371_9m_parameters():
    """§5.5: H = 64, C = 5136, readout (16, 128, 384); 371,901,088 with tied embeddings and no final norm
    (the original's logged count), 1,024 more with it."""
    with torch.device("meta"):
        model = build_model("seqcond", "large", use_final_norm=False)
    condenser = model.blocks[0].condenser
    assert model.config.channels_per_head == 64
    assert condenser.in_proj.out_features == 5136
    assert condenser.readout.shape == (16, 128, 384)
    assert count_parameters(model) == 371_901_088
    with torch.device("meta"):
        assert count_parameters(build_model("seqcond", "large")) == 371_901_088 + 1024


def test_untied_head_adds_one_vocabulary_matrix():
    tied, untied = seqcond(), seqcond(tie_weights=False)
    assert count_parameters(untied) - count_parameters(tied) == 97 * 64
    assert untied(ids(1, 5)).logits.shape == (1, 5, 97)


def test_seed_factory_names_are_converted_to_the_config_fields():
    """The seed README's call, names as written there (plus G3's num_kv_heads): one converter turns them into
    the fields, which are the config's only names."""
    seed_call = dict(
        d_model=512, d_ff=2048, num_layers=6, vocab_size=10000, maxlen=512, num_heads=8, seqcond_ratio=2,
        num_thetas=4, dropout=0.1, tie_weights=True, use_conv=True, conv_kernel_size=4, num_kv_heads=2,
    )  # fmt: skip
    config = SeqCondConfig(**from_seed_names(seed_call))
    assert (config.n_layers, config.n_heads, config.max_seq_len, config.n_kv_heads) == (6, 8, 512, 2)
    fields = {f.name for f in dataclasses.fields(SeqCondConfig)}
    assert not fields & set(SEED_NAMES) and set(SEED_NAMES.values()) <= fields
    assert dataclasses.replace(config, n_layers=3).n_layers == 3
    with torch.device("meta"):
        assert len(SeqCond(config).blocks) == 6


def test_config_for_takes_seed_names_over_a_preset():
    config = config_for("seqcond", "small", num_layers=4, num_kv_heads=6)
    assert (config.n_layers, config.n_kv_heads, config.d_model) == (4, 6, 768)


@pytest.mark.parametrize("seed_name,name", list(SEED_NAMES.items()))
def test_a_field_given_under_both_names_is_an_error_naming_both(seed_name, name):
    with pytest.raises(ValueError, match=f"'{name}' is given twice, as '{seed_name}' and as '{name}'"):
        config_for("seqcond", "debug", **{seed_name: 4, name: 4})


def test_seed_names_are_not_config_fields():
    with pytest.raises(TypeError, match="num_layers"):
        SeqCondConfig(num_layers=6)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            dict(seqcond_heads=32, num_query_heads=6),
            "model.seqcond_heads=32 is not divisible by model.num_query_heads=6",
        ),
        (dict(n_heads=4, n_kv_heads=3), "model.n_heads=4 is not divisible by model.n_kv_heads=3"),
        (dict(d_model=60, n_heads=8), "model.d_model=60 is not divisible by model.n_heads=8"),
        (dict(num_anchor_heads=9, seqcond_heads=8), "model.num_anchor_heads=9 must be between 0"),
        (dict(num_thetas=0), "model.num_thetas=0 must be >= 1"),
        (dict(seqcond_ratio=-1), "model.seqcond_ratio=-1 must be >= 0"),
    ],
)
def test_invalid_configs_name_the_key_and_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        SeqCondConfig(**overrides)


def test_init_weights_restores_a_model_materialised_from_the_meta_device():
    """Embedding std 1/sqrt(d_model); the deterministic parameters equal a fresh model's."""
    fresh = seqcond()
    with torch.device("meta"):
        model = SeqCond(fresh.config)
    model.to_empty(device="cpu")
    model.init_weights()
    params, expected = dict(model.named_parameters()), dict(fresh.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    for name in ("theta_raw", "decay_raw", "integration_raw", "phase_scale", "norm.weight"):
        key = f"blocks.0.condenser.{name}"
        assert torch.equal(params[key], expected[key]), key
    assert abs(params["embed.weight"].std().item() - 64**-0.5) < 0.01
    assert model(ids(1, 9)).logits.abs().max() < 10  # the original's N(0, 1) embedding gives ~90


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_matches_cpu_fp32_and_decodes_like_the_forward():
    cpu = seqcond()
    gpu = seqcond().cuda()
    tokens = ids(2, 40)
    reference = cpu(tokens).logits
    fp32 = gpu(tokens.cuda()).logits.cpu()
    assert (fp32 - reference).abs().max() <= 1e-4 * reference.abs().max()
    stepped = step_by_step(gpu, tokens.cuda(), prefill=17).cpu()
    assert (stepped - reference).abs().max() <= 1e-4 * reference.abs().max()
    bf16 = gpu.to(torch.bfloat16)(tokens.cuda()).logits.float().cpu()
    assert (bf16 - reference).abs().max() <= 0.05 * reference.abs().max()
