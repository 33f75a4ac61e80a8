"""Every family's own config trains through `python -m platform.fit` and generates through its state."""

from __future__ import annotations

import torch

from lctrain.inference import load_model
from lctrain.inference.generation import generate_text
from lctrain.models.condenser import CondenserState
from lctrain.models.layers.attention import KVState
from lctrain.models.layers.self_extend import SelfExtendConfig
from lctrain.training.cli import fit
from tests.cli.test_fit import logged, read_metrics
from tests.helpers import quick_fit_args


def test_seqcond_debug_config_trains_and_its_loss_falls(tmp_path, builtin_data):
    run = tmp_path / "seqcond"
    fit(
        quick_fit_args(
            run, builtin_data, "--trainer.val_check_interval", "30", steps=30, config="configs/seqcond/debug.yaml"
        )
    )
    losses = [v for _, v in logged(read_metrics(run), "train/loss")]
    assert losses[-1] < 0.8 * losses[0], losses

    model, tokenizer = load_model(run)
    out = model(torch.tensor([tokenizer.encode("The quick ")]))
    sizes = [
        [t.numel() for t in (s.conv, s.den, s.re, s.im)] if isinstance(s, CondenserState) else s.length
        for s in out.state.layers
    ]
    for _ in range(20):
        out = model(out.logits[:, -1:].argmax(-1), state=out.state)
    after = [
        [t.numel() for t in (s.conv, s.den, s.re, s.im)] if isinstance(s, CondenserState) else s.length
        for s in out.state.layers
    ]
    for layer, before_size, after_size in zip(out.state.layers, sizes, after, strict=True):
        if isinstance(layer, KVState):
            assert after_size == before_size + 20  # attention keeps every key
        else:
            assert after_size == before_size  # the condenser's state does not grow with length

    text = generate_text(
        str(run),
        "The ",
        max_new_tokens=30,
        seed=1,
        stop_at_end_of_text=False,
        self_extend=SelfExtendConfig(group_size=2, window_size=16),
    )
    assert len(text) > 0
