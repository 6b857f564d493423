"""What a sweep leaves for people to read: summary.json's `sweep` record, its sanity warnings, and the
report's Sweep section (Optuna's matplotlib figures and the trials table), rebuilt from the record alone
so that --report-only needs no access to the study's storage.
"""

from __future__ import annotations

import json
import math
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, distribution_to_json, json_to_distribution
from optuna.trial import FrozenTrial, TrialState

import utils
from core import records
from sweep import search_space

FEW_TRIALS = 10  # fewer finished trials than this make the contour and fANOVA's importances rough
EDGE_SHARE = 0.02  # a best value this close to an end of its range (as a share of the range) lies "at the edge"


def _value_text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def params_text(params: dict[str, Any]) -> str:
    """A trial's settings in one line: 'temperature=3.2, alpha=0.41'."""
    return ", ".join(f"{name}={_value_text(value)}" for name, value in params.items())


# ---------------------------------------------------------------- the record


def trial_record(trial: FrozenTrial) -> records.SweepTrial:
    """One trial of the study as summary.json records it."""
    # The time it trained, counted per epoch: a killed trial's wall time would count the time it lay dead.
    seconds = trial.user_attrs.get("seconds")
    return records.SweepTrial(
        number=trial.number, state=trial.state.name.lower(), params=dict(trial.params),
        epochs=len(trial.intermediate_values), value=trial.value if trial.state == TrialState.COMPLETE else None,
        curve=[trial.intermediate_values[step] for step in sorted(trial.intermediate_values)], seconds=seconds,
        retry_of=trial.system_attrs.get("failed_trial"), note=trial.user_attrs.get("note"))


def record(
    study: optuna.Study, best: FrozenTrial, space: dict[str, Any], requested: int, metric: str, storage: str,
    study_name: str, spec: str,
) -> records.SweepRecord:
    """summary.json's `sweep`: what was searched and how, the best trial, and every trial of the study."""
    return records.SweepRecord(
        spec=spec, metric=metric, direction=study.direction.name.lower(), storage=storage, study_name=study_name,
        trials_requested=requested,
        distributions={name: json.loads(distribution_to_json(dist)) for name, dist in space.items()},
        best_trial=best.number, best_params=dict(best.params), best_value=best.value,
        trials=[trial_record(trial) for trial in study.get_trials(deepcopy=False)])


def ledger_text(sweep: records.SweepRecord) -> str:
    """The ledger's sweep cell: 'temperature=1:10:log; 6 of 6 trials finished (1 failed, retried), best: trial 4'."""
    counts = _states(sweep)
    finished = counts.get("complete", 0) + counts.get("pruned", 0)
    failed = f" ({counts['fail']} failed, retried)" if counts.get("fail") else ""
    return (f"{sweep.spec}; {finished} of {sweep.trials_requested} trials finished{failed}, "
            f"best: trial {sweep.best_trial}")


def _distributions(sweep: records.SweepRecord) -> dict[str, BaseDistribution]:
    """The searched settings' Optuna distributions, from the record."""
    return {name: json_to_distribution(json.dumps(form)) for name, form in sweep.distributions.items()}


def _states(sweep: records.SweepRecord) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in sweep.trials:
        counts[trial.state] = counts.get(trial.state, 0) + 1
    return counts


def sanity_warnings(sweep: records.SweepRecord) -> list[str]:
    """Sentences on what makes a sweep's choice untrustworthy: validation that cannot tell the trials apart, and
    a best value at the end of its range (better ones may lie beyond)."""
    found = []
    values = {trial.value for trial in sweep.trials if trial.state == "complete"}
    finished = sum(trial.state == "complete" for trial in sweep.trials)
    if finished > 1 and len(values) == 1:
        found.append(f"Every finished trial of the sweep scored the same validation {sweep.metric} "
                     f"({values.pop():.4g}): the validation split cannot tell these settings apart, so the best trial "
                     "is only the first; give validation more images (--val-fraction or a val/ folder).")
    for name, dist in _distributions(sweep).items():
        value = sweep.best_params[name]
        if isinstance(dist, CategoricalDistribution):
            continue
        scale = math.log if dist.log else float
        share = (scale(value) - scale(dist.low)) / (scale(dist.high) - scale(dist.low))
        if share <= EDGE_SHARE or share >= 1 - EDGE_SHARE:
            end = "low" if share <= EDGE_SHARE else "high"
            found.append(f"The best trial's {name} ({_value_text(value)}) lies at the {end} end of its range "
                         f"({dist.low:g} to {dist.high:g}): better settings may lie beyond it; widen the range.")
    return found


# ---------------------------------------------------------------- the report's section


