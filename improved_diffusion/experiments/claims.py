"""
The paper's claims (SPEC.md section 3: each module helps, all three together are best, mu
near 0.3 is best, about 2x fewer steps), two controls of ours (MD + LRC against its lr
curve alone and against a baseline at a lower constant lr), and how each rival compares,
judged from a study's runs by one written rule, so that the verdicts of docs/results.md are
recomputed, not typed.

A comparison pairs two variants by seed (a seed fixes the initial weights and the data
order of every variant) at the final step, on the digit-FID: lower is better, and it is the
measure the steps-to-target protocol reads. It **holds** when the t-interval of (method -
reference) lies wholly below zero, **does not hold** when it lies wholly above, and is
**cannot tell** otherwise (or with fewer than two common seeds). The speed-up claim holds
when the speed-up's interval excludes 1 and reaches the paper's factor, and does not hold
when it lies below the factor or some seed never reaches the target within the run.
"""

import re

from .stats import mean_interval

PRIMARY = "digit_fid"
PAPER_SPEEDUP = 2.0  # CIFAR-10, SPEC.md section 3 (2.6x on ImageNet-128)
HOLDS, FAILS, UNKNOWN = "holds", "does not hold", "cannot tell"

# (claim, method, references): the method must beat every reference.
MODULE_CLAIMS = (
    ("MD alone helps", "md", ("baseline",)),
    ("LRC on top of MD helps", "md_lrc", ("md",)),
    ("CLTS alone helps", "clts", ("baseline",)),
    ("all three together are best", "all", ("baseline", "md", "md_lrc", "clts")),
    # Ours, not the paper's: LRC lowers the lr as beta1 falls; `lrc_curve` has that lr curve
    # with beta1 held (methods/momentum.py), so this asks what MD adds to the decay.
    ("MD + LRC is more than its lr decay", "md_lrc", ("lrc_curve",)),
)
NOT_RIVALS = {v for _, method, refs in MODULE_CLAIMS for v in (method,) + refs}
PAPER_MU = 0.3


def paired(records, method, reference, metric, step, level=0.95):
    """Mean and t-interval over the common seeds of method - reference at `step`."""
    ref = {r["seed"]: r["evals"].get(str(step), {}).get(metric) for r in records if r["variant"] == reference}
    diffs = [r["evals"].get(str(step), {}).get(metric) - ref[r["seed"]] for r in records
             if r["variant"] == method and ref.get(r["seed"]) is not None
             and r["evals"].get(str(step), {}).get(metric) is not None]
    return mean_interval(diffs, level)


def verdict(diff):
    """holds / does not hold / cannot tell for a lower-is-better paired difference."""
    if diff["mean"] is None or diff["lo"] is None:
        return UNKNOWN
    if diff["hi"] < 0:
        return HOLDS
    if diff["lo"] > 0:
        return FAILS
    return UNKNOWN


def _interval(m, scale=1.0, digits=2):
    if m["mean"] is None:
        return "-"
    if m["lo"] is None:
        return f"{m['mean'] * scale:+.{digits}f} (one seed)"
    return f"{m['mean'] * scale:+.{digits}f} [{m['lo'] * scale:+.{digits}f}, {m['hi'] * scale:+.{digits}f}]"


def _evidence(records, method, reference, step, level):
    d = paired(records, method, reference, PRIMARY, step, level)
    rec = paired(records, method, reference, "recognisable", step, level)
    mse = paired(records, method, reference, "heldout_mse", step, level)
    text = (f"{method} - {reference} ({d['n']} seed{'' if d['n'] == 1 else 's'}): digit-FID {_interval(d, digits=1)}, recognisable "
            f"{_interval(rec, 100, 1)} points, eps-MSE {_interval(mse, 1, 5)}")
    return verdict(d), text


def _speedup_text(stt):
    if not stt:
        return "no steps-to-target record"
    if stt.get("mean") is None:
        return f"{stt['of'] - stt['reached']} of {stt['of']} seeds never reach the target within the run"
    if stt.get("speedup_lo") is None:
        return f"{stt['speedup']:.2f}x (no interval)"
    return f"{stt['speedup']:.2f}x [{stt['speedup_lo']:.2f}, {stt['speedup_hi']:.2f}]"


def speedup_verdict(stt, factor=PAPER_SPEEDUP):
    """The paper's speed-up factor against one steps-to-target record (study.summarize)."""
    if not stt:
        return UNKNOWN
    if stt.get("mean") is None:
        return FAILS if stt.get("reached", 0) < stt.get("of", 0) else UNKNOWN
    lo, hi = stt.get("speedup_lo"), stt.get("speedup_hi")
    if lo is None or hi is None:
        return UNKNOWN
    if hi < factor:
        return FAILS
    if lo > 1:
        return HOLDS
    return UNKNOWN


