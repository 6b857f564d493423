"""The layout of what a run records: the models' role names, and summary.json as typed records.

summary.json holds one entry per trained model, keyed by its role ("teacher", "student_baseline",
"student_<method>"), then the run's own fields. It is written and read only through `RunSummary`,
whose `from_dict` refuses a file whose fields have the wrong types, or values that cannot be used
together (ValueError naming the field). The report reads each model's history.json and results.json
through `ModelHistory` and `ModelResults` the same way.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEACHER = "teacher"
BASELINE = "student_baseline"
STUDENT_PREFIX = "student_"
ROLE_PATTERN = rf"{TEACHER}|{STUDENT_PREFIX}[a-z0-9_]+"  # a role: the teacher, the baseline, a distilled student
SEED_SEPARATOR = " seed "  # a model's name in a run of several seeds: "student_kd seed 2"
SPLITS = ("train", "val", "test")
TEST_KEYS = ("top1", "top3", "precision_macro", "recall_macro", "f1_macro", "auc_macro")  # summary's test metrics
# How test_top1_best_epoch_on_test is labelled wherever it appears (--eval-test-every-epoch).
CHOSEN_ON_TEST = "chosen on the test split, as the papers' tables report: optimistic"
# gain_top1_test when every seed gained the same: the verdict is each seed's McNemar test, and there is no interval.
ZERO_SPREAD_TEST = "mcnemar_every_seed"
COMPARISON_CORRECTIONS = ("holm", "none")  # how the head-to-head comparisons correct their p for the family
PAIR_TESTS = ("mcnemar", "t", ZERO_SPREAD_TEST)  # what decided a head-to-head pair (significance.GAIN_TESTS)


def distilled_role(method: str) -> str:
    """The role of the student distilled by `method` ("kd" -> "student_kd")."""
    return STUDENT_PREFIX + method


def method_of(role: str) -> str:
    """The distillation method of a student role ("student_kd" -> "kd"; the baseline gives "baseline")."""
    return role.removeprefix(STUDENT_PREFIX)


def is_distilled(role: str) -> bool:
    """True for a distilled student's role (not the teacher's, not the baseline's)."""
    return role.startswith(STUDENT_PREFIX) and role != BASELINE


def student_roles(methods: list[str]) -> list[str]:
    """The students of a run: the baseline, then one per distillation method (student_kd is Hinton's)."""
    return [BASELINE] + [distilled_role(method) for method in methods]


def model_name(role: str, seed: int, seeds: list[int]) -> str:
    """How the console and the warnings name one trained model: its role, with its seed when there are several."""
    return role if len(seeds) == 1 else f"{role}{SEED_SEPARATOR}{seed}"


def role_of(name: str) -> str:
    """The role in a model's name (`model_name`'s inverse)."""
    return name.split(SEED_SEPARATOR)[0]


def model_folder(run_dir: Path, role: str, seed: int, seeds: list[int]) -> Path:
    """A trained model's folder: RUN/<role> for the first seed, RUN/<role>/seed_<seed> for the others."""
    return run_dir / role if seed == seeds[0] else run_dir / role / f"seed_{seed}"


# ---------------------------------------------------------------- typed records


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null",
             dict: "a mapping", list: "a list", Any: "any value"}
    return names.get(origin or hint, getattr(hint, "__name__", str(hint)))


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a type hint (an integer counts as a number; true / false never do)."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_fits(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    return isinstance(value, hint)


