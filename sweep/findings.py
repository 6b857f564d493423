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

from core import plots, records
from sweep import noise, search_space

FEW_TRIALS = 10  # fewer finished trials than this make the contour and fANOVA's importances rough
EDGE_SHARE = 0.02  # a best value this close to an end of its range (as a share of the range) lies "at the edge"


def _value_text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def params_text(params: dict[str, Any]) -> str:
    """A trial's settings in one line: 'temperature=3.2, alpha=0.41'."""
    return ", ".join(f"{name}={_value_text(value)}" for name, value in params.items())


def score_text(metric: str, value: float) -> str:
    """A validation score as the Models table shows it: a percentage for top-1 and F1, the loss as it is."""
    return f"{value:.4f}" if metric == "loss" else f"{100 * value:.2f}%"


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


def _params_of(sweep: records.SweepRecord, number: int) -> str:
    return params_text(next(trial.params for trial in sweep.trials if trial.number == number))


def _against_user(sweep: records.SweepRecord) -> records.TrialComparison | None:
    """The best trial's comparison with the user's settings (None when they are the best, or untried)."""
    return next((item for item in sweep.comparisons if item.trial == sweep.user_trial), None)


def _difference(item: records.TrialComparison, images: int) -> str:
    """'+1.50 points (the best alone right on 5 of 200 validation images, the other on 2; McNemar p=0.45)'."""
    points = 100 * (item.best_only - item.other_only) / images
    return (f"{points:+.2f} points of validation top-1 (of {images} images, the best alone got {item.best_only} "
            f"right, the other {item.other_only}; McNemar p={item.p:.3g})")


def _resolution(item: records.TrialComparison, images: int) -> str:
    size = noise.resolving_size(item.best_only, item.other_only, images)
    if size is None:
        return "they get as many images right, so no validation size would tell them apart"
    return f"at the same rates about {size} validation images would tell a difference this size apart"


def verdict(sweep: records.SweepRecord) -> list[str]:
    """The console's lines on the best trial against noise: against the user's settings, and the trials tied
    with it."""
    lines, user = [], _against_user(sweep)
    if sweep.user_trial == sweep.best_trial:
        lines.append(f"the best trial is your own settings (trial {sweep.user_trial}): the search found nothing "
                     "better on validation")
    elif user is not None and sweep.val_images:
        distinct = "distinguishable" if user.p < noise.SIGNIFICANCE else "NOT distinguishable"
        lines.append(f"best trial {sweep.best_trial} vs your settings (trial {user.trial}): "
                     f"{_difference(user, sweep.val_images)}: {distinct}"
                     + ("" if user.p < noise.SIGNIFICANCE else f"; {_resolution(user, sweep.val_images)}"))
    if sweep.comparisons:
        complete = len(sweep.comparisons) + 1
        lines.append(f"tied with the best (no Holm-corrected McNemar test separates them at p<{noise.SIGNIFICANCE}): "
                     f"trial{'s' if len(sweep.tied_with_best) > 1 else ''} "
                     f"{', '.join(map(str, sweep.tied_with_best))} ({len(sweep.tied_with_best)} of {complete} "
                     "complete trials)")
    return lines


def sanity_warnings(sweep: records.SweepRecord) -> list[str]:
    """Sentences on what makes a sweep's choice untrustworthy: a best trial that validation cannot tell from the
    user's own settings, validation that cannot tell the trials apart, and a best value at the end of its range
    (better ones may lie beyond)."""
    found = []
    user = _against_user(sweep)
    if user is not None and sweep.val_images and user.p >= noise.SIGNIFICANCE:
        found.append(f"The sweep's best trial ({sweep.best_trial}: {params_text(sweep.best_params)}) is not "
                     f"distinguishable from your own settings (trial {user.trial}: {_params_of(sweep, user.trial)}): "
                     f"{_difference(user, sweep.val_images)}; {_resolution(user, sweep.val_images)} (--val-fraction "
                     "or a val/ folder). Keep your settings unless a larger validation split confirms the gain.")
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


def _unit(metric: str) -> float:
    """The figures' and the table's scale of a score: percent for top-1 and F1 (as the Models table), 1 for the loss."""
    return 1.0 if metric == "loss" else 100.0


