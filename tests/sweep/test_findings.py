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