def _all_of(judged):
    """A claim that must hold against every reference: holds if it holds against all, does
    not hold if it fails against any."""
    verdicts = {v for v, _ in judged}
    return HOLDS if verdicts == {HOLDS} else FAILS if FAILS in verdicts else UNKNOWN


def _steps_to_target(summary, variant):
    return summary["variants"].get(variant, {}).get("steps_to_baseline_previous", {}).get(PRIMARY)


def judge(records, summary, level=0.95):
    """
    Rows (claim, verdict, evidence) for the paper's claims and the rivals, from the finished
    runs' records and the study summary of the same records (its steps to target).
    """
    step = summary["steps"]
    present = {r["variant"] for r in records}
    rows = []
    for claim, method, refs in MODULE_CLAIMS:
        missing = [v for v in (method,) + refs if v not in present]
        if missing:
            rows.append((claim, UNKNOWN, "not run yet: " + ", ".join(missing)))
            continue
        judged = [_evidence(records, method, ref, step, level) for ref in refs]
        rows.append((claim, _all_of(judged), "; ".join(text for _, text in judged)
                     + "; speed-up on digit-FID " + _speedup_text(_steps_to_target(summary, method))))
    swept = sorted(v for v in present if v.startswith("all_clts_mu=") and float(v.split("=")[1]) != PAPER_MU)
    if "all" in present and swept:
        judged = [_evidence(records, "all", other, step, level) for other in swept]
        rows.append((f"mu near {PAPER_MU} is best (all, mu {PAPER_MU}, against the sweep)", _all_of(judged),
                     "; ".join(text for _, text in judged)))
    else:
        rows.append((f"mu near {PAPER_MU} is best", UNKNOWN, "the clts_mu sweep has not run yet"))
    # Ours, not the paper's: is MD + LRC's gain only that the baseline's constant lr is too high?
    lower_lr = sorted((v for v in present if v.startswith("baseline_lr=")), key=lambda v: float(v.split("=")[1]))
    if "md_lrc" in present and lower_lr:
        judged = [_evidence(records, "md_lrc", other, step, level) for other in lower_lr]
        rows.append(("MD + LRC beats the baseline at a lower constant lr", _all_of(judged),
                     "; ".join(text for _, text in judged)))
    stt = _steps_to_target(summary, "all")
    target = summary["eval_steps"][-2] if len(summary["eval_steps"]) > 1 else step
    rows.append((f"about {PAPER_SPEEDUP:g}x fewer steps (all three)", speedup_verdict(stt),
                 f"steps to the baseline's step-{target} digit-FID: " + _speedup_text(stt)))
    for rival in sorted(v for v in present - NOT_RIVALS if "=" not in v):
        judged = [_evidence(records, rival, ref, step, level) for ref in ("baseline", "all") if ref in present]
        if not judged:
            continue
        rows.append((f"rival {rival} beats the baseline", judged[0][0], "; ".join(text for _, text in judged)
                     + "; speed-up on digit-FID " + _speedup_text(_steps_to_target(summary, rival))))
    return rows


def markdown(rows):
    lines = ["| claim | verdict | evidence (paired at the final step; 95% t-intervals) |", "|---|---|---|"]
    lines += [f"| {claim} | **{v}** | {evidence} |" for claim, v, evidence in rows]
    return "\n".join(lines) + "\n"


def _digit_fid_only(evidence):
    """The evidence of a row cut to its digit-FID differences and speed-up, for a table."""
    value = r"(?:[+-][\d.]+(?: \[[^\]]*\]| \(one seed\))?|-)"  # as _interval writes it
    text = re.sub(rf" \(\d+ seeds?\): digit-FID ({value}), recognisable .*? points, eps-MSE {value}", r": \1", evidence)
    return text.replace("speed-up on digit-FID", "speed-up")


def side_by_side(fixed, best, fixed_name="fixed EMA", best_name="best post-hoc EMA"):
    """One table of the claims at two EMAs (rows of `judge` for each), digit-FID only."""
    best = {claim: (v, e) for claim, v, e in best}
    lines = [f"| claim | {fixed_name} | {best_name} | paired digit-FID difference [95% CI]; speed-up, {fixed_name} | "
             f"the same, {best_name} |", "|---|---|---|---|---|"]
    for claim, v, evidence in fixed:
        bv, be = best.get(claim, (UNKNOWN, "-"))
        lines.append(f"| {claim} | **{v}** | **{bv}** | {_digit_fid_only(evidence)} | {_digit_fid_only(be)} |")
    return "\n".join(lines) + "\n"
