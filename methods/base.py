"""What every distillation method declares, and the registry that finds a method by name.

A method is one class in one file of this package, registered with `@register`:

- `name`, `citation` and `parts` (the loss parts it reports beside "loss" and "ce", with their plot labels);
- `settings`: the settings it adds to the run (each a flag and a Config field; see `Setting`), and `reads`, the
  run-wide ones it uses (temperature, alpha, ...);
- `uses_features` and `teacher_layers`: the teacher's feature maps it needs beside the logits (none for logit
  methods); a method that needs none can use teacher logits cached per image;
- `trainable`: what it trains with the student (FitNets' regressors, ...), or None;
- `loss(student_logits, teacher, labels)`: the loss and its parts, the hard-label CE term included;
- `needs_sample_indices`: whether it needs each training image's index in the split (`take_sample_indices`);
- `weights()`: the weights it resolved for this run (per teacher/student pair where its reference has them),
  written to config.json;
- `reference_weights` (and `reference_weights_for(teacher_arch, student_arch)` where its reference weighs pairs
  differently): its reference's loss as a weight per loss part ({"ce": 1.0, "dist": 2.0}), which
  `--loss-weights reference` uses instead of the method's own alpha mix (`combined_loss`).
- `init_stage(teacher, student)`: what it trains before the student's epochs (an `InitStage`: AB's connectors,
  FT's paraphraser, ...), or None; the training code runs it once per student and saves its result.

The run builds one instance per student (`create`), given the teacher, the student and a `Setup`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from engine import HardLoss

WARMUP_SHARE = 20 / 240  # DKD's CIFAR warm-up, 20 of 240 epochs (also mdistiller's ReviewKD's)
ALPHA_MIX, REFERENCE_MIX = "alpha", "reference"  # --loss-weights: this tool's alpha mix, or each reference's weights


@dataclass(frozen=True)
class Setting:
    """A method's own setting: a Config field with its flag (`--dkd-beta`) and experiment.py constant (`DKD_BETA`).

    `type` is the field's type (float, int | None, ...); `default` is used when experiment.py
    has no constant of that name; `check(value)` says whether a value is allowed (None counts as unset).
    """

    type: Any
    default: Any
    help: str
    unset: str | None = None
    check: Callable[[Any], bool] | None = None
    rule: str = ""  # the allowed range in words, for the error: "must be >= 0"


@dataclass(frozen=True)
class Setup:
    """What a method is told about the run, in one object.

    `config` is the run's settings (config.settings.Config: every flag by name); `teacher_arch` and
    `student_arch` are canonical architecture names (for per-pair reference weights); `steps_per_epoch`
    and `epochs` size warm-ups; `image_size` sizes dry runs; `hard_loss` is the CE term every method uses;
    `train_labels` are the training split's labels by sample index (None outside a run's training).
    """

    config: Any
    teacher_arch: str
    student_arch: str
    image_size: int = 32
    epochs: int = 1
    steps_per_epoch: int = 1
    hard_loss: HardLoss = nn.functional.cross_entropy
    layer_pairs: Sequence[tuple[str, str]] | None = None  # feature methods: checked (teacher, student) layer pairs
    train_labels: torch.Tensor | None = None


@dataclass
class TeacherOutputs:
    """What the teacher's forward gave: its logits and the hooked feature maps, by layer name."""

    logits: torch.Tensor
    features: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class InitStage:
    """A method's initialization stage, trained before the student's epochs (RepDistiller's helper/pretrain.py).

    `trains` holds the only parameters its optimizer sees (the run's, at `lr_factor` times the run's learning rate,
    for `epochs` epochs over the training split); they are in train mode and the rest of the student in eval mode
    meanwhile. `loss(images)` runs the frozen teacher (and the student, where the stage
    needs it) on a batch and gives the stage's loss. `close()` takes off the hooks the stage put on the models.
    """

    trains: nn.Module
    loss: Callable[[torch.Tensor], torch.Tensor]
    epochs: int
    lr_factor: float = 1.0
    close: Callable[[], None] = lambda: None


