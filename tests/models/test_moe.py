"""The shared mixture-of-experts layer (platform/models/layers/moe.py; docs/architectures.md).

Sizes: D 24, expert rank 8, 5 experts, top-2, 2 x 13 tokens; float64 against tests/reference/moe.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.utils.checkpoint

from lctrain.models.layers.moe import MoE, load_balance_loss, router_entropy_loss
from tests.reference.moe import balance_loss, moe_forward, route_token, router_entropy

D, R, E, K = 24, 8, 5, 2


def make_moe(dtype=torch.float64, **kwargs) -> MoE:
    torch.manual_seed(0)
    layer = MoE(D, R, E, K, **kwargs).to(dtype).eval()
    with torch.no_grad():  # a wider router than the default init, so routing is far from ties
        layer.router.weight.normal_(std=0.5)
    return layer


def test_moe_matches_float64_token_loop_reference():
    """float64, atol 1e-12: output of the batched expert runs equals the per-token sum."""
    layer = make_moe()
    x = torch.randn(2, 13, D, dtype=torch.float64)
    y, _ = layer(x)
    want = moe_forward(layer.state_dict(), x.reshape(-1, D), K).view(2, 13, D)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)


def test_top_k_weights_sum_to_one_and_pick_the_most_probable_experts():
    layer = make_moe()
    x_TD = torch.randn(40, D, dtype=torch.float64)
    routing = layer.route(x_TD)
    torch.testing.assert_close(routing.weights_TK.sum(-1), torch.ones(40, dtype=torch.float64), rtol=0, atol=1e-12)
    for t in range(40):
        chosen, weights, probs = route_token(x_TD[t], layer.router.weight, K)
        assert routing.experts_TK[t].tolist() == chosen
        torch.testing.assert_close(routing.weights_TK[t], torch.tensor(weights, dtype=torch.float64))
        torch.testing.assert_close(routing.probs_TE[t], probs)


def test_balance_loss_is_one_under_perfectly_uniform_routing():
    """Uniform probabilities and slots spread evenly: f = P = 1/E, so E * sum f P = 1 exactly."""
    probs_TE = torch.full((10, E), 1 / E, dtype=torch.float64)
    experts_TK = torch.tensor([[t % E, (t + 1) % E] for t in range(10)])
    counts_E = torch.bincount(experts_TK.flatten(), minlength=E)
    assert load_balance_loss(probs_TE, counts_E).item() == pytest.approx(1.0, abs=1e-12)
    assert router_entropy_loss(probs_TE).item() == pytest.approx(0.0, abs=1e-12)


def test_balance_loss_grows_with_imbalance_and_matches_the_hand_computation():
    """Routing skewed toward expert 0 by a logit bias s on every token: the loss rises from 1 strictly with s."""
    x_TD = torch.randn(64, D, dtype=torch.float64)
    x_TD[:, 0] = 1  # a constant feature, so router weight [e, 0] acts as a bias for expert e
    losses = []
    for skew in (0.0, 0.5, 1.0, 2.0, 4.0):
        layer = make_moe()
        with torch.no_grad():
            layer.router.weight.mul_(0.1)
            layer.router.weight[0, 0] += skew
        routing = layer.route(x_TD)
        counts_E = torch.bincount(routing.experts_TK.flatten(), minlength=E)
        loss = load_balance_loss(routing.probs_TE, counts_E).item()
        assert loss == pytest.approx(balance_loss(routing.probs_TE, routing.experts_TK), abs=1e-12)
        entropy = router_entropy_loss(routing.probs_TE).item()
        assert entropy == pytest.approx(router_entropy(routing.probs_TE), abs=1e-12)
        losses.append(loss)
    assert losses[0] == pytest.approx(1.0, abs=0.05)
    assert all(a < b for a, b in zip(losses, losses[1:]))
    assert losses[-1] > 1.5


def test_router_entropy_is_log_e_when_collapsed_and_a_descent_step_spreads_the_load():
    collapsed = torch.zeros(6, E, dtype=torch.float64)
    collapsed[:, 2] = 1
    assert router_entropy_loss(collapsed).item() == pytest.approx(math.log(E), abs=1e-12)

    layer = make_moe()
    x_TD = torch.randn(64, D, dtype=torch.float64)
    x_TD[:, 0] = 1
    with torch.no_grad():
        layer.router.weight[1, 0] += 3  # most tokens prefer expert 1
    before = router_entropy_loss(layer.route(x_TD).probs_TE)
    before.backward()
    with torch.no_grad():
        layer.router.weight -= 0.5 * layer.router.weight.grad
    after = router_entropy_loss(layer.route(x_TD).probs_TE)
    assert after < before  # lower loss = higher entropy of the batch-mean routing: a positive weight balances


def test_counters_advance_in_training_only_and_reset():
    layer = make_moe()
    x = torch.randn(3, 7, D, dtype=torch.float64)
    layer(x)
    assert layer.tokens_per_expert.sum() == 0
    layer.train()
    layer(x)
    routing = layer.route(x.reshape(-1, D))  # no noise configured, so the same routing
    assert torch.equal(layer.tokens_per_expert, torch.bincount(routing.experts_TK.flatten(), minlength=E).float())
    assert layer.tokens_per_expert.sum() == 3 * 7 * K
    layer.eval()
    layer(x)
    assert layer.tokens_per_expert.sum() == 3 * 7 * K
    layer.reset_counters()
    assert layer.tokens_per_expert.sum() == 0
    assert "tokens_per_expert" not in layer.state_dict()  # monitoring, not model state


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_activation_checkpointing_counts_each_token_once(reentrant):
    """A checkpointed forward is re-run during backward; the counters see only the first run."""
    layer = make_moe().train()
    x = torch.randn(3, 7, D, dtype=torch.float64, requires_grad=True)
    layer(x)[0].sum().backward()
    plain = layer.tokens_per_expert.clone()
    layer.reset_counters()
    y, _ = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=reentrant)
    y.sum().backward()
    assert plain.sum() == 3 * 7 * K
    assert torch.equal(layer.tokens_per_expert, plain)


def test_every_expert_receives_gradient_when_tokens_are_routed_to_it():
    layer = make_moe().train()
    x = torch.randn(4, 16, D, dtype=torch.float64)
    y, aux = layer(x)
    assert (layer.tokens_per_expert > 0).all()
    (y.square().sum() + aux["moe_balance"] + aux["router_entropy"]).backward()
    for name in ("down_weight", "down_bias", "up_weight", "up_bias"):
        grad = getattr(layer, name).grad
        assert all(grad[e].abs().sum() > 0 for e in range(E)), name
    assert layer.router.weight.grad.abs().sum(-1).gt(0).all()


def test_an_expert_without_tokens_gets_a_zero_gradient_and_no_error():
    layer = make_moe()
    with torch.no_grad():
        layer.router.weight[4] = -10.0  # with positive inputs, never among the top 2
    x = torch.rand(2, 9, D, dtype=torch.float64) + 0.1
    y, _ = layer(x)
    y.sum().backward()
    assert layer.up_weight.grad[4].abs().sum() == 0
    assert layer.up_weight.grad[:4].abs().sum() > 0


def test_router_noise_applies_in_training_only():
    noisy = make_moe(router_noise=1.0)
    x = torch.randn(2, 13, D, dtype=torch.float64)
    assert torch.equal(noisy(x)[0], noisy(x)[0])  # eval: deterministic
    noisy.train()
    assert not torch.equal(noisy.route(x.reshape(-1, D)).probs_TE, noisy.route(x.reshape(-1, D)).probs_TE)
    quiet = make_moe(router_noise=0.0)
    torch.testing.assert_close(quiet.train()(x)[0], quiet.eval()(x)[0], rtol=0, atol=0)


def test_bad_settings_are_rejected_with_the_value():
    with pytest.raises(ValueError, match="top_k=6 must be between 1 and n_experts=5"):
        MoE(D, R, E, 6)
    with pytest.raises(ValueError, match="activation='tanh' is unknown"):
        MoE(D, R, E, K, activation="tanh")


def test_builds_on_meta_and_init_zeroes_the_counters_after_materialising():
    with torch.device("meta"):
        layer = MoE(D, R, E, K)
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert layer.tokens_per_expert.sum() == 0 and torch.isfinite(layer.up_weight).all()
