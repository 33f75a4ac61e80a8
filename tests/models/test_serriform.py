"""SerriformNet beyond the shared contract: docs/architectures.md and acceptance checks §5 items 24-29.

Tiny sizes give every axis its own length: B 2, T 24, D 48, memory channels 12, FF rank 16, 5 experts,
top-2, vocabulary 97. Tolerances are written beside each comparison. The decoding and reference checks run
for each position signal (`positions`, POSITIONS).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from lctrain.models import build_model, config_for, count_parameters
from lctrain.models.layers.scan import linear_scan
from lctrain.models.sampling import generate
from lctrain.models.serriform import (
    POSITIONS,
    SEED_NAMES,
    SerriformConfig,
    SerriformLayerState,
    SerriformNet,
    SerriformState,
    from_seed_names,
)
from tests.reference.serriform import recurrence_loop, serriform_forward

B, T, V = 2, 24, 97
STAGES = ("use_conv", "use_recurrence", "use_moe", "use_lowrank_ff")
ABLATIONS = {
    "full": {},
    "conv_only": dict(use_recurrence=False, use_moe=False, use_lowrank_ff=False),
    "recurrence_only": dict(use_conv=False, use_moe=False, use_lowrank_ff=False),
    "moe_only": dict(use_conv=False, use_recurrence=False, use_lowrank_ff=False),
    "lowrank_ff": dict(use_moe=False),
}


def tiny_model(dtype=torch.float32, **overrides) -> SerriformNet:
    settings = dict(vocab_size=V, d_model=48, n_layers=3, dropout=0.0, memory_dim_factor=4, ff_reduction_factor=3)
    settings.update(num_experts=5, top_k_experts=2, conv_kernel_size=3)
    torch.manual_seed(0)
    return SerriformNet(SerriformConfig(**{**settings, **overrides})).to(dtype).eval()


def tokens(b=B, t=T, seed=1):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


# --- causality and state (§5 items 24, 25) ---------------------------------------------------------


@pytest.mark.parametrize(
    "flags", list(itertools.product([True, False], repeat=4)), ids=lambda f: "".join("01"[x] for x in f)
)
def test_every_stage_combination_builds_and_is_causal(flags):
    """float64, perturb t0 = 12 of L = 24 with dilations 1, 2, 4: earlier logits unchanged to 1e-12.

    Not bit-identical: a changed token can change the routing of later tokens, hence the height of an
    expert's batched matmul, and BLAS may round a row of a taller matrix in the last bit differently."""
    model = tiny_model(torch.float64, **dict(zip(STAGES, flags)))
    ids = tokens()
    changed = ids.clone()
    changed[:, 12] = (changed[:, 12] + 5) % V
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_stepwise_decoding_matches_full_forward_for_every_ablation(ablation, positions):
    """fp32; tolerance 1e-5 of the largest logit (the original missed by 0.5 at logits of 0.4)."""
    model = tiny_model(**ABLATIONS[ablation], positions=positions)
    ids = tokens()
    full = model(ids).logits
    out = model(ids[:, :5])
    pieces = [out.logits]
    for t in range(5, T):
        out = model(ids[:, t : t + 1], state=out.state)
        pieces.append(out.logits)
    assert out.state.position == T
    assert (torch.cat(pieces, 1) - full).abs().max() <= 1e-5 * full.abs().max()


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_chunked_prefill_and_continuation_match_full_forward(ablation, positions):
    """float64, chunks of 7, 1, 9 and 7 tokens (shorter than the dilation-4 tail of 8 included); atol 1e-10."""
    model = tiny_model(torch.float64, **ABLATIONS[ablation], positions=positions)
    ids = tokens()
    full = model(ids).logits
    state, pieces, start = None, [], 0
    for size in (7, 1, 9, 7):
        out = model(ids[:, start : start + size], state=state)
        pieces.append(out.logits)
        state, start = out.state, start + size
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_model_matches_float64_token_loop_reference(ablation, positions):
    """Logits and state of a fresh call and of a call continuing from a state. A float64 model computes
    in float64 throughout (norms, rotary angles, scan), so logits and states agree to 1e-10 absolute
    (logits of order 0.5; conv inputs are RMS-normalised, of order 1). The reference rotates its embeddings
    only for positions="rotary"."""
    model = tiny_model(torch.float64, **ABLATIONS[ablation], positions=positions)
    ids = tokens(t=14)
    first, second = model(ids[:, :9]), None
    ref_first, ref_state = serriform_forward(model, ids[:, :9])
    second = model(ids[:, 9:], state=first.state)
    ref_second, ref_state = serriform_forward(model, ids[:, 9:], ref_state)
    for got, want in ((first.logits, ref_first), (second.logits, ref_second)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    for i, layer in enumerate(second.state.layers):
        if model.config.use_conv:
            torch.testing.assert_close(layer.conv_tail, ref_state["tails"][i], rtol=0, atol=1e-10)
        if model.config.use_recurrence:
            torch.testing.assert_close(layer.recurrent, ref_state["h"][i], rtol=0, atol=1e-10)


def test_float64_model_rotates_by_float64_angles_far_into_a_sequence():
    """At position 50,000 float32 angles move the logits by ~3e-4 (the same weights in float32 show it);
    a float64 model rotates in float64 and matches the reference to 1e-10 there too (measured 9e-13)."""
    model = tiny_model(torch.float64, positions="rotary")
    tails = [torch.zeros(B, 2 * d, 48, dtype=torch.float64) for d in model.config.dilations]  # (k-1)*d inputs
    memories = [torch.zeros(B, 12, dtype=torch.float64) for _ in tails]
    state = SerriformState([SerriformLayerState(*pair) for pair in zip(tails, memories)], 50_000)
    ids = tokens(t=6)
    want, _ = serriform_forward(model, ids, {"position": 50_000, "tails": tails, "h": memories})
    torch.testing.assert_close(model(ids, state=state).logits, want, rtol=0, atol=1e-10)
    in_float32 = model.float()(ids, state=state.to(dtype=torch.float32)).logits
    assert (in_float32.double() - want).abs().max() > 1e-5


@pytest.mark.parametrize("positions", POSITIONS)
def test_only_the_rotary_gate_makes_the_output_depend_on_the_absolute_position(positions):
    """The same layer states at position 0 and at 50,000: equal logits (atol 0) without a position signal, as
    the model meets nothing new past its trained length; with the rotary gate they differ."""
    model = tiny_model(torch.float64, positions=positions)
    state = model(tokens(t=9)).state
    far = dataclasses.replace(state, position=50_000)
    ids = tokens(t=6, seed=2)
    near_logits, far_logits = model(ids, state=state).logits, model(ids, state=far).logits
    if positions == "none":
        torch.testing.assert_close(far_logits, near_logits, rtol=0, atol=0)
    else:
        assert (far_logits - near_logits).abs().max() > 1e-3


@pytest.mark.parametrize("positions", POSITIONS)
def test_a_reset_row_continues_as_a_fresh_start_for_every_position_signal(positions):
    """float64, 3 rows with row 1 reset after 11 tokens: row 1 equals a fresh call (1e-12, as the contract's
    test: the MoE batches row 1 with the others), rows 0 and 2 continue, over two chunks after the reset."""
    model = tiny_model(torch.float64, positions=positions)
    past, first, second = tokens(b=3, t=11, seed=1), tokens(b=3, t=9, seed=2), tokens(b=3, t=5, seed=3)
    state = model(past).state
    out = model(first, state=state.reset_rows(torch.tensor([False, True, False])))
    fresh, kept = model(first[1:2]), model(first, state=state)
    torch.testing.assert_close(out.logits[1:2], fresh.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.logits[[0, 2]], kept.logits[[0, 2]], rtol=0, atol=1e-12)
    out = model(second, state=out.state)
    torch.testing.assert_close(out.logits[1:2], model(second[1:2], state=fresh.state).logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.logits[[0, 2]], model(second, state=kept.state).logits[[0, 2]], rtol=0, atol=1e-12)


def test_state_holds_a_conv_tail_of_k_minus_one_times_dilation_and_the_memory_vector():
    model = tiny_model(conv_kernel_size=4)
    state = model(tokens(t=2)).state
    assert [layer.conv_tail.shape for layer in state.layers] == [(B, 3 * d, 48) for d in (1, 2, 4)]
    assert [layer.recurrent.shape for layer in state.layers] == [(B, 12)] * 3
    assert all(layer.recurrent.dtype == torch.float32 for layer in state.layers)
    empty = tiny_model(use_conv=False, use_recurrence=False)(tokens(t=2)).state
    assert all(layer.conv_tail is None and layer.recurrent is None for layer in empty.layers)


def test_greedy_streaming_generation_equals_the_full_forward_argmax():
    model = tiny_model()
    prompt = tokens(t=6)
    new = torch.stack(list(generate(model, prompt, 8, temperature=0)), dim=1)  # (B, 8)
    sequence = torch.cat([prompt, new], dim=1)
    expected = model(sequence).logits[:, 5:-1].argmax(-1)  # the prediction after each prefix
    assert torch.equal(new, expected)


# --- sparse recurrence (§5 item 26) ----------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 7, 63, 64, 65, 300])
def test_parallel_scan_matches_float64_step_loop(length):
    """chunk_size 16, so 300 steps take two levels of chunks; float64, atol 1e-12."""
    g = torch.Generator().manual_seed(length)
    u = torch.randn(3, length, 5, generator=g, dtype=torch.float64)
    alpha = torch.tensor([1e-3, 0.3, 0.9, 0.99, 0.99999], dtype=torch.float64)
    h0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    got = linear_scan(u, alpha.log(), h0, chunk_size=16)
    torch.testing.assert_close(got, recurrence_loop(u, alpha, torch.ones(5), h0), rtol=0, atol=1e-12)


def test_chunked_scan_with_state_handoff_matches_full_scan():
    """float64; the state carried between calls is the last row of the previous call; atol 1e-12."""
    u = torch.randn(2, 150, 6, dtype=torch.float64)
    log_a = F.logsigmoid(torch.randn(6, dtype=torch.float64) * 3)
    full = linear_scan(u, log_a, chunk_size=16)
    h, pieces = None, []
    for piece in u.split([1, 40, 17, 92], dim=1):
        out = linear_scan(piece, log_a, h, chunk_size=16)
        pieces.append(out)
        h = out[:, -1]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-12)