class Record:
    """A dataclass written as a JSON object: fields in order, optional ones (None) left out but those named in
    `kept_nulls` (keys a reader is told to expect, written as null)."""

    kept_nulls: typing.ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if value is None and spec.default is None and spec.name not in self.kept_nulls:
                continue
            if isinstance(value, list):
                value = [item.to_dict() if isinstance(item, Record) else item for item in value]
            out[spec.name] = value.to_dict() if isinstance(value, Record) else value
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Any:
        """The record of a JSON object, its fields checked against their types (ValueError naming the field)."""
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be a mapping, not {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        values = {}
        for spec in dataclasses.fields(cls):
            name, hint = spec.name, hints[spec.name]
            required = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
            if name not in data:
                if required:
                    raise ValueError(f"{where} lacks its field '{name}'")
                continue
            value = data[name]
            if not _fits(value, hint):
                raise ValueError(f"{where}.{name} must be {_type_name(hint)} (got {value!r:.60})")
            values[name] = _converted(value, hint, f"{where}.{name}")
        record = cls(**values)
        record.check(where)
        return record

    def check(self, where: str) -> None:
        """Refuse values of the right types that cannot be used together (ValueError naming the field)."""


def _converted(value: Any, hint: Any, where: str) -> Any:
    """A JSON value that fits `hint` (`_fits`), with the records it holds built and checked, also inside
    lists, mappings and optional fields."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_dict(value, where)
    if origin is list and args:
        return [_converted(item, args[0], f"{where}[{index}]") for index, item in enumerate(value)]
    if origin is dict and args:
        return {key: _converted(item, args[1], f"{where}.{key}") for key, item in value.items()}
    if origin in (typing.Union, types.UnionType) and value is not None:
        return _converted(value, next(arg for arg in args if _fits(value, arg)), where)
    return value


@dataclass
class ModelRow(Record):
    """One trained model's entry: what it is, how it was trained and chosen, its test metrics, and
    what the run added once every model existed (seed statistics, gain verdict, deployment figures)."""

    arch: str
    params: int
    size_mb: float
    best_epoch: int
    epochs_trained: int
    stopped_early: bool
    train_seconds: float
    test: dict[str, float | None]
    # "test" is the model as saved and deployed (fp32); a run under autocast also gives its test metrics so,
    # with "precision" naming it
    test_autocast: dict[str, Any] | None = None
    test_top_class: str | None = None  # the class the model predicts most often on the test split
    test_top_class_share: float | None = None  # the share of test images it predicts that class for
    pretrained: dict[str, Any] | None = None  # with --teacher-weights / --student-weights
    file_mb: float | None = None
    flops_per_image: int | None = None
    export: dict[str, Any] | None = None  # with --export onnx
    reused_from: str | None = None  # a teacher taken from --teacher-checkpoint
    test_top1_last_epoch: float | None = None  # --eval-test-every-epoch: the last epoch's test top-1
    test_top1_best_epoch_on_test: float | None = None  # ... and the best epoch's, CHOSEN_ON_TEST
    test_top1_by_seed: dict[str, float] | None = None  # several seeds
    test_top1_mean: float | None = None
    test_top1_std: float | None = None
    mcnemar_p: float | None = None  # distilled students: the gain's verdict
    gain_significant: bool | None = None
    mcnemar_p_by_seed: dict[str, float] | None = None
    gain_top1_by_seed: dict[str, float] | None = None
    gain_top1_mean: float | None = None
    gain_top1_std: float | None = None
    gain_top1_ci95: list[float] | None = None
    gain_top1_p: float | None = None
    gain_top1_test: str | None = None  # what decided gain_significant (significance.GAIN_TESTS)
    vs_baseline_top1_by_seed: dict[str, float] | None = None  # teacher: its test top-1 minus each seed's baseline's
    vs_baseline_mcnemar_p_by_seed: dict[str, float] | None = None  # ... and the exact McNemar p of the two
    latency_ms: float | None = None  # deployment speed, measured once every model exists
    latency_ms_iqr: list[float] | None = None
    throughput_img_s: float | None = None
    throughput_img_s_iqr: list[float] | None = None
    speedup_over_teacher: float | None = None  # batch-1 latency: the teacher's median over the model's
    speedup_clear: bool | None = None
    latency_noisy: bool | None = None  # the latency's interquartile range stayed wide against its median
    throughput_speedup_over_teacher: float | None = None  # batch throughput: the model's median over the teacher's
    throughput_speedup_clear: bool | None = None
    throughput_noisy: bool | None = None
    speedup_over_teacher_iqr: list[float] | None = None  # interquartile ranges of the per-round speed-ups
    throughput_speedup_over_teacher_iqr: list[float] | None = None
    speeds_apart: str | None = None  # identical architectures measured apart: every speed-up marked noisy
    flops_peer: dict[str, Any] | None = None  # a student costlier than torchvision's model of its size (deploy)

    # Fields a run writes together: a row holds all of a group or none of it.
    GROUPS = (("file_mb", "flops_per_image"), ("test_top1_by_seed", "test_top1_mean", "test_top1_std"),
              ("mcnemar_p_by_seed", "gain_top1_by_seed", "gain_top1_mean", "gain_top1_std", "gain_top1_p"),
              ("latency_ms", "latency_ms_iqr", "throughput_img_s", "throughput_img_s_iqr", "speedup_over_teacher"))
    PAIRS = ("latency_ms_iqr", "throughput_img_s_iqr", "gain_top1_ci95", "speedup_over_teacher_iqr",
             "throughput_speedup_over_teacher_iqr")  # [low, high]

    @property
    def zero_spread(self) -> bool:
        """Every seed gained the same (see ZERO_SPREAD_TEST)."""
        return self.gain_top1_test == ZERO_SPREAD_TEST

    def check(self, where: str) -> None:
        """What the tables and the report compute with: a test top-1, a positive parameter count,
        intervals of two numbers, fields written together present together."""
        if self.test.get("top1") is None:
            raise ValueError(f"{where}.test must hold the test top-1 as 'top1' (a number)")
        if self.params < 1:
            raise ValueError(f"{where}.params must be a positive count of parameters (got {self.params})")
        for name in self.PAIRS:
            if getattr(self, name) is not None and len(getattr(self, name)) != 2:
                raise ValueError(f"{where}.{name} must be [low, high] (got {getattr(self, name)!r:.60})")
        for group in self.GROUPS:
            given = [name for name in group if getattr(self, name) is not None]
            if given and len(given) < len(group):
                missing = [name for name in group if name not in given]
                raise ValueError(f"{where} has '{given[0]}' without {', '.join(repr(name) for name in missing)}")
        if self.gain_top1_by_seed is not None and self.gain_top1_ci95 is None and not self.zero_spread:
            raise ValueError(f"{where} has 'gain_top1_by_seed' without 'gain_top1_ci95'")
        if self.speedup_clear is not None and self.speedup_over_teacher is None:
            raise ValueError(f"{where} has 'speedup_clear' without 'speedup_over_teacher'")


@dataclass
class DatasetRecord(Record):
    """The data a run used: classes, split sizes and how each split was obtained, normalization."""

    class_names: list[str]
    sizes: dict[str, int]
    images_per_class: dict[str, dict[str, int]]  # per split: {"min": ..., "max": ...}
    validation: str
    carving: dict[str, Any]
    mean: list[float]
    std: list[float]
    normalization: str
    storage: str
    class_weights: dict[str, float] | None = None  # with --class-weights balanced


@dataclass
class SweepTrial(Record):
    """One trial of a sweep: the settings it tried, how it ended, and its validation values."""

    kept_nulls = ("value", "seconds", "retry_of", "note")  # every trial has these keys (docs/sweeps.md)

    number: int
    state: str  # Optuna's trial state in lower case: complete, pruned, fail, running or waiting
    params: dict[str, float | str]
    epochs: int  # epochs it trained (those the pruner saw)
    value: float | None = None  # the objective, its best epoch's validation metric (complete trials)
    curve: list[float] = field(default_factory=list)  # the validation metric after each epoch
    seconds: float | None = None
    retry_of: int | None = None  # the trial it re-runs (whose worker died or was stopped)
    note: str | None = None  # why it stopped, when not by the pruner (e.g. the loss diverged)


@dataclass
class TrialComparison(Record):
    """A sweep's best trial against another complete trial, image by image on the validation split."""

    trial: int
    best_only: int  # validation images the best trial's student got right and this trial's wrong
    other_only: int  # ... and the other way round
    p: float  # McNemar's exact two-sided p
    p_holm: float  # p corrected by Holm's step-down over every comparison with the best


@dataclass
class SweepRecord(Record):
    """A sweep's search: what was searched and how, the best trial, every trial."""

    spec: str
    metric: str  # the validation metric the trials were judged by (--select-metric)
    direction: str  # maximize or minimize
    storage: str  # where the study is kept, without a password
    study_name: str
    trials_requested: int
    distributions: dict[str, dict[str, Any]]  # each searched setting's Optuna distribution (optuna's JSON form)
    best_trial: int
    best_params: dict[str, float | str]
    best_value: float
    trials: list[SweepTrial]
    user_trial: int | None = None  # the complete trial that tried the user's own settings (enqueued first)
    val_images: int | None = None  # the validation images the trials were compared on
    comparisons: list[TrialComparison] = field(default_factory=list)  # the best against each other complete trial
    tied_with_best: list[int] = field(default_factory=list)  # trials no corrected test separates from the best


@dataclass
class EpochRecord(Record):
    """One epoch of a model's history: its number, and its training and validation metrics (None where
    undefined; the reasons under "undefined")."""

    epoch: int
    train: dict[str, float | None | dict[str, str]]
    val: dict[str, float | None | dict[str, str]]


@dataclass
class ModelHistory(Record):
    """A model's history.json: its best epoch and every epoch it trained."""

    best_epoch: int
    epochs: list[EpochRecord]


@dataclass
class SplitResults(Record):
    """One split's entry in a model's results.json, as far as the report reads it: its per-class scores."""

    per_class: dict[str, dict[str, float | None]] | None = None


@dataclass
class ModelResults(Record):
    """A model's results.json, as far as the report reads it: its metrics per split."""

    splits: dict[str, SplitResults]


@dataclass
class ComparedPair(Record):
    """Two students of a run compared head to head on the same test images: `first` is the one ranked higher,
    every difference is its test top-1 minus `second`'s (fractions), per seed and over seeds."""

    first: str
    second: str
    difference_by_seed: dict[str, float]
    difference_mean: float
    first_only_by_seed: dict[str, int]  # test images only `first` got right (McNemar's discordant images)
    second_only_by_seed: dict[str, int]
    mcnemar_p_by_seed: dict[str, float]
    mcnemar_p_corrected_by_seed: dict[str, float]  # corrected over the family of pairs of that seed
    test: str  # what decided `p`: mcnemar (one seed), t (several) or mcnemar_every_seed (differences all equal)
    p: float  # the pair's raw p
    p_corrected: float  # corrected over the family of pairs (Comparisons.correction)
    significant: bool  # p_corrected below Comparisons.level
    difference_std: float | None = None  # several seeds: the sample std and 95% Student-t interval of the
    difference_ci95: list[float] | None = None  # per-seed differences (no interval at zero spread)

    def check(self, where: str) -> None:
        """A pair's test is one the tool makes; its p values are probabilities; an interval is [low, high]."""
        if self.test not in PAIR_TESTS:
            raise ValueError(f"{where}.test must be one of {', '.join(PAIR_TESTS)} (got {self.test!r:.60})")
        for name, value in (("p", self.p), ("p_corrected", self.p_corrected)):
            if not 0 <= value <= 1:
                raise ValueError(f"{where}.{name} must be a probability (got {value!r})")
        interval = self.difference_ci95
        if interval is not None and (len(interval) != 2 or interval[0] > interval[1]):
            raise ValueError(f"{where}.difference_ci95 must be [low, high] (got {interval!r:.60})")


@dataclass
class RankedStudent(Record):
    """One student in the head-to-head ranking: its mean test top-1 over seeds, and whether no corrected test
    separates it from the best."""

    role: str
    test_top1_mean: float
    test_top1_by_seed: dict[str, float]
    tied_with_best: bool


@dataclass
class Comparisons(Record):
    """summary.json's `comparisons`: every pair of students (the baseline and each distilled one) compared head to
    head, the family's p corrected by `correction`, and the students ranked by mean test top-1."""

    correction: str  # COMPARISON_CORRECTIONS
    level: float  # a pair differs when its corrected p is below this
    ranking: list[RankedStudent]  # best first
    pairs: list[ComparedPair]  # every pair once, in ranking order

    @property
    def tied_with_best(self) -> list[str]:
        """The roles no corrected test separates from the best (the best first)."""
        return [student.role for student in self.ranking if student.tied_with_best]

    def check(self, where: str) -> None:
        """A known correction; a ranking ordered best first, the best tied with itself; one pair per two ranked
        students, each naming two of them."""
        if self.correction not in COMPARISON_CORRECTIONS:
            raise ValueError(f"{where}.correction must be one of {', '.join(COMPARISON_CORRECTIONS)} "
                             f"(got {self.correction!r:.60})")
        means = [student.test_top1_mean for student in self.ranking]
        if len(means) < 2 or means != sorted(means, reverse=True) or not self.ranking[0].tied_with_best:
            raise ValueError(f"{where}.ranking must list at least two students, best first and tied with itself")
        ranked = {student.role for student in self.ranking}
        named = {frozenset((pair.first, pair.second)) for pair in self.pairs}
        if len(named) != len(self.pairs) or len(self.pairs) != len(ranked) * (len(ranked) - 1) // 2 or any(
                not pair <= ranked or len(pair) != 2 for pair in named):
            raise ValueError(f"{where}.pairs must compare every two students of the ranking once")


