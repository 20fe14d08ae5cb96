"""improved_diffusion/experiments/stats.py: the one steps-to-target rule of the study and the ablation summary."""

import pytest

from improved_diffusion.experiments.stats import steps_to_target


def test_steps_to_target_closed_forms():
    steps = [100, 200, 300, 400]
    line = [1.0 - s / 1000 for s in steps]  # 0.9, 0.8, 0.7, 0.6
    # linear between two evaluations: the exact crossing of the line
    assert steps_to_target(steps, line, 0.75) == pytest.approx(250.0)
    assert steps_to_target(steps, line, 0.7) == pytest.approx(300.0)  # exactly at an evaluation
    assert steps_to_target(steps, line, 0.5) is None  # never reached
    assert steps_to_target(steps, line, 0.95) == 100.0  # reached at the first evaluation
    assert steps_to_target([], [], 1.0) is None
    # the first crossing counts, not a later one
    assert steps_to_target(steps, [1.0, 0.4, 0.9, 0.3], 0.5) == pytest.approx(100 + 0.5 / 0.6 * 100)
    # right after a missing evaluation: that evaluation's step (nothing to interpolate from)
    assert steps_to_target(steps, [0.9, None, 0.7, 0.6], 0.75) == 300.0
    assert steps_to_target(steps, [None, 0.9, 0.7, 0.6], 0.8) == pytest.approx(250.0)


def test_study_and_ablation_summary_share_the_rule():
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("summarize", os.path.join(root, "scripts", "launch", "summarize.py"))
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    from improved_diffusion.experiments import study

    assert summarize.steps_to_target is steps_to_target and study.steps_to_target is steps_to_target
