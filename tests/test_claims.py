"""The claims rule (improved_diffusion/experiments/claims.py): paired t-intervals computed by
hand, verdicts on constructed studies whose answer is known, the sweep's duplicate point."""
import json
import math
import os
import subprocess
import sys

import pytest

from improved_diffusion.experiments import claims, study
from tiny import ROOT

T_975_DF2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (tables)


def _records(values, metric="digit_fid", step=10):
    """Per-run records {variant: [value of seed 0, seed 1, ...]} at one step."""
    return [dict(variant=v, seed=s, evals={str(step): {metric: x}}) for v, xs in values.items()
            for s, x in enumerate(xs) if x is not None]


def _summary(variants, steps=10, eval_steps=(5, 10), stt=None):
    return dict(steps=steps, eval_steps=list(eval_steps),
                variants={v: {"steps_to_baseline_previous": {"digit_fid": (stt or {}).get(v, {})}} for v in variants})


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences():
    records = _records({"md": [8.0, 7.0, 6.0], "baseline": [10.0, 10.0, 10.0]})
    d = claims.paired(records, "md", "baseline", "digit_fid", 10)
    half = T_975_DF2 * 1.0 / math.sqrt(3)  # differences -2, -3, -4: mean -3, sd 1
    assert (d["n"], d["mean"]) == (3, pytest.approx(-3.0))
    assert (d["lo"], d["hi"]) == (pytest.approx(-3 - half), pytest.approx(-3 + half))
    assert claims.verdict(d) == claims.HOLDS


def test_only_the_seeds_both_variants_ran_are_paired():
    records = _records({"md": [1.0, 2.0, 30.0], "baseline": [0.0, 0.0, None]})
    d = claims.paired(records, "md", "baseline", "digit_fid", 10)
    assert d["n"] == 2 and d["mean"] == pytest.approx(1.5)


@pytest.mark.parametrize("method, expected", [
    ([12.0, 13.0, 14.0], claims.FAILS),    # worse in every seed, tightly
    ([8.0, 12.0, 9.0], claims.UNKNOWN),    # the interval straddles zero
    ([9.0, None, None], claims.UNKNOWN),   # one seed: no interval
])
def test_verdicts(method, expected):
    d = claims.paired(_records({"clts": method, "baseline": [10.0, 10.0, 10.0]}), "clts", "baseline", "digit_fid", 10)
    assert claims.verdict(d) == expected


def _row(rows, start):
    return next(r for r in rows if r[0].startswith(start))


def test_all_three_are_best_only_when_they_beat_every_single_module():
    values = {"baseline": [10.0, 10.2, 9.9], "md": [9.0, 9.1, 8.8], "md_lrc": [8.0, 8.3, 7.9],
              "clts": [9.5, 9.6, 9.4], "all": [7.0, 7.1, 6.9]}
    rows = claims.judge(_records(values), _summary(values))
    assert _row(rows, "all three")[1] == claims.HOLDS
    assert _row(rows, "MD alone")[1] == claims.HOLDS and _row(rows, "LRC on top")[1] == claims.HOLDS
    values["md_lrc"] = [6.0, 6.05, 5.9]  # better than all three together, in every seed
    rows = claims.judge(_records(values), _summary(values))
    assert _row(rows, "all three")[1] == claims.FAILS
    assert "all - md_lrc (3 seeds)" in _row(rows, "all three")[2]


def test_missing_variants_cannot_be_told_and_are_named():
    values = {"baseline": [10.0, 10.0, 10.0], "md": [9.0, 9.5, 9.2]}
    rows = claims.judge(_records(values), _summary(values))
    assert _row(rows, "CLTS alone") == ("CLTS alone helps", claims.UNKNOWN, "not run yet: clts")
    assert _row(rows, "mu near")[1] == claims.UNKNOWN


def test_mu_claim_compares_all_with_the_other_sweep_points_and_rivals_are_listed():
    values = {"baseline": [10.0, 10.0], "all": [8.0, 8.2], "all_clts_mu=0.1": [9.0, 9.3],
              "all_clts_mu=0.5": [8.5, 8.6], "lognormal": [7.0, 7.4]}
    rows = claims.judge(_records(values), _summary(values))
    mu = _row(rows, "mu near 0.3")
    assert "all - all_clts_mu=0.1 (2 seeds)" in mu[2] and "all - all_clts_mu=0.5 (2 seeds)" in mu[2]
    assert _row(rows, "rival lognormal")[0] == "rival lognormal beats the baseline"
    assert not any("all_clts_mu" in r[0] for r in rows)


@pytest.mark.parametrize("stt, expected", [
    (dict(mean=500, speedup=2.4, speedup_lo=1.6, speedup_hi=3.5, reached=3, of=3), claims.HOLDS),
    (dict(mean=1100, speedup=0.91, speedup_lo=0.83, speedup_hi=1.01, reached=3, of=3), claims.FAILS),
    (dict(mean=800, speedup=1.3, speedup_lo=0.9, speedup_hi=2.2, reached=3, of=3), claims.UNKNOWN),
    (dict(mean=None, reached=2, of=3), claims.FAILS),  # a seed never reaches the target: below 0.8x there
    ({}, claims.UNKNOWN),
])
def test_speedup_verdict(stt, expected):
    assert claims.speedup_verdict(stt) == expected


