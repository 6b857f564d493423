"""The command line and settings files: the flags `settings.Config` declares, parsed (one-line errors, an
unknown flag's closest match), --config files checked as the flags would be, and --resume's saved settings.

Which settings exist, their types, help and checks live in `settings`; this module only reads them in.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import typing
from pathlib import Path
from typing import Any

import yaml

import utils
from config.settings import FIELDS, GROUPS, Config, nullable, value_type
from core import errors
from core.errors import SettingsError

# ---------------------------------------------------------------- the command line

EXAMPLES = """examples:
  your own photos (class folders in train/ and test/), starting from ImageNet weights at 224 px:
    python experiment.py --data-dir ~/photos --image-size 224 --teacher-weights DEFAULT --student-weights DEFAULT \\
        --teacher-lr 1e-4 --student-lr 5e-4 --teacher-epochs 15 --student-epochs 15 --patience 3
  CIFAR-sized data (32 px) on a GPU (batch 512, learning rates scaled linearly from the measured batch 256 with
  2e-3; unmeasured on a GPU):
    python experiment.py --data-dir cifar10 --teacher-epochs 30 --student-epochs 30 --batch-size 512 \\
        --teacher-lr 4e-3 --student-lr 4e-3 --workers 8
  a KD paper's CIFAR-100 recipe (see configs/) with the published teacher, used as it is:
    python experiment.py --config configs/resnet56_resnet20.yaml --data-dir data/cifar-100-python \\
        --teacher-weights cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth
  a quick check that everything runs:
    python experiment.py --teacher-epochs 1 --student-epochs 1
  repeat a run with one setting changed:
    python experiment.py --config runs/<run>/config.json --alpha 0.7
  find the temperature and alpha that distil best (judged on validation; see docs/sweeps.md):
    python experiment.py --sweep "temperature=1:10:log,alpha=0.1:0.9" --trials 20

the guide (docs/ in the repository; README.md lists the pages):
  docs/settings.md                every flag, its constant, settings files
  docs/your-data.md               folder layouts, photos, CIFAR files, unreadable images
  docs/models.md                  networks by name, students for photos, pretrained weights
  docs/training.md                model selection, schedules, seeds and the verdict, --resume
  docs/methods.md                 the distillation methods and their reference weights
  docs/distillation-results.md    what each method bought on a CIFAR-10 subset
  docs/sweeps.md                  --sweep, and several workers on one study
  docs/reproducing-papers.md      the references' recipes and published numbers
  docs/output.md                  the run directory, report, warnings and ledger
  docs/tracking.md                the ledger, TensorBoard and MLflow (--track mlflow, a server)
  docs/performance.md             what makes training fast, and measured speeds
  docs/scaling-out.md             torchrun on several GPUs or machines
  docs/deploying.md               size, speed, ONNX export, prediction_for_one.py
  docs/code-layout.md             where each part of the code lives
  docs/tests.md                   what the tests check