class Method:
    """Base of every distillation method (see the module's docstring). Subclasses set the class attributes and
    `loss`; feature methods also `teacher_layers` and `trainable`."""

    name: ClassVar[str]
    citation: ClassVar[str]
    year: ClassVar[int]  # of publication: methods are listed in the literature's order
    parts: ClassVar[dict[str, str]] = {}
    settings: ClassVar[dict[str, Setting]] = {}
    reads: ClassVar[tuple[str, ...]] = ("temperature", "alpha")
    min_classes: ClassVar[int] = 2
    few_classes: ClassVar[str] = ""  # why it needs `min_classes`, when more than 2: said where it refuses a run
    uses_features: ClassVar[bool] = False  # whether it needs teacher feature maps (then no cached teacher logits)
    # Its reference's loss: a weight per loss part ("ce" and the parts `loss` reports), for --loss-weights reference.
    reference_weights: ClassVar[dict[str, float]] = {}
    same_under_alpha: ClassVar[str | None] = None  # a method whose loss this one's equals under --loss-weights alpha
    needs_sample_indices: ClassVar[bool] = False  # whether each step must tell it its images' training-split indices
    memory_per_image: ClassVar[int] = 0  # bytes it keeps per training image (CRD's memory bank): see image_budget_mb

    trainable: nn.Module | None = None
    # The teacher layers whose maps it needs, each with whether the layer's input (the map before it: a
    # pre-activation) rather than its output is taken; set by the instance, empty for logit methods.
    teacher_layers: Mapping[str, bool] = {}

    def __init__(self, teacher: nn.Module, student: nn.Module, setup: Setup) -> None:
        problems = self.check(setup.config)
        if problems:
            raise ValueError(problems[0])
        self.setup = setup
        self.config = setup.config
        self.hard_loss = setup.hard_loss
        # None: the method's own alpha mix (`loss`'s total); else the reference's weight per part (`combined_loss`)
        self.loss_weights = (self.reference_weights_for(setup.teacher_arch, setup.student_arch)
                             if self.config.loss_weights == REFERENCE_MIX else None)

    @classmethod
    def reference_weights_for(cls, teacher_arch: str, student_arch: str) -> dict[str, float]:
        """The reference's weight per loss part for a teacher / student pair (canonical architecture names):
        `reference_weights`, unless the method's reference weighs pairs differently."""
        return dict(cls.reference_weights)

    @classmethod
    def check(cls, config: Any) -> list[str]:
        """Sentences naming what in `config` this method cannot work with (its settings' ranges, ...)."""
        problems = [f"--{name.replace('_', '-')} {setting.rule} (got {getattr(config, name)})."
                    for name, setting in cls.settings.items()
                    if setting.check is not None and getattr(config, name) is not None
                    and not setting.check(getattr(config, name))]
        if config.loss_weights == REFERENCE_MIX and not cls.reference_weights:
            problems.append(f"--kd-methods {cls.name} declares no reference weights: use --loss-weights alpha.")
        return problems

    @classmethod
    def check_classes(cls, num_classes: int) -> list[str]:
        """A sentence naming this method and why it cannot learn from `num_classes` classes; none when it can."""
        if num_classes >= cls.min_classes:
            return []
        why = f" ({cls.few_classes})" if cls.few_classes else ""
        return [f"--kd-methods {cls.name} needs at least {cls.min_classes} classes{why}, but the data has "
                f"{num_classes}: leave it out of --kd-methods."]

    def weights(self) -> dict[str, Any]:
        """The weights of the method's own alpha mix, as config.json's `resolved` records them (merged over
        methods)."""
        return {}

    def resolved_weights(self) -> dict[str, Any]:
        """The weights this student's loss uses: `weights()`, or under --loss-weights reference the reference's
        weight per part."""
        if self.loss_weights is None:
            return self.weights()
        return {"reference_weights": {self.name: dict(self.loss_weights)}}
    def init_stage(self, teacher: nn.Module, student: nn.Module) -> InitStage | None:
        """The stage this method trains before the student's epochs (the frozen `teacher`, the plain `student`),
        or None: most methods have none."""
        return None

    def set_epoch(self, epoch: int) -> None:
        """Told before each epoch (from 1): a method that warms up counts its steps from here."""

    def begin_step(self, device: torch.device) -> None:
        """Told before each step's forward passes (a compiled step keeps this out of its graph where the method
        marks it `torch.compiler.disable`, so the step stays one graph)."""

    def end_step(self) -> None:
        """Told after each step's loss."""

    def take_sample_indices(self, indices: torch.Tensor) -> None:
        """Told before each step's loss, where `needs_sample_indices`: its images' indices in the training split."""

    def loss(self, student_logits: torch.Tensor, teacher: TeacherOutputs, labels: torch.Tensor,
             ) -> dict[str, torch.Tensor]:
        """{"loss": the total, "ce": the hard-label term, <its parts>}."""
        raise NotImplementedError

    def combined_loss(self, student_logits: torch.Tensor, teacher: TeacherOutputs, labels: torch.Tensor,
                      ) -> dict[str, torch.Tensor]:
        """`loss`, its total the run's mix: the method's own (alpha), or under --loss-weights reference
        `reference_total` of its parts."""
        parts = self.loss(student_logits, teacher, labels)
        if self.loss_weights is None:
            return parts
        return {**parts, "loss": reference_total(self.loss_weights, parts, self.parts)}

    def close(self) -> None:
        """Take off any hooks the method put on the student."""


