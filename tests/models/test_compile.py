"""torch.compile: every family's forward (training, prefill and one-token decoding) traces without a graph break,
and a model whose blocks are compiled (`model.compile`) trains and decodes as the eager one does."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from lctrain.cluster.strategies import checkpoint_blocks
from lctrain.models.registry import build_model
from lctrain.training.cli import fit
from lctrain.training.module import LanguageModelModule, compile_blocks, compile_options
from tests.helpers import quick_fit_args

FAMILIES = ["lswt", "seqcond", "serriform"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def break_reasons(explanation) -> list[str]:
    return [f"{b.reason} at {b.user_stack[-1] if b.user_stack else '?'}" for b in explanation.break_reasons]


@pytest.mark.parametrize("arch", FAMILIES)
def test_every_family_forward_has_no_graph_break(arch):
    torch.manual_seed(0)
    model = build_model(arch, "debug")
    ids = torch.randint(0, 100, (2, 12))
    training = torch._dynamo.explain(model)(ids, return_hidden=True)
    assert training.graph_break_count == 0, break_reasons(training)
    assert training.graph_count == 1
    model.eval()
    with torch.no_grad():
        prefill = model(ids[:, :8])
        torch._dynamo.reset()
        decode = torch._dynamo.explain(model)(ids[:, 8:9], prefill.state)
    assert decode.graph_break_count == 0, break_reasons(decode)


@pytest.mark.parametrize("arch", FAMILIES)
def test_compiled_blocks_train_like_eager_ones(arch):
    """Checkpointed and compiled blocks (aot_eager: AOTAutograd's graphs, no C++ build): the same loss and
    gradients as the eager model."""
    torch.manual_seed(0)
    eager, compiled = build_model(arch, "debug"), build_model(arch, "debug")
    compiled.load_state_dict(eager.state_dict())
    checkpoint_blocks(compiled)
    compile_blocks(compiled, {"backend": "aot_eager"})
    ids = torch.randint(0, 100, (2, 12))
    for model in (eager, compiled):
        model.eval()  # no router noise: both see the same routing
        out = model(ids)
        (out.logits.float().logsumexp(-1).mean() + sum(out.aux_losses.values(), torch.zeros(()))).backward()
    torch.testing.assert_close(compiled(ids).logits, eager(ids).logits, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", FAMILIES)
def test_compiled_blocks_decode_like_eager_ones(arch):
    """Prefill 6 tokens, then 3 one-token calls passing the state along, compiled against eager."""
    torch.manual_seed(0)
    eager = build_model(arch, "debug").eval()
    compiled = build_model(arch, "debug").eval()
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled, {"backend": "aot_eager", "dynamic": True})
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        states = {}
        for name, model in (("eager", eager), ("compiled", compiled)):
            out = model(ids[:, :6])
            logits = [out.logits]
            for t in range(6, 9):
                out = model(ids[:, t : t + 1], out.state)
                logits.append(out.logits)
            states[name] = torch.cat(logits, dim=1)  # (1, 9, V)
    torch.testing.assert_close(states["compiled"], states["eager"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states["eager"], eager(ids).logits, rtol=1e-4, atol=1e-5)  # decode = forward


def test_the_module_compiles_its_blocks_when_asked():
    lm = LanguageModelModule("lswt", "debug", vocab_size=64, compile={"backend": "aot_eager", "dynamic": False})
    lm.configure_model()
    assert all(block._compiled_call_impl is not None for block in lm.model.blocks)
    plain = LanguageModelModule("lswt", "debug", vocab_size=64)
    plain.configure_model()
    assert all(block._compiled_call_impl is None for block in plain.model.blocks)


def test_compile_options_are_checked():
    assert compile_options(False) is None and compile_options(True) == {}
    assert compile_options({"mode": "max-autotune", "dynamic": True}) == {"mode": "max-autotune", "dynamic": True}
    with pytest.raises(ValueError, match="model.compile.speed is not a compile option"):
        LanguageModelModule(vocab_size=64, compile={"speed": 11})


@pytest.mark.slow
def test_inductor_compiles_lswt_on_this_machine():
    """The default backend (inductor, C++ on CPU) builds and runs the debug LSWT's blocks."""
    torch.manual_seed(0)
    model = build_model("lswt", "debug")
    expected = model(torch.arange(16)[None]).logits
    compile_blocks(model, {})
    torch.testing.assert_close(model(torch.arange(16)[None]).logits, expected, rtol=1e-4, atol=1e-5)


def test_the_command_line_trains_with_compiled_blocks(tmp_path, builtin_data):
    compile_arg = '{"backend": "aot_eager", "dynamic": false}'
    cli = fit(quick_fit_args(tmp_path / "run", builtin_data, "--model.compile", compile_arg, steps=3))
    assert all(block._compiled_call_impl is not None for block in cli.model.model.blocks)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize(
    "arch,scan_kernel,ops",
    [
        ("seqcond", "auto", ["condenser", "recurrence"]),
        ("serriform", "auto", ["recurrence"]),
        ("seqcond", "torch", []),
        ("lswt", None, []),
    ],
)
def test_compiling_first_runs_the_kernel_checks_each_family_would_run(monkeypatch, arch, scan_kernel, ops):
    """A graph traced before a Triton op's once-per-device check keeps the PyTorch path, so compile_blocks
    runs every check the model's layers name (scan_kernel 'auto' only) on the device, then compiles."""
    from lctrain.models.layers import scan as scan_module

    events = []

    def recording_use_triton_kernel(kernel, x, op="recurrence", pairs=None):
        events.append(("check", op, x.device.type))
        return False

    monkeypatch.setattr(scan_module, "use_triton_kernel", recording_use_triton_kernel)
    overrides = {} if scan_kernel is None else {"scan_kernel": scan_kernel}
    model = build_model(arch, "debug", **overrides)
    for block in model.blocks:
        monkeypatch.setattr(block, "compile", lambda **kwargs: events.append(("compile",)))
    compile_blocks(model, {"backend": "aot_eager"}, torch.device("cpu"))
    checks = [e for e in events if e[0] == "check"]
    assert sorted({op for _, op, _ in checks}) == sorted(ops)
    assert all(device == "cpu" for _, _, device in checks)
    assert events[len(checks) :] == [("compile",)] * len(model.blocks)  # every check before any compile