"""
# What leaving out an action flag means, as --help shows it (settings say so in their Flag).
ACTIONS_UNSET = {"config": "the constants in experiment.py", "resume": "a new run", "report_only": "train",
                 "list_layers": "train", "track_sync": "train"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default once; for a default of None, what leaving the flag out means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        unset = FIELDS[action.dest].unset if action.dest in FIELDS else ACTIONS_UNSET.get(action.dest)
        if action.default is None and unset is not None:
            return f"{action.help} (default: {unset})"
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (not the long usage), an unknown flag's naming the
    closest known one, as a settings file's unknown key does. `flags` lists the known flags; whoever adds
    an argument records its `option_strings` there."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.flags: list[str] = []  # before the parser's own --help is added
        # No prefix matching: --student-epoch must not silently mean --student-epochs (error() names the flag).
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.flags += action.option_strings
        return action

    def error(self, message: str) -> typing.NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            unknown = [word for word in message.removeprefix(prefix).split() if word.startswith("-")]
            message = "; ".join(self.suggestion(word) for word in unknown) or message
        self.exit(2, f"{self.prog}: error: {message} (python {self.prog} --help lists every flag)\n")

    def suggestion(self, word: str) -> str:
        """'unknown flag --studnet-model (did you mean --student-model?)'."""
        flag = word.split("=", 1)[0]
        closest = difflib.get_close_matches(flag, self.flags, n=1, cutoff=0.5)
        return f"unknown flag {flag}" + (f" (did you mean {closest[0]}?)" if closest else "")


def build_parser(defaults: Config) -> argparse.ArgumentParser:
    """The settings' flags, one per Config field, with `defaults` (experiment.py's constants)."""
    parser = Parser(
        prog="experiment.py",
        description="Knowledge distillation: train a teacher, a baseline student and a distilled student,\n"
        "then compare them. Without data flags the bundled handwritten digits are used.",
        formatter_class=HelpFormatter, epilog=EXAMPLES,
    )
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for name, spec in FIELDS.items():
        options: dict[str, Any] = {"default": getattr(defaults, name), "help": spec.help}
        kind = value_type(name)
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind is not str:
            options["type"] = kind
        if spec.choices is not None:
            options["choices"] = spec.choices
        if spec.const is not None:
            options.update(nargs="?", const=spec.const)
        parser.flags += groups[spec.group].add_argument("--" + name.replace("_", "-"), **options).option_strings
    return parser


def command_line_parser(defaults: Config) -> argparse.ArgumentParser:
    """The settings' flags (build_parser) and the ones that choose what to do with them."""
    parser = build_parser(defaults)
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="read settings from a YAML or JSON file with config.json's keys (a run's own config.json "
                             "repeats that run in a new folder); flags given beside it override it")
    parser.add_argument("--report-only", metavar="RUN", default=None,
                        help="only rebuild RUN/report.html from a finished run's files, then stop")
    parser.add_argument("--resume", metavar="RUN", default=None,
                        help="continue the interrupted run in RUN with its saved settings")
    parser.add_argument("--track-sync", metavar="RUN", default=None,
                        help="only send the finished run in RUN to MLflow (--tracking-uri, else where it was tracked), "
                             "adding what the store lacks, then stop")
    parser.add_argument("--list-layers", metavar="MODEL", default=None,
                        help="only print MODEL's layer names with their output shapes at --image-size, then stop")
    return parser


def given_settings(argv: list[str] | None, defaults: Config) -> set[str]:
    """The settings whose flags appear on the command line (as opposed to defaults)."""
    absent = object()
    probe = build_parser(defaults)
    probe.set_defaults(**dict.fromkeys(FIELDS, absent))
    return {key for key, value in vars(probe.parse_known_args(argv)[0]).items() if value is not absent}


def parse_command_line(
    argv: list[str] | None, defaults: Config,
) -> tuple[argparse.ArgumentParser, dict[str, Any], set[str]]:
    """The parser, the parsed flags and the settings the user gave (flags and --config file keys, as
    opposed to defaults); a --config file's settings stand in for the defaults beneath the flags."""
    parser = command_line_parser(defaults)
    args = vars(parser.parse_args(argv))
    from_file: dict[str, Any] = {}
    if args["config"] is not None:
        if args["resume"] is not None:
            raise SettingsError("--resume continues with the run's saved settings; leave out --config.")
        from_file = config_file_settings(os.path.expanduser(args["config"]))
        parser.set_defaults(**from_file)
        args = vars(parser.parse_args(argv))
    return parser, args, given_settings(argv, defaults) | set(from_file)


# ---------------------------------------------------------------- settings files