def _study_of(sweep: records.SweepRecord) -> optuna.Study:
    """An in-memory study holding the record's finished trials, their scores in percent, for Optuna's figures."""
    distributions, unit = _distributions(sweep), _unit(sweep.metric)
    study = optuna.create_study(direction=sweep.direction)
    for trial in sweep.trials:
        state = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "fail": TrialState.FAIL}.get(trial.state)
        if state is not None:
            study.add_trial(optuna.trial.create_trial(
                state=state, value=None if trial.value is None else unit * trial.value, params=trial.params,
                distributions=distributions,
                intermediate_values={epoch: unit * value for epoch, value in enumerate(trial.curve, start=1)}))
    return study


def _figure_png(axes: Any) -> bytes:
    figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
    figure.set_size_inches(6.4, 4.4)
    return plots.figure_png(figure, dpi=100)


def figures(sweep: records.SweepRecord) -> tuple[list[tuple[str, bytes]], list[str]]:
    """The Sweep section's pictures, (caption, PNG): optimization history, the score over the two most important
    settings, the settings' importances, each trial's validation curve; and notes on figures left out."""
    import matplotlib

    matplotlib.use("Agg")
    # Optuna's figures switch matplotlib to its ggplot style for good: the context puts the style back after them.
    with search_space.quiet_optuna(), matplotlib.rc_context():
        return _figures(sweep)


def importance_plot(study: optuna.Study, target: str) -> Any:
    """fANOVA's importances as bars, without Optuna's legend (one objective, named on the axis), which covered
    a bar."""
    from optuna.visualization import matplotlib as optuna_plots

    axes = optuna_plots.plot_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
                                        target_name=target)
    if axes.get_legend() is not None:
        axes.get_legend().remove()
    return axes