RUN_FIELDS = ("kd_gain_top1", "kd_gain_significant", "kd_gain_top1_std", "kd_gain_top1_ci95", "kd_gain_top1_by_seed",
              "kd_collapsed_seeds", "seeds", "skipped_files", "dataset", "device", "precision", "wall_seconds",
              "wall_seconds_last_sitting", "sittings", "finished_at", "warnings", "comparisons", "sweep", "notes")


@dataclass
class RunSummary(Record):
    """summary.json: the models by role (in training order), then the run's own fields."""

    models: dict[str, ModelRow]
    seeds: list[int]
    skipped_files: list[dict[str, str]]
    dataset: DatasetRecord
    device: str
    precision: str
    wall_seconds: float
    finished_at: str
    warnings: list[str] = field(default_factory=list)
    # The headline gain of plain KD, pooled over seeds (the mean gain and its verdict; an earlier version wrote
    # the first seed's gain alone), then its spread, interval and per-seed gains
    kd_gain_top1: float | None = None
    kd_gain_significant: bool | None = None
    kd_gain_top1_std: float | None = None
    kd_gain_top1_ci95: list[float] | None = None
    kd_gain_top1_by_seed: dict[str, float] | None = None
    kd_collapsed_seeds: list[str] | None = None  # "seed 3's baseline", ...: gains of those seeds are not results
    wall_seconds_last_sitting: float | None = None  # wall_seconds covers every sitting of a resumed run
    sittings: int | None = None
    comparisons: Comparisons | None = None  # several distilled students: every pair head to head
    sweep: SweepRecord | None = None  # a run made by --sweep
    notes: dict[str, str] | None = None  # what a field of the models' rows means, where it needs saying

    def check(self, where: str) -> None:
        """Every skipped file names its path and the reason it was skipped; the headline gain's interval is
        [low, high]."""
        interval = self.kd_gain_top1_ci95
        if interval is not None and (len(interval) != 2 or interval[0] > interval[1]):
            raise ValueError(f"{where}.kd_gain_top1_ci95 must be [low, high] (got {interval!r:.60})")
        for index, entry in enumerate(self.skipped_files):
            if not {"path", "reason"} <= entry.keys():
                raise ValueError(f"{where}.skipped_files[{index}] must hold the file's 'path' and the 'reason'")

    def label_test_figures(self) -> None:
        """Label test_top1_best_epoch_on_test in `notes` when some model has it (--eval-test-every-epoch)."""
        if any(row.test_top1_best_epoch_on_test is not None for row in self.models.values()):
            self.notes = {**(self.notes or {}), "test_top1_best_epoch_on_test": CHOSEN_ON_TEST}

    def to_dict(self) -> dict[str, Any]:
        run = super().to_dict()
        run.pop("models")
        return {**{role: row.to_dict() for role, row in self.models.items()},
                **{key: run[key] for key in RUN_FIELDS if key in run}}

    @classmethod
    def from_dict(cls, data: Any, where: str = "summary.json") -> RunSummary:
        if not isinstance(data, dict):
            raise ValueError(f"{where} must hold a mapping, not {type(data).__name__}")
        models = {key: ModelRow.from_dict(value, f"{where}: {key}")
                  for key, value in data.items() if key not in RUN_FIELDS}
        foreign = [key for key in models if not re.fullmatch(ROLE_PATTERN, key)]
        if foreign:  # a role names its model's folder: nothing else may stand there
            raise ValueError(f"{where} holds {foreign[0]!r}, which is neither a field of a run nor a model's role")
        if TEACHER not in models:
            raise ValueError(f"{where} has no '{TEACHER}' entry")
        run = super().from_dict({**{key: data[key] for key in RUN_FIELDS if key in data}, "models": {}}, where)
        run.models = models
        return run