def test_parallel_scan_stays_accurate_and_finite_over_long_sequences():
    """fp32 scan of 20,000 steps against a float64 loop, for decays from 1e-6 to 1 - 1e-7; the
    cumulative-product form would overflow here (0.5^-20000). Tolerance 1e-4 of the largest state."""
    u = torch.randn(1, 20_000, 5)
    alpha = torch.tensor([1e-6, 0.5, 0.9, 0.999, 1 - 1e-7], dtype=torch.float64)
    got = linear_scan(u, alpha.log().float())
    want = recurrence_loop(u, alpha, torch.ones(5))
    assert torch.isfinite(got).all()
    assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()


def test_scan_gradients_match_finite_differences():
    """21 steps in chunks of 4: two levels of chunks, the initial state included."""
    u = torch.randn(1, 21, 2, dtype=torch.float64, requires_grad=True)
    log_a = F.logsigmoid(torch.randn(2, dtype=torch.float64)).requires_grad_()
    h0 = torch.randn(1, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *args: linear_scan(*args, chunk_size=4), (u, log_a, h0))


def test_sparse_recurrence_runs_on_the_first_memory_channels_and_passes_the_rest():
    model = tiny_model(torch.float64, use_conv=False)
    recurrence = model.blocks[0].recurrence
    x = torch.randn(B, 11, 48, dtype=torch.float64)
    y, last = recurrence(x, None)
    alpha, beta = torch.sigmoid(recurrence.alpha_logit), recurrence.beta
    want = recurrence_loop(x[..., :12], alpha, beta)
    torch.testing.assert_close(y[..., :12], want, rtol=0, atol=1e-12)
    assert torch.equal(y[..., 12:], x[..., 12:])
    torch.testing.assert_close(last, want[:, -1], rtol=0, atol=1e-12)
    assert ((alpha > 0) & (alpha < 1)).all()


