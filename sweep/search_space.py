"""The --sweep spec: which settings a sweep searches, and over what.

A spec is comma-separated `name=range` items: `low:high` (uniform), `low:high:log` (log-uniform) or
`a|b|c` (choices), each becoming an Optuna distribution; integer settings get integer ranges. Any
numeric setting of the distilled student's training can be searched: the numeric Config fields of the
"training" and "distillation methods" groups (read from settings.py's types, so settings added later
are searchable too), except the teacher's and those named in NOT_SEARCHABLE; and `method`, over
KD_engine.method_names().
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from dataclasses import replace
from typing import Any, Iterator

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

import KD_engine
from config import settings
from core.errors import SettingsError
from training import model_run

METHOD = "method"  # the spec's name for the distillation method: one a trial, in place of --kd-methods
SEARCHABLE_GROUPS = ("training", "distillation methods")  # Config groups of the student's training settings
NOT_SEARCHABLE = {  # numeric settings of those groups that a trial must not change, and why
    "seed": "it also draws the data splits, so the trials would be judged on different validation images",
    "eval_batch_size": "it only sets how many images an evaluation pass takes at once",
}


def searchable_kind(name: str) -> type:
    """The type of a setting a sweep may search (int, float; str for the method), or SettingsError saying why not."""
    if name == METHOD:
        return str
    if name not in settings.FIELDS:
        closest = difflib.get_close_matches(name, [METHOD, *searchable_settings()], n=1)
        hint = f" (the closest searchable one is '{closest[0]}')" if closest else ""
        raise SettingsError(f"--sweep: '{name}' is not a setting{hint}.")
    kind, group = settings.value_type(name), settings.FIELDS[name].group
    if kind not in (int, float):
        raise SettingsError(f"--sweep: {name} is not a numeric setting; a sweep searches numbers and {METHOD}=a|b.")
    if name.startswith("teacher_"):
        raise SettingsError(f"--sweep: {name} cannot be searched: the teacher is trained once, before the trials.")
    if name in NOT_SEARCHABLE or group not in SEARCHABLE_GROUPS:
        reason = NOT_SEARCHABLE.get(name, f"it is a {group} setting, the same for every trial")
        raise SettingsError(f"--sweep: {name} cannot be searched: {reason}.")
    return kind


def searchable_settings() -> list[str]:
    """Every setting a sweep can search besides the method: the numeric settings of the student's training."""
    names = []
    for name in settings.FIELDS:
        try:
            searchable_kind(name)
        except SettingsError:
            continue
        names.append(name)
    return names


def _value(text: str, kind: type, where: str) -> Any:
    """One bound or choice of a spec item, as its setting's type."""
    if kind is str:
        if text not in KD_engine.method_names():
            raise SettingsError(f"{where}: '{text}' is not a method (one of {', '.join(KD_engine.method_names())}).")
        return text
    try:
        value = kind(text)
    except ValueError:
        raise SettingsError(f"{where}: '{text}' is not {'an integer' if kind is int else 'a number'}.") from None
    if not np.isfinite(value):
        raise SettingsError(f"{where}: '{text}' is not a finite number.")
    return value


def distribution(name: str, text: str) -> BaseDistribution:
    """The Optuna distribution of one spec item `name=text`: low:high, low:high:log or a|b|c."""
    kind, where = searchable_kind(name), f"--sweep {name}={text}"
    if "|" in text:
        choices = tuple(_value(choice.strip(), kind, where) for choice in text.split("|"))
        if len(set(choices)) != len(choices):
            raise SettingsError(f"{where}: a choice is given twice.")
        return CategoricalDistribution(choices)
    if kind is str:
        raise SettingsError(f"{where}: the method is chosen from a list, such as {METHOD}=kd|dkd.")
    bounds = [bound.strip() for bound in text.split(":")]
    if len(bounds) not in (2, 3) or bounds[2:] not in ([], ["log"]):
        raise SettingsError(f"{where} is not a range: write low:high, low:high:log or a|b|c.")
    low, high = (_value(bound, kind, where) for bound in bounds[:2])
    if low >= high:
        raise SettingsError(f"{where}: the range is empty (its low end must be below its high end).")
    if len(bounds) == 3 and low <= 0:
        raise SettingsError(f"{where}: a log range must start above 0.")
    return (IntDistribution if kind is int else FloatDistribution)(low, high, log=len(bounds) == 3)