def read_settings(path: str | Path) -> dict[str, Any]:
    """The settings in a YAML or JSON file (.json is read as JSON, anything else as YAML): a mapping of names to values.

    Raises SettingsError with one sentence when the file cannot be read or holds no such mapping.
    """
    path = Path(path)
    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise SettingsError(f"Cannot read settings file '{path}': {reason}.") from None
    try:
        settings = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise SettingsError(f"Settings file '{path}' is not valid {kind}: "
                            f"{errors.one_line(error, limit=400)}.") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise SettingsError(f"Settings file '{path}' must hold a mapping of setting names to values, "
                            f"not a {type(settings).__name__}.")
    return settings


def _setting_value(name: str, value: Any, where: str) -> Any:
    """`value` converted as the flag would convert its text (numbers from text too), or SettingsError."""
    spec, kind = FIELDS[name], value_type(name)
    if value is None:
        if nullable(name):
            return None
        raise SettingsError(f"{where} must have a value (it cannot be null).")
    if kind is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{where} must be true or false (got {value!r}).")
        return value
    if isinstance(value, bool) and spec.choices is not None and {"on", "off"} <= set(spec.choices):
        return "on" if value else "off"  # YAML reads on / off as booleans; older config.json files hold them
    described = {int: "an integer", float: "a number"}.get(kind, "a string")
    if isinstance(value, (bool, list, dict)) or (kind is int and isinstance(value, float)):
        raise SettingsError(f"{where} must be {described} (got {value!r}).")
    try:
        value = kind(value)
    except ValueError:
        raise SettingsError(f"{where} must be {described} (got {value!r}).") from None
    if spec.choices is not None and value not in spec.choices:
        raise SettingsError(f"{where} must be one of {', '.join(spec.choices)} (got {value!r}).")
    return value


def check_settings(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """Settings from a file, keyed as Config's fields ("teacher_epochs"; "teacher-epochs" works too),
    converted and checked as their flags would be. A key no setting has is refused, naming the
    closest valid one."""
    checked = {}
    for key, value in settings.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            closest = difflib.get_close_matches(name, list(FIELDS), n=1, cutoff=0.0)
            raise SettingsError(f"{source}: unknown setting '{key}' (the closest valid one is '{closest[0]}').")
        checked[name] = _setting_value(name, value, f"{source}: {name}")
    return checked


def config_file_settings(path: str) -> dict[str, Any]:
    """--config: the settings of a YAML or JSON file with config.json's keys, checked as the flags would be.

    "resolved" and "dataset" (what a run records beside its settings) are ignored. A run's own
    config.json (it has "resolved") repeats that run in a new folder: its output_dir is ignored too.
    """
    settings = read_settings(path)
    if "resolved" in settings:
        settings.pop("output_dir", None)
    for key in ("resolved", "dataset"):
        settings.pop(key, None)
    return check_settings(settings, source=path)


def resumed_config(run_dir: str, args: dict[str, Any], parser: argparse.ArgumentParser) -> Config | None:
    """--resume: the interrupted run's own settings (None when the run has already finished).

    A setting the run's config.json lacks (a run made before that setting existed) takes its default.
    """
    changed = sorted(f"--{key.replace('_', '-')}" for key, value in args.items() if value != parser.get_default(key))
    if changed:
        raise SettingsError(f"--resume continues with the run's saved settings; leave out {', '.join(changed)}.")
    path = Path(run_dir)
    if not (path / "config.json").is_file():
        raise SettingsError(f"--resume '{run_dir}' is not a run directory (it has no config.json).")
    if utils.holds_json(path / "summary.json"):
        print(f"Run '{run_dir}' has already finished: nothing to resume.")
        return None
    if (path / "summary.json").is_file():  # cut short by a crash while it was written: the resumed run writes it again
        print(f"Run '{run_dir}' has a damaged summary.json: resuming writes it again.")
    saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
    settings = check_settings({key: saved[key] for key in FIELDS if key in saved}, source=str(path / "config.json"))
    return Config(**{**{key: settings.get(key, parser.get_default(key)) for key in FIELDS}, "output_dir": str(path)})