def test_the_sweep_does_not_rerun_the_base_variant():
    plan = study.run_plan(study.PRESETS["digits_paper"], [], [0, 1], ["clts_mu", "clts_sigma"], [0, 1])
    names = {name for name, *_ in plan}
    assert names == {"all_clts_mu=0.1", "all_clts_mu=0.5", "all_clts_mu=0.7", "all_clts_sigma=0.05",
                     "all_clts_sigma=0.1", "all_clts_sigma=0.2", "all_clts_sigma=0.5"}  # 0.3 and 1.0: `all` itself


def test_the_lr_curve_control_is_judged_against_md_lrc_not_listed_as_a_rival():
    values = {"baseline": [10.0, 10.0, 10.0], "md_lrc": [7.0, 7.2, 6.9], "lrc_curve": [7.1, 7.0, 7.0]}
    rows = claims.judge(_records(values), _summary(values))
    control = _row(rows, "MD + LRC is more than its lr decay")
    assert control[1] == claims.UNKNOWN and "md_lrc - lrc_curve (3 seeds)" in control[2]
    assert not any("rival lrc_curve" in r[0] for r in rows)


def test_md_lrc_is_judged_against_every_lower_lr_baseline_which_is_not_a_rival():
    values = {"baseline": [10.0, 10.0], "md_lrc": [7.0, 7.2], "baseline_lr=0.001": [8.0, 8.3],
              "baseline_lr=0.0005": [6.0, 6.1]}
    rows = claims.judge(_records(values), _summary(values))
    control = _row(rows, "MD + LRC beats the baseline at a lower constant lr")
    # md_lrc - 0.001: -1.0, -1.1 (holds); md_lrc - 0.0005: +1.0, +1.1 (does not hold): all of them fails
    assert control[1] == claims.FAILS
    assert control[2].index("md_lrc - baseline_lr=0.0005 (2 seeds)") < control[2].index("md_lrc - baseline_lr=0.001")
    assert not any(r[0].startswith("rival baseline_lr") for r in rows)


def test_side_by_side_keeps_the_digit_fid_differences_and_the_speedups_of_both_emas():
    values = {"baseline": [10.0, 10.0, 10.0], "md": [8.0, 7.0, 6.0], "minsnr": [9.0, None, None]}
    best_values = {"baseline": [9.0, 9.0, 9.0], "md": [9.5, 9.0, 10.0], "minsnr": [8.0, None, None]}
    stt = {"md": dict(mean=800, speedup=1.25, speedup_lo=1.1, speedup_hi=1.4, reached=3, of=3)}
    fixed = claims.judge(_records(values), _summary(values, stt=stt))
    best = claims.judge(_records(best_values), _summary(best_values))
    table = claims.side_by_side(fixed, best)
    cells = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in table.splitlines()]
    md = _row(cells, "MD alone helps")
    assert md[1:3] == ["**holds**", "**cannot tell**"]
    half = T_975_DF2 / math.sqrt(3)  # differences -2, -3, -4
    assert md[3] == f"md - baseline: -3.0 [{-3 - half:+.1f}, {-3 + half:+.1f}]; speed-up 1.25x [1.10, 1.40]"
    assert md[4].startswith("md - baseline: +0.5 [") and md[4].endswith("; speed-up no steps-to-target record")
    rival = _row(cells, "rival minsnr")
    assert rival[3].startswith("minsnr - baseline: -1.0 (one seed); speed-up")
    assert "recognisable" not in table and "eps-MSE" not in table


@pytest.mark.parametrize("preset", ["digits", "digits_paper"])
def test_committed_study_summaries_re_render_from_their_runs(preset):
    """The committed results (docs/results.md sections 4 and 6) come back from their run
    records with today's statistics, steps-to-target rule, best-EMA tables and claims."""
    out = os.path.join(ROOT, "docs", "study", preset)
    summary = study.summary_of(study.PRESETS[preset], out, preset)
    with open(os.path.join(out, "summary.json")) as f:
        assert json.loads(json.dumps(summary)) == json.load(f)


def _plan(*flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "study.py"), "--plan", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_an_unknown_sweep_is_refused_by_name():
    proc = _plan("--sweeps", "clts_nu")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--sweeps: unknown clts_nu; valid: all, clts_sigma" in proc.stderr
    proc = _plan("--sweeps", "baseline_lr", "--variants", "baseline")
    assert proc.returncode == 0, proc.stderr
    names = [line.split("\t")[0] for line in proc.stdout.strip().splitlines()]
    assert names == ["baseline"] * 3 + ["baseline_lr=0.0005"] * 2 + ["baseline_lr=0.001"] * 2
