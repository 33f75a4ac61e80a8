"""The loss-spike detector: a loss far above the recent mean is counted and logged, nothing else is."""

from __future__ import annotations

import math
import random

import pytest

from lctrain.training.callbacks import LossSpikeDetector
from lctrain.training.cli import fit
from tests.helpers import quick_fit_args


def reference_z(history: list[float], loss: float) -> float:
    """The z-score written out: mean and population standard deviation of the window, in plain sums."""
    mean = sum(history) / len(history)
    std = math.sqrt(sum((x - mean) ** 2 for x in history) / len(history))
    return (loss - mean) / std


def test_a_jump_is_a_spike_and_noise_is_not():
    rng = random.Random(0)
    detector = LossSpikeDetector(window=50, threshold=6.0, min_history=10)
    losses = [3.0 - 0.001 * i + rng.gauss(0, 0.02) for i in range(200)]
    assert [detector.observe(x) for x in losses] == [None] * 200
    history = list(detector.recent)
    z = detector.observe(5.0)
    assert z == pytest.approx(reference_z(history, 5.0), rel=1e-12) and z > 6
    assert detector.spikes == 1 and len(detector.recent) == 50


def test_nothing_is_judged_before_enough_history_and_nan_is_left_to_the_guard():
    detector = LossSpikeDetector(window=8, threshold=2.0, min_history=4)
    assert [detector.observe(x) for x in (1.0, 1.0, 1.0, 100.0)] == [None] * 4  # 3 losses: no judgement yet
    assert detector.observe(float("nan")) is None and len(detector.recent) == 4


def test_state_survives_a_checkpoint():
    detector = LossSpikeDetector(window=4, threshold=3.0, min_history=2)
    for x in (1.0, 1.1, 0.9, 30.0):
        detector.observe(x)
    restored = LossSpikeDetector(window=4, threshold=3.0, min_history=2)
    restored.load_state_dict(detector.state_dict())
    assert list(restored.recent) == list(detector.recent) and restored.spikes == detector.spikes == 1


@pytest.mark.parametrize("args", [dict(window=-1), dict(threshold=0), dict(min_history=1)])
def test_bad_settings_are_named(args):
    with pytest.raises(ValueError, match="loss_spike"):
        LossSpikeDetector(**args)


def test_the_detector_is_on_in_a_run_and_can_be_turned_off(tmp_path, builtin_data):
    on = fit(quick_fit_args(tmp_path / "on", builtin_data, steps=3))
    off = fit(quick_fit_args(tmp_path / "off", builtin_data, "--loss_spike.window", "0", steps=3))
    detectors = [[c for c in cli.trainer.callbacks if isinstance(c, LossSpikeDetector)] for cli in (on, off)]
    assert len(detectors[0][0].recent) == 3  # one loss per micro-batch
    assert detectors[1][0].window == 0 and len(detectors[1][0].recent) == 0
