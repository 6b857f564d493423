"""A sweep's warnings (sweep.findings)."""

from __future__ import annotations

from sweep import search_space


def sweep_record(trials: list[tuple[dict, float]], spec: str = "temperature=1:10:log,alpha=0.1:0.9"):
    """A summary.json sweep record of complete trials ((params, value) each), the first best."""
    import json

    from optuna.distributions import distribution_to_json

    from core import records

    space = {name: json.loads(distribution_to_json(dist)) for name, dist in search_space.parse_spec(spec).items()}
    done = [records.SweepTrial(number=n, state="complete", params=params, epochs=1, value=value, curve=[value])
            for n, (params, value) in enumerate(trials)]
    best = max(done, key=lambda trial: trial.value)
    return records.SweepRecord(spec=spec, metric="top1", direction="maximize", storage="s", study_name="s",
                               trials_requested=len(done), distributions=space,
                               best_trial=best.number, best_params=best.params, best_value=best.value, trials=done)


def test_sweep_warnings_name_flat_validation_and_a_best_value_at_the_edge():
    from sweep import findings

    flat = sweep_record([({"temperature": 4.0, "alpha": 0.5}, 0.9), ({"temperature": 2.0, "alpha": 0.3}, 0.9)])
    warnings = findings.sanity_warnings(flat)
    assert len(warnings) == 1 and "Every finished trial of the sweep scored the same validation top1" in warnings[0]
    edge = sweep_record([({"temperature": 9.9, "alpha": 0.5}, 0.95), ({"temperature": 2.0, "alpha": 0.3}, 0.9)])
    warnings = findings.sanity_warnings(edge)
    assert len(warnings) == 1 and "temperature (9.9) lies at the high end of its range (1 to 10)" in warnings[0]


def test_a_failed_trial_keeps_every_documented_key_and_not_its_dead_time():
    """A killed trial's wall time counts the minutes it lay dead: its seconds are the epochs it trained."""
    import datetime

    import optuna
    from optuna.distributions import FloatDistribution

    from sweep import findings

    start = datetime.datetime(2026, 1, 1, 12, 0)
    trial = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={"alpha": 0.5},
                                      distributions={"alpha": FloatDistribution(0.1, 0.9)},
                                      intermediate_values={1: 0.5})
    trial.datetime_start, trial.datetime_complete = start, start + datetime.timedelta(hours=1)
    written = findings.trial_record(trial).to_dict()
    assert written["seconds"] is None and {"value", "note", "retry_of"} <= set(written)
    assert (written["value"], written["note"], written["retry_of"]) == (None, None, None)
    trial.set_user_attr("seconds", 3.5)
    assert findings.trial_record(trial).seconds == 3.5


def test_the_ledger_counts_finished_trials_not_failed_tries():
    from core import records
    from sweep import findings

    sweep = sweep_record([({"temperature": 4.0, "alpha": 0.5}, 0.9), ({"temperature": 2.0, "alpha": 0.3}, 0.8)])
    sweep.trials.insert(1, records.SweepTrial(number=2, state="fail", params={}, epochs=1))
    assert findings.ledger_text(sweep) == (f"{sweep.spec}; 2 of 2 trials finished (1 failed, retried), best: trial 0")


def noisy_sweep():
    """Three complete trials on 60 validation images: the user's (trial 0), the best (1, +3 images) and trial 2."""
    from core import records

    sweep = sweep_record([({"temperature": 4.0, "alpha": 0.5}, 0.6), ({"temperature": 2.0, "alpha": 0.3}, 0.65),
                          ({"temperature": 8.0, "alpha": 0.7}, 0.2)])
    sweep.user_trial, sweep.val_images, sweep.tied_with_best = 0, 60, [0, 1]
    sweep.comparisons = [records.TrialComparison(trial=0, best_only=4, other_only=1, p=0.375, p_holm=0.375),
                         records.TrialComparison(trial=2, best_only=27, other_only=0, p=1.5e-8, p_holm=3e-8)]
    return sweep


def test_a_best_trial_within_noise_of_the_users_settings_is_warned_about():
    from sweep import findings, noise

    sweep = noisy_sweep()
    warning, = [text for text in findings.sanity_warnings(sweep) if "your own settings" in text]
    size = noise.resolving_size(4, 1, 60)
    assert "trial 0: temperature=4, alpha=0.5" in warning and "+5.00 points" in warning
    assert f"about {size} validation images would tell a difference this size apart" in warning
    lines = findings.verdict(sweep)
    assert "NOT distinguishable" in lines[0] and "+5.00 points" in lines[0]
    assert lines[1].endswith(": trials 0, 1 (2 of 3 complete trials)")
    sweep.comparisons[0].p = 0.01
    assert not [text for text in findings.sanity_warnings(sweep) if "your own settings" in text]


def test_the_sweep_section_speaks_percent_and_of_noise():
    from sweep import findings

    sweep = noisy_sweep()
    view = findings.section(sweep)
    assert "scored 65.00%" in view["lead"] and "0.6500" not in view["lead"]
    assert view["columns"][2] == "validation top1 (%)"
    assert [row[2] for row in view["rows"]] == ["60.00", "65.00", "20.00"]
    assert view["rows"][0][-1] == "your settings; tied with the best" and view["rows"][1][-1] == "best"
    assert any("Judged on 60 validation images" in note and "noise" in note for note in view["notes"])
    sentence = findings.summary_sentence(sweep)
    assert sentence.startswith("The distilled student's settings came from a sweep: temperature=2, alpha=0.3, trial 1")
    assert "cannot tell them from your own settings (trial 0: temperature=4, alpha=0.5)" in sentence


def test_the_importance_bars_have_no_legend_and_each_curve_its_own_colour():
    import colorsys
    import itertools

    import matplotlib

    from sweep import findings

    matplotlib.use("Agg")
    sweep = sweep_record([({"temperature": 1.0 + 0.5 * n, "alpha": 0.1 + 0.05 * n}, 0.5 + 0.01 * n) for n in range(12)])
    study = findings._study_of(sweep)
    with search_space.quiet_optuna(), matplotlib.rc_context():
        assert findings.importance_plot(study, "validation top1").get_legend() is None
        lines = findings.curves_plot(study, "validation top1").get_lines()
    looks = [(matplotlib.colors.to_rgb(line.get_color()), line.get_linestyle()) for line in lines]
    assert len(set(looks)) == 12
    # tab20 pairs a dark and a light shade of one hue: among the first ten, no two coloured curves share a hue.
    hues = [colorsys.rgb_to_hsv(*colour) for colour, _ in looks[:10]]
    gaps = [min(abs(a[0] - b[0]), 1 - abs(a[0] - b[0])) for a, b in itertools.combinations(hues, 2)
            if a[1] > 0.2 and b[1] > 0.2]
    assert min(gaps) > 0.02, "two of the first ten curves look alike"