# --- convolution (§5 item 27) ----------------------------------------------------------------------


def test_dilations_follow_a_period_of_three_layers():
    assert SerriformConfig(n_layers=6, conv_dilation_growth=2).dilations == [1, 2, 4, 1, 2, 4]
    assert SerriformConfig(n_layers=4, conv_dilation_growth=2.5).dilations == [1, 2, 6, 1]  # int() truncates
    model = tiny_model(n_layers=6)
    assert [block.conv.depthwise.dilation[0] for block in model.blocks] == [1, 2, 4, 1, 2, 4]


def test_conv_only_twelve_layer_stack_with_kernel_three_sees_57_tokens():
    """1 + 4 periods x (k-1) x (1 + 2 + 4) = 57: the last logit has a gradient from exactly 57 inputs."""
    model = tiny_model(n_layers=12, **ABLATIONS["conv_only"])
    embedded = []
    model.embed.register_forward_hook(lambda module, args, out: embedded.append(out) or out.retain_grad())
    model(tokens(b=1, t=80)).logits[0, -1].sum().backward()
    reached = embedded[0].grad[0].abs().sum(-1) > 0  # (T,)
    assert reached.sum().item() == 57
    assert reached[-57:].all()


def test_activation_setting_is_used_by_the_conv_stage():
    ids = tokens()
    logits = {name: tiny_model(activation=name)(ids).logits for name in ("silu", "gelu", "relu")}
    assert not torch.allclose(logits["silu"], logits["gelu"])
    assert not torch.allclose(logits["silu"], logits["relu"])