def _study_of(sweep: records.SweepRecord) -> optuna.Study:
    """An in-memory study holding the record's finished trials, for Optuna's figures."""
    distributions = _distributions(sweep)
    study = optuna.create_study(direction=sweep.direction)
    for trial in sweep.trials:
        state = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "fail": TrialState.FAIL}.get(trial.state)
        if state is not None:
            study.add_trial(optuna.trial.create_trial(
                state=state, value=trial.value, params=trial.params, distributions=distributions,
                intermediate_values=dict(enumerate(trial.curve, start=1))))
    return study


def _figure_png(axes: Any) -> bytes:
    figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
    figure.set_size_inches(6.4, 4.4)
    return utils.figure_png(figure, dpi=100)


def figures(sweep: records.SweepRecord) -> tuple[list[tuple[str, bytes]], list[str]]:
    """The Sweep section's pictures, (caption, PNG): optimization history, the score over the two most important
    settings, the settings' importances, each trial's validation curve; and notes on figures left out."""
    import matplotlib

    matplotlib.use("Agg")
    # Optuna's figures switch matplotlib to its ggplot style for good: the context puts the style back after them.
    with search_space.quiet_optuna(), matplotlib.rc_context():
        return _figures(sweep)


def _figures(sweep: records.SweepRecord) -> tuple[list[tuple[str, bytes]], list[str]]:
    from optuna.visualization import matplotlib as plots

    study, target = _study_of(sweep), f"validation {sweep.metric}"
    names, values = list(sweep.distributions), {trial.value for trial in sweep.trials if trial.state == "complete"}
    pictures, notes = [(f"optimization history: each trial's {target}, and the best so far",
                        _figure_png(plots.plot_optimization_history(study, target_name=target)))], []
    if len(values) < 2:
        notes.append("No score map and no importances: they need finished trials with different scores.")
    else:
        complete = sum(trial.state == "complete" for trial in sweep.trials)
        if complete < FEW_TRIALS:
            notes.append(f"With {complete} finished trials, the score map and the importances are rough guides.")
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        ranked = list(optuna.importance.get_param_importances(study, evaluator=evaluator)) if len(names) > 1 else names
        if len(ranked) > 1:
            pictures.append((f"{target} over the two most important settings, {ranked[0]} and {ranked[1]} (contour "
                             "of the trials' scores; dots: trials)",
                             _figure_png(plots.plot_contour(study, params=ranked[:2], target_name=target))))
            pictures.append(("importance of each setting for the score (fANOVA: share of the score's variance it "
                             "explains)", _figure_png(plots.plot_param_importances(study, evaluator=evaluator,
                                                                                   target_name=target))))
        else:
            pictures.append((f"{target} against {ranked[0]}, the one setting searched",
                             _figure_png(plots.plot_slice(study, params=ranked, target_name=target))))
    curves = plots.plot_intermediate_values(study)
    curves.set_xlabel("epoch")
    curves.set_ylabel(target)
    pictures.append((f"{target} after each epoch of every trial (a pruned trial's line stops early)",
                     _figure_png(curves)))
    return pictures, notes


def section(sweep: records.SweepRecord) -> dict[str, Any]:
    """What the report's Sweep section shows, from summary.json's record: a lead sentence, the figures
    (caption, PNG bytes), notes, and the trials table (columns, rows)."""
    states = ", ".join(f"{count} {state}" for state, count in _states(sweep).items())
    lead = (f"The sweep ran {len(sweep.trials)} trials ({states}; {sweep.trials_requested} requested) over "
            f"{sweep.spec}, each judged by its best epoch's validation {sweep.metric} ({sweep.direction}), in study "
            f"'{sweep.study_name}' ({sweep.storage}). The best, trial {sweep.best_trial} "
            f"({params_text(sweep.best_params)}), scored {sweep.best_value:.4f}; its student is the distilled student "
            "of the table above, tested once against a baseline trained with its settings and seed.")
    names = list(sweep.distributions)
    columns = ["trial", "state", f"validation {sweep.metric}", "epochs", *names, "seconds", "note"]
    rows = []
    for trial in sweep.trials:
        notes = [f"retry of trial {trial.retry_of}"] if trial.retry_of is not None else []
        if trial.note or trial.state == "pruned":
            notes.append(trial.note or f"stopped after epoch {trial.epochs}")
        notes += ["best"] if trial.number == sweep.best_trial else []
        rows.append([str(trial.number), trial.state, "—" if trial.value is None else f"{trial.value:.4f}",
                     str(trial.epochs), *(_value_text(trial.params[name]) if name in trial.params else "—"
                                          for name in names),
                     "—" if trial.seconds is None else f"{trial.seconds:.1f}", "; ".join(notes)])
    pictures, notes = figures(sweep)
    return {"lead": lead, "figures": pictures, "notes": notes, "columns": columns, "rows": rows}