def parse_spec(spec: str) -> dict[str, BaseDistribution]:
    """The search space of a --sweep spec: comma-separated name=low:high, name=low:high:log or name=a|b|c.

    Integer settings get integer ranges and choices; the method's choices are names of KD_engine.method_names().
    """
    space: dict[str, BaseDistribution] = {}
    for item in spec.split(","):
        name, equals, text = (part.strip() for part in item.partition("="))
        name = name.replace("-", "_")
        if not (name and equals and text):
            raise SettingsError(f"--sweep item '{item.strip()}' is not name=range: write name=low:high, "
                                "name=low:high:log or name=a|b|c, comma-separated (e.g. temperature=1:10:log,"
                                "alpha=0.1:0.9).")
        if name in space:
            raise SettingsError(f"--sweep names {name} twice.")
        space[name] = distribution(name, text)
    return space


def describe(space: dict[str, BaseDistribution]) -> str:
    """The space in words: 'temperature 1 to 10 (log), method kd or dkd'."""
    parts = []
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            parts.append(f"{name} {' or '.join(map(str, dist.choices))}")
        else:
            parts.append(f"{name} {dist.low:g} to {dist.high:g}{' (log)' if dist.log else ''}")
    return ", ".join(parts)


def trial_config(config: settings.Config, params: dict[str, Any]) -> settings.Config:
    """The settings of one trial: the sweep's, with the trial's values (its method as --kd-methods)."""
    values = dict(params)
    method = values.pop(METHOD, None)
    config = replace(config, **values)
    return config if method is None else replace(config, kd_methods=method)


def user_params(config: settings.Config, space: dict[str, BaseDistribution]) -> tuple[dict[str, Any], list[str]]:
    """The user's own settings (flags, constants, file) as a trial's values, and those lying outside their
    ranges as 'name=value' (then no trial can try them)."""
    params = {name: settings.kd_methods(config)[0] if name == METHOD else getattr(config, name) for name in space}
    outside = []
    for name, dist in space.items():
        value = params[name]
        inside = value in dist.choices if isinstance(dist, CategoricalDistribution) else dist.low <= value <= dist.high
        if not inside:
            outside.append(f"{name}={value:g}" if isinstance(value, (int, float)) else f"{name}={value}")
    return params, outside


def ends(dist: BaseDistribution) -> tuple[Any, ...]:
    """The values a range's checks try: both ends of a range, every choice of a list."""
    return dist.choices if isinstance(dist, CategoricalDistribution) else (dist.low, dist.high)


def stream_changing(config: settings.Config, space: dict[str, BaseDistribution]) -> list[str]:
    """The searched settings that change the training batches (`model_run.batch_stream`: batch size, image size,
    augmentation): trials that differ in them draw different batches, so they cannot share a lockstep pass."""
    stream = model_run.batch_stream(config)
    return [name for name, dist in space.items()
            if any(model_run.batch_stream(trial_config(config, {name: value})) != stream for value in ends(dist))]


def check_ranges(config: settings.Config, space: dict[str, BaseDistribution]) -> None:
    """Every method, and both ends of every range (each choice), must make settings a run accepts."""
    methods = space[METHOD].choices if METHOD in space else settings.kd_methods(config)
    if len(methods) > 1 and METHOD not in space:
        raise SettingsError(f"A sweep trains one distilled student per trial: give one method in --kd-methods, or "
                            f"search them with {METHOD}={'|'.join(methods)}.")
    for method in methods:
        checks = [({METHOD: method}, f"{METHOD}={method}")]
        for name, dist in space.items():
            checks += [({METHOD: method, name: end}, f"{name}={end:g} (with {METHOD} {method})")
                       for end in ends(dist) if name != METHOD]
        for params, where in checks:
            try:
                settings.validate(trial_config(config, params))
            except SettingsError as error:
                raise SettingsError(f"--sweep {where}: {error}") from None


def suggest(trial: optuna.Trial, space: dict[str, BaseDistribution]) -> dict[str, Any]:
    """A trial's values for the space, drawn by the study's sampler."""
    values: dict[str, Any] = {}
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            values[name] = trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, IntDistribution):
            values[name] = trial.suggest_int(name, dist.low, dist.high, log=dist.log)
        else:
            values[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    return values


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna without its log lines (the sweep prints its own) and its warnings about experimental features."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)