# --- MoE inside the model (§5 item 28) -------------------------------------------------------------


def test_aux_losses_are_the_mean_over_moe_layers_and_absent_without_moe():
    model = tiny_model()
    per_layer = []
    for _, layer in model.moe_layers():
        layer.register_forward_hook(lambda module, args, out: per_layer.append(out[1]))
    aux = model(tokens()).aux_losses
    assert set(aux) == {"moe_balance", "router_entropy"}
    for name in aux:
        torch.testing.assert_close(aux[name], torch.stack([a[name] for a in per_layer]).mean())
    assert tiny_model(use_moe=False)(tokens()).aux_losses == {}


def test_moe_layers_are_listed_and_count_tokens_only_in_training():
    model = tiny_model()
    layers = model.moe_layers()
    assert [name for name, _ in layers] == ["blocks.0.moe", "blocks.1.moe", "blocks.2.moe"]
    model(tokens())
    assert all(layer.tokens_per_expert.sum() == 0 for _, layer in layers)
    model.train()(tokens())
    assert all(layer.tokens_per_expert.sum() == B * T * 2 for _, layer in layers)
    model.eval()(tokens())
    assert all(layer.tokens_per_expert.sum() == B * T * 2 for _, layer in layers)


# --- configuration and sizes (§5 item 29) ----------------------------------------------------------


def test_partial_arch_config_merges_with_the_named_size():
    """The original's arch_config dict (with its `top_k`) goes through the one converter, not the dataclass."""
    overrides = from_seed_names({"arch_config": {"use_moe": False, "conv_kernel_size": 5, "top_k": 1}})
    assert overrides == {"use_moe": False, "conv_kernel_size": 5, "top_k_experts": 1}
    config = SerriformConfig(**overrides)
    assert (config.use_moe, config.conv_kernel_size, config.top_k_experts) == (False, 5, 1)
    assert (config.use_conv, config.use_recurrence, config.use_lowrank_ff, config.memory_dim_factor) == (
        True,
        True,
        True,
        4,
    )
    model = build_model("serriform", "debug", arch_config={"use_recurrence": False})
    assert model.config.d_model == 64 and model.blocks[0].recurrence is None


def test_the_originals_cli_names_are_converted_to_the_config_fields():
    config = config_for("serriform", "debug", dim=32, num_layers=2, dilation_growth=2.5, top_k=1)
    assert (config.d_model, config.n_layers, config.conv_dilation_growth, config.top_k_experts) == (32, 2, 2.5, 1)
    fields = {f.name for f in dataclasses.fields(SerriformConfig)}
    assert "arch_config" not in fields and not fields & set(SEED_NAMES) and set(SEED_NAMES.values()) <= fields


