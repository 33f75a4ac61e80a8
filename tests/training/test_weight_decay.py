"""Which parameters decay: each layer flags its own with `_no_weight_decay`, and the optimizer's groups read the
flagged names, taken before sharding replaces the parameter objects (training/optimizers.py."""

from __future__ import annotations

import fnmatch

import pytest
import torch
from torch import nn

from lctrain.cluster.strategies import build_for_strategy, named_parameters, repeated_blocks
from lctrain.models.registry import FAMILIES, build_model, config_for, family
from lctrain.training.optimizers import no_weight_decay_names, parameter_groups

# Name patterns (fnmatch: `*` also spans dots) of the debug sizes, plus one LSWT with attention registers and a
# SerriformNet with the dense low-rank feed-forward instead of the experts.
CASES = {
    "lswt": ("lswt", {}),
    "lswt-registers": ("lswt", dict(n_registers=2)),
    "seqcond": ("seqcond", {}),
    "serriform": ("serriform", {}),
    "serriform-lowrank": ("serriform", dict(use_moe=False)),
}
UNDECAYED = {
    "lswt": ["*norm.weight", "*norm.bias", "blocks.*.attention.*.bias", "blocks.*.feed_forward.*.bias"],
    "seqcond": [
        "*norm.weight",  # RMSNorm: a scale, no shift
        "blocks.*.feed_forward.*.bias",
        "blocks.*.condenser.theta_raw",  # the frequency grid
        "blocks.*.condenser.integration_raw",  # its quadrature weights
        "blocks.*.condenser.decay_raw",
        "blocks.*.condenser.score_scale",
        "blocks.*.condenser.score_bias",
        "blocks.*.condenser.phase_scale",
    ],
    "serriform": [
        "*norm.weight",  # RMSNorm: a scale, no shift
        "lm_head.bias",
        "blocks.*.conv.*.bias",
        "blocks.*.fusion.*.bias",
        "blocks.*.recurrence.alpha_logit",
        "blocks.*.recurrence.beta",
        "blocks.*.moe.down_bias",
        "blocks.*.moe.up_bias",
    ],
}
DECAYED = {
    "lswt": [
        "embed.weight",
        "input_proj.weight",
        "output_proj.weight",
        "blocks.*.attention.*.weight",
        "blocks.*.feed_forward.*.weight",
    ],
    "seqcond": [
        "embed.weight",
        "blocks.*.condenser.in_proj.weight",
        "blocks.*.condenser.conv_weight",
        "blocks.*.condenser.gate.weight",
        "blocks.*.condenser.readout",
        "blocks.*.condenser.out.weight",
        "blocks.*.attention.*.weight",
        "blocks.*.feed_forward.*.weight",
    ],
    "serriform": [
        "embed.weight",
        "lm_head.weight",
        "blocks.*.conv.*.weight",
        "blocks.*.fusion.*.weight",
        "blocks.*.moe.router.weight",
        "blocks.*.moe.down_weight",
        "blocks.*.moe.up_weight",
    ],
}
UNDECAYED["lswt-registers"] = [
    *UNDECAYED["lswt"],
    "blocks.*.attention.register_keys",
    "blocks.*.attention.register_values",
]
DECAYED["lswt-registers"] = DECAYED["lswt"]
UNDECAYED["serriform-lowrank"] = [p for p in UNDECAYED["serriform"] if ".moe." not in p] + [
    "blocks.*.feed_forward.*.bias"
]
DECAYED["serriform-lowrank"] = [p for p in DECAYED["serriform"] if ".moe." not in p] + [
    "blocks.*.feed_forward.*.weight"
]


def matching(names, patterns):
    return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def test_every_family_is_covered():
    assert {arch for arch, _ in CASES.values()} == set(FAMILIES)


@pytest.mark.parametrize("case", CASES)
def test_undecayed_parameters_are_exactly_the_flagged_biases_norms_registers_and_grids(case):
    arch, overrides = CASES[case]
    model = build_model(arch, "debug", **overrides)
    names = {n for n, _ in model.named_parameters()}
    undecayed, decayed = matching(names, UNDECAYED[case]), matching(names, DECAYED[case])
    assert not undecayed & decayed, sorted(undecayed & decayed)
    assert undecayed | decayed == names, sorted(names - undecayed - decayed)
    assert no_weight_decay_names(model) == undecayed
    for pattern in UNDECAYED[case] + DECAYED[case]:  # each pattern names something: none is out of date
        assert matching(names, [pattern]), pattern


@pytest.mark.parametrize("case", CASES)
def test_biases_norms_and_registers_are_undecayed_and_every_linear_and_embedding_weight_decays(case):
    arch, overrides = CASES[case]
    model = build_model(arch, "debug", **overrides)
    no_decay = no_weight_decay_names(model)
    for name, _ in model.named_parameters():
        if name.endswith("bias") or "norm" in name or "register" in name:
            assert name in no_decay, name
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            assert f"{module_name}.weight" not in no_decay, module_name


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_flags_are_set_on_a_meta_device_build_and_read_before_wrapping(arch):
    """Sharded strategies build on the meta device and replace the parameters; the flagged names come from the
    build, and activation checkpointing keeps the names."""
    expected = no_weight_decay_names(build_model(arch, "debug"))
    with torch.device("meta"):
        meta = build_model(arch, "debug")
    assert no_weight_decay_names(meta) == expected
    config = config_for(arch, "debug")
    model, no_decay = build_for_strategy(family(arch).model, config, None, activation_checkpointing=True)
    assert no_decay == expected == no_weight_decay_names(model)


def test_groups_follow_the_names_after_fsdp2_replaces_the_parameters(port):
    """fully_shard on a one-rank gloo group swaps every parameter for a DTensor without the flag; the names
    read from the meta-device build still put each one in the right group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    with torch.device("meta"):
        model = build_model("serriform", "debug")
    no_decay = no_weight_decay_names(model)
    for block in repeated_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert no_weight_decay_names(model) == set()  # the flags did not survive
    decay, plain = parameter_groups(named_parameters(model), no_decay)
    assert plain["weight_decay"] == 0.0 and "weight_decay" not in decay
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert {by_id[id(p)] for p in plain["params"]} == no_decay
    assert {by_id[id(p)] for p in decay["params"]} == set(by_id.values()) - no_decay
