"""Carried state with row resets for every family: the training module resets single rows through the
contract's `reset_rows` (models/contract.py), on the streams batches of test_xl_training.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lctrain.models.registry import FAMILIES
from lctrain.training.module import LanguageModelModule
from tests.training.test_xl_training import VOCAB, B, RecordLosses, StreamsData, T, stream_tokens, trainer

NO_NOISE = {"serriform": dict(router_noise=0.0)}  # router noise in training would differ from the eval forward


def segment_ce(model, stream, start, segment):
    """CE of `segment` of one stream under one forward that begins at segment `start`."""
    ids = stream[start * T : (segment + 1) * T + 1].unsqueeze(0)
    logits = model(ids[:, :-1]).logits[:, (segment - start) * T :]  # (1, T, V)
    return F.cross_entropy(logits.flatten(0, 1), ids[0, 1 + (segment - start) * T :], reduction="sum")


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_carried_training_with_a_row_reset_equals_fresh_forwards(tmp_path, arch):
    """lr 0, float64: each step's loss equals its segment's CE inside one forward over the stream, and row 1,
    which begins a new stream at segment 2, equals a forward that starts there (≤1e-10)."""
    torch.manual_seed(0)
    lm = LanguageModelModule(
        arch,
        "debug",
        model_config=dict(vocab_size=VOCAB, **NO_NOISE.get(arch, {})),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.0),
        scheduler=None,
        aux_loss_weights=dict(moe_balance=0.0, router_entropy=0.0),
        carry_state=True,
    )
    tokens, resets, record = stream_tokens(B, n_segments=4), {2: [1]}, RecordLosses()
    data = StreamsData(tokens, accumulate=1, resets=resets)
    trainer(tmp_path, steps=4, precision="64-true", callbacks=[record]).fit(lm, datamodule=data)
    model = lm.model.eval()
    for segment, loss in enumerate(record.losses):
        starts = [2 if (r in resets[2] and segment >= 2) else 0 for r in range(B)]
        total = sum(segment_ce(model, tokens[r], starts[r], segment) for r in range(B))
        torch.testing.assert_close(loss, total / (B * T), rtol=0, atol=1e-10)
