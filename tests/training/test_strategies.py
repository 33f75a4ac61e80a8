"""Strategy building blocks that need no process group: activation checkpointing, the DeepSpeed configs in
the repository, and how trainer.strategy spellings map to strategy families."""

from __future__ import annotations

import copy

import pytest
import torch

from lctrain.cluster.strategies import Parallelism, checkpoint_blocks, family_of, repeated_blocks
from lctrain.models.registry import build_model
from tests.helpers import REPO


def loss_and_grads(model, ids):
    out = model(ids)
    out.logits.float().logsumexp(-1).mean().backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward (each storage once)."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids).logits.sum()
    return sum(saved.values())


def test_activation_checkpointing_keeps_names_outputs_and_gradients_and_saves_less():
    torch.manual_seed(0)
    plain = build_model("lswt", "debug", n_layers=3)
    checkpointed = copy.deepcopy(plain)
    checkpoint_blocks(checkpointed)
    ids = torch.randint(0, 512, (2, 33))
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in checkpointed.named_parameters()]
    logits, grads = loss_and_grads(plain, ids)
    logits_ckpt, grads_ckpt = loss_and_grads(checkpointed, ids)
    torch.testing.assert_close(logits_ckpt, logits, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7)
    assert saved_bytes(checkpointed, ids) < 0.5 * saved_bytes(plain, ids)


def test_repeated_blocks_are_the_elements_of_top_level_module_lists():
    model = build_model("lswt", "debug", n_layers=3)
    assert repeated_blocks(model) == list(model.blocks)


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_repository_deepspeed_configs_name_their_zero_stage(name):
    config = Parallelism(strategy="deepspeed", deepspeed_config=f"configs/deepspeed/{name}.json").deepspeed_dict()
    zero = config["zero_optimization"]
    assert zero["stage"] == int(name[4])
    assert ("offload_optimizer" in zero) == name.endswith("offload")
    assert "gradient_accumulation_steps" not in config  # Lightning sets it from the Trainer and refuses it here


def test_a_missing_deepspeed_config_is_named():
    with pytest.raises(FileNotFoundError, match="parallelism.deepspeed_config configs/deepspeed/zero9.json"):
        Parallelism(deepspeed_config="configs/deepspeed/zero9.json").deepspeed_dict()
    assert (REPO / "configs" / "deepspeed" / "zero3.json").is_file()


@pytest.mark.parametrize(
    "spelling,family",
    [("fsdp", "fsdp"), ("fsdp_cpu_offload", "fsdp"), ("deepspeed_stage_2", "deepspeed"), ("ddp", "ddp"),
     ("ddp_spawn", "ddp"), ({"class_path": "lightning.pytorch.strategies.FSDPStrategy"}, "fsdp"),
     ({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}, "fsdp2"), ("auto", ""), (None, "")],
)  # fmt: skip
def test_trainer_strategy_spellings_map_to_their_family(spelling, family):
    assert family_of(spelling) == family