REGISTRY: dict[str, type[Method]] = {}  # by name, in the literature's order (year, then name)


def register(method: type[Method]) -> type[Method]:
    """Class decorator: make `method` available by its `name` (in --kd-methods, --sweep and --help)."""
    if method.name in REGISTRY and REGISTRY[method.name] is not method:
        raise ValueError(f"Two distillation methods are named '{method.name}'.")
    REGISTRY[method.name] = method
    listed = sorted(REGISTRY.values(), key=lambda known: (known.year, known.name))
    REGISTRY.clear()
    REGISTRY.update((known.name, known) for known in listed)
    return method


def reference_total(weights: Mapping[str, float], parts: Mapping[str, torch.Tensor],
                    own_parts: Collection[str]) -> torch.Tensor:
    """sum(weight * part) over the weighed parts, each of the method's own parts (`own_parts`: not "ce", nor the KD
    term a feature method adds) times the step's warm-up factor where the method reports one ("warmup"), as the
    references warm up their distillation term alone."""
    unknown = set(weights) - set(parts)
    if unknown:
        raise ValueError(f"Reference weights name parts the loss does not report: {', '.join(sorted(unknown))}.")
    warmup = parts.get("warmup")
    terms = [weight * parts[name] * (warmup if warmup is not None and name in own_parts else 1)
             for name, weight in weights.items() if weight != 0]  # a 0-weighed part adds nothing, not even NaN
    return torch.stack(terms).sum()


def unused_weight(config: Any, name: str) -> list[str]:
    """The sentence refusing the weight setting `name` (one left unset by default) where the user gave it under
    --loss-weights reference, which does not use it; none otherwise."""
    if config.loss_weights != REFERENCE_MIX or getattr(config, name) is None:
        return []
    flag = f"--{name.replace('_', '-')}"
    return [f"{flag} weighs a term of the alpha mix, but --loss-weights reference gives each method its reference's "
            f"weights: leave out {flag}, or give --loss-weights alpha."]


def method_class(name: str) -> type[Method]:
    """The registered method called `name`."""
    if name not in REGISTRY:
        raise ValueError(f"Unknown distillation method '{name}'; known methods: {', '.join(REGISTRY)}.")
    return REGISTRY[name]


def declared_settings() -> dict[str, Setting]:
    """Every registered method's own settings by field name (methods that share one declare the same object)."""
    declared: dict[str, Setting] = {}
    for method in REGISTRY.values():
        for name, setting in method.settings.items():
            if declared.setdefault(name, setting) is not setting:
                raise ValueError(f"Two methods declare different settings called '{name}'.")
    return declared


def warmup_steps(epochs: int, steps_per_epoch: int, warmup_epochs: int | None = None) -> int:
    """Optimizer steps of a linear warm-up: `warmup_epochs` epochs when given (0: none), else the DKD paper's
    share (WARMUP_SHARE) of all the run's steps, at least one."""
    if warmup_epochs is not None:
        return warmup_epochs * steps_per_epoch
    return max(1, round(epochs * steps_per_epoch * WARMUP_SHARE))


def warmup_factor(step: int, steps: int) -> float:
    """min(step / steps, 1), optimizer steps counted from 1; 1 when `steps` is 0."""
    return 1.0 if steps == 0 else min(step / steps, 1.0)


def non_negative(value: Any) -> bool:
    """A setting's check: the value is >= 0."""
    return value >= 0