@pytest.mark.parametrize(
    "overrides,named",
    [
        (dict(top_k=1, top_k_experts=2), ("top_k", "top_k_experts")),
        (dict(num_layers=2, n_layers=3), ("num_layers", "n_layers")),
        (dict(arch_config={"use_moe": False}, use_moe=True), ("arch_config.use_moe", "use_moe")),
        (dict(arch_config={"top_k": 1}, top_k_experts=2), ("arch_config.top_k", "top_k_experts")),
    ],
    ids=["seed-and-field", "cli-and-field", "in-and-beside-arch-config", "alias-in-arch-config"],
)
def test_a_field_given_twice_is_an_error_naming_both(overrides, named):
    with pytest.raises(ValueError, match="is given twice") as error:
        config_for("serriform", "debug", **overrides)
    assert all(f"'{name}'" in str(error.value) for name in named), error.value


def test_unknown_arch_config_key_is_rejected_by_name():
    with pytest.raises(ValueError, match="model.arch_config has unknown key 'use_attention'; valid keys: "):
        config_for("serriform", "debug", arch_config={"use_conv": False, "use_attention": True})


@pytest.mark.parametrize("where", ["arch_config", "beside"])
def test_training_settings_of_the_original_point_to_the_training_config(where):
    overrides = {"arch_config": {"entropy_weight": 0.01}} if where == "arch_config" else {"entropy_weight": 0.01}
    with pytest.raises(ValueError, match="'entropy_weight' is a training setting; set the weight of the 'router"):
        config_for("serriform", "debug", **overrides)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(top_k_experts=5), r"model.top_k_experts=5 must be between 1 and model.num_experts=4"),
        (dict(activation="tanh"), r"model.activation='tanh' is unknown; choose one of: silu, gelu, relu"),
        (dict(d_model=63), r"model.d_model=63 must be even"),
        (dict(conv_dilation_growth=0.5), r"model.conv_dilation_growth=0.5 must be >= 1"),
        (dict(memory_dim_factor=0), r"model.memory_dim_factor=0 must be between 1 and model.d_model=512"),
        (dict(router_noise=-0.1), r"model.router_noise=-0.1 must be >= 0"),
        (dict(positions="alibi"), r"model.positions='alibi' is unknown; choose one of: none, rotary"),
    ],
)
def test_invalid_settings_give_one_line_errors_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        SerriformConfig(**overrides)
    assert "\n" not in str(error.value)


def test_tiny_size_the_originals_default_has_the_documented_parameter_count():
    """67,350,097: the original's code had 79.2M (76.8M without its unused projections) because its
    parallel-branch block held D x D experts and a D + m -> D recurrence projection."""
    with torch.device("meta"):
        model = build_model("serriform", "tiny")
    assert count_parameters(model) == 67_350_097
    config = model.config
    assert (config.vocab_size, config.d_model, config.n_layers) == (50257, 512, 12)


def test_init_weights_reinitialises_a_model_materialised_from_meta():
    with torch.device("meta"):
        meta = build_model("serriform", "debug")
    meta.to_empty(device="cpu")
    torch.manual_seed(3)
    meta.init_weights()
    fresh = build_model("serriform", "debug")
    torch.manual_seed(3)
    fresh.init_weights()
    for (name, a), b in zip(meta.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert all(layer.tokens_per_expert.sum() == 0 for _, layer in meta.moe_layers())


def test_forward_and_backward_run_under_bf16_autocast():
    """Mixed dtypes meet in the MoE (bf16 matmuls, fp32 biases and router probabilities)."""
    model = tiny_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens())
    assert torch.isfinite(out.logits.float()).all()
    (out.logits.float().mean() + sum(out.aux_losses.values())).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_bf16_model_runs_and_decodes_close_to_its_full_forward():
    """bf16 weights and activations, the recurrence in fp32: step decoding within 5% of the largest logit."""
    model = tiny_model(torch.bfloat16)
    ids = tokens(t=10)
    full = model(ids)
    assert full.logits.dtype == torch.bfloat16 and torch.isfinite(full.logits).all()
    out, pieces = model(ids[:, :4]), []
    pieces.append(out.logits)
    for t in range(4, 10):
        out = model(ids[:, t : t + 1], state=out.state)
        pieces.append(out.logits)
    diff = (torch.cat(pieces, 1).float() - full.logits.float()).abs().max()
    assert diff <= 0.05 * full.logits.float().abs().max()