def curves_plot(study: optuna.Study, target: str) -> Any:
    """Each trial's validation score per epoch, each trial its own colour (Optuna's tab20 pairs near-identical
    ones): tab10's ten colours, then the same dashed, then dotted; the legend beside the plot."""
    import matplotlib.ticker
    from optuna.visualization import matplotlib as optuna_plots

    axes = optuna_plots.plot_intermediate_values(study)
    colours, styles = matplotlib.colormaps["tab10"].colors, ("-", "--", ":", "-.")
    for index, line in enumerate(axes.get_lines()):
        line.set_color(colours[index % len(colours)])
        line.set_linestyle(styles[index // len(colours) % len(styles)])
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.set_ylabel(target)
    if axes.get_lines():
        axes.legend(fontsize="small", **plots.LEGEND_OUTSIDE)
    return axes


def _noise_note(sweep: records.SweepRecord) -> list[str]:
    """The caveat on the score map and importances: trials apart by a few validation images look like structure."""
    if not sweep.val_images or len(sweep.tied_with_best) < 2:
        return []
    return [f"Judged on {sweep.val_images} validation images (one image is {100 / sweep.val_images:.2f} points): "
            f"{len(sweep.tied_with_best)} of {len(sweep.comparisons) + 1} complete trials are tied with the best, so "
            "the score map and the importances may draw differences of a few images, noise, as structure."]


def _figures(sweep: records.SweepRecord) -> tuple[list[tuple[str, bytes]], list[str]]:
    from optuna.visualization import matplotlib as optuna_plots

    unit = " (%)" if _unit(sweep.metric) != 1 else ""
    study, target = _study_of(sweep), f"validation {sweep.metric}{unit}"
    names, values = list(sweep.distributions), {trial.value for trial in sweep.trials if trial.state == "complete"}
    pictures, notes = [(f"optimization history: each trial's {target}, and the best so far",
                        _figure_png(optuna_plots.plot_optimization_history(study, target_name=target)))], []
    if len(values) < 2:
        notes.append("No score map and no importances: they need finished trials with different scores.")
    else:
        complete = sum(trial.state == "complete" for trial in sweep.trials)
        if complete < FEW_TRIALS:
            notes.append(f"With {complete} finished trials, the score map and the importances are rough guides.")
        notes += _noise_note(sweep)
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        ranked = list(optuna.importance.get_param_importances(study, evaluator=evaluator)) if len(names) > 1 else names
        if len(ranked) > 1:
            pictures.append((f"{target} over the two most important settings, {ranked[0]} and {ranked[1]} (contour "
                             "of the trials' scores; dots: trials)",
                             _figure_png(optuna_plots.plot_contour(study, params=ranked[:2], target_name=target))))
            pictures.append(("importance of each setting for the score (fANOVA: share of the score's variance it "
                             "explains)", _figure_png(importance_plot(study, target))))
        else:
            pictures.append((f"{target} against {ranked[0]}, the one setting searched",
                             _figure_png(optuna_plots.plot_slice(study, params=ranked, target_name=target))))
    pictures.append((f"{target} after each epoch of every trial (a pruned trial's line stops early)",
                     _figure_png(curves_plot(study, target))))
    return pictures, notes


def summary_sentence(sweep: records.SweepRecord) -> str:
    """The report's summary box: where the distilled student's settings came from, and what they were."""
    own = ""
    if sweep.user_trial == sweep.best_trial:
        own = " These are your own settings: the search found nothing better."
    elif sweep.user_trial is not None and sweep.user_trial in sweep.tied_with_best:
        own = (f" Validation cannot tell them from your own settings (trial {sweep.user_trial}: "
               f"{_params_of(sweep, sweep.user_trial)}).")
    return (f"The distilled student's settings came from a sweep: {params_text(sweep.best_params)}, trial "
            f"{sweep.best_trial}, the best of {len(sweep.trials)} trials on validation {sweep.metric} "
            f"({score_text(sweep.metric, sweep.best_value)}).{own}")


def _trial_notes(sweep: records.SweepRecord, trial: records.SweepTrial) -> str:
    notes = [f"retry of trial {trial.retry_of}"] if trial.retry_of is not None else []
    if trial.note or trial.state == "pruned":
        notes.append(trial.note or f"stopped after epoch {trial.epochs}")
    notes += ["your settings"] if trial.number == sweep.user_trial else []
    notes += ["best"] if trial.number == sweep.best_trial else []
    if trial.number != sweep.best_trial and trial.number in sweep.tied_with_best:
        notes.append("tied with the best")
    return "; ".join(notes)


def section(sweep: records.SweepRecord) -> dict[str, Any]:
    """What the report's Sweep section shows, from summary.json's record: a lead sentence, the figures
    (caption, PNG bytes), notes, and the trials table (columns, rows)."""
    states = ", ".join(f"{count} {state}" for state, count in _states(sweep).items())
    verdicts = " ".join(f"{line[0].upper()}{line[1:]}." for line in verdict(sweep))
    lead = (f"The sweep ran {len(sweep.trials)} trials ({states}; {sweep.trials_requested} requested) over "
            f"{sweep.spec}, each judged by its best epoch's validation {sweep.metric} ({sweep.direction}), in study "
            f"'{sweep.study_name}' ({sweep.storage}). The best, trial {sweep.best_trial} "
            f"({params_text(sweep.best_params)}), scored {score_text(sweep.metric, sweep.best_value)}; its student is "
            f"the distilled student of the table above, tested once against a baseline trained with its settings and "
            f"seed. {verdicts}")
    names = list(sweep.distributions)
    against = {item.trial: item for item in sweep.comparisons}
    percent = " (%)" if _unit(sweep.metric) != 1 else ""
    columns = ["trial", "state", f"validation {sweep.metric}{percent}", "epochs", *names,
               "vs best: McNemar p (Holm)", "seconds", "note"]
    rows = []
    for trial in sweep.trials:
        item = against.get(trial.number)
        score = "—" if trial.value is None else score_text(sweep.metric, trial.value).rstrip("%")
        settings_cells = (_value_text(trial.params[name]) if name in trial.params else "—" for name in names)
        rows.append([str(trial.number), trial.state, score, str(trial.epochs), *settings_cells,
                     "—" if item is None else f"{item.p:.3g} ({item.p_holm:.3g})",
                     "—" if trial.seconds is None else f"{trial.seconds:.1f}", _trial_notes(sweep, trial)])
    pictures, notes = figures(sweep)
    return {"lead": lead.strip(), "figures": pictures, "notes": notes, "columns": columns, "rows": rows}
