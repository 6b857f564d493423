"""Settings checks (config.settings): a teacher checkpoint's settings against the given flags, combinations
that cannot work, the recipe files, and passwords hidden from every shown form of a URL."""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import PASSWORD, ROOT, SECRET, SPEC, default_config

import experiment
from config import command_line, settings
from core import errors
from core.errors import SettingsError


def test_checkpoint_settings_yield_to_defaults_but_not_to_given_flags():
    checkpoint = {"arch": "resnet34", "image_size": 48}
    config = default_config(teacher_checkpoint="t.pth")
    adopted = settings.adopt_teacher_checkpoint(config, checkpoint, given=set())
    assert (adopted.teacher_model, adopted.image_size) == ("resnet34", 48)
    with pytest.raises(errors.SettingsError, match=r"--image-size 32 contradicts .* trained at 48 px"):
        settings.adopt_teacher_checkpoint(config, checkpoint, given={"image_size"})
    with pytest.raises(errors.SettingsError, match=r"--teacher-model VGG16 contradicts .* holds a resnet34"):
        settings.adopt_teacher_checkpoint(config, checkpoint, given=None)
    cropped = {**checkpoint, "resize": "center-crop"}
    assert settings.adopt_teacher_checkpoint(config, cropped, given=set()).resize == "center-crop"
    with pytest.raises(errors.SettingsError, match=r"--resize squash contradicts .* resized by center-crop"):
        settings.adopt_teacher_checkpoint(config, cropped, given={"resize"})


def test_the_test_split_with_a_sweep_is_refused():
    config = replace(experiment.default_config(), sweep=SPEC, eval_test_every_epoch=True)
    with pytest.raises(SettingsError, match="--eval-test-every-epoch cannot go with --sweep"):
        settings.validate(config)


@pytest.mark.parametrize("changes, expected", [
    ({"lr_schedule": "step"}, "--lr-schedule step needs --milestones"),
    ({"lr_schedule": "step", "milestones": "3,2"}, "--milestones must be increasing positive epochs"),
    ({"lr_schedule": "step", "milestones": "2,6"}, "--milestones 2,6 does not fit the 6 epochs the teacher trains"),
    ({"lr_schedule": "cosine", "milestones": "2"}, "--milestones belong to --lr-schedule step, not cosine"),
    ({"warmup_epochs": 1}, "onecycle has its own warm-up"),
    ({"lr_schedule": "cosine", "warmup_epochs": 3}, "--warmup-epochs 3 does not fit the 3 epochs each student trains"),
    ({"teacher_epochs": 0}, "--teacher-epochs 0 uses the teacher as --teacher-weights gives it"),
    ({"lockstep": "on", "compile": "on"}, "--lockstep on trains the students eagerly in one pass"),
])
def test_schedule_teacher_and_speed_settings_that_cannot_work_are_refused(changes, expected):
    config = replace(experiment.default_config(), **{"teacher_epochs": 6, "student_epochs": 3, **changes})
    with pytest.raises(SettingsError, match=expected):
        settings.validate(config)


def test_each_recipe_file_is_valid_settings():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        values = command_line.config_file_settings(str(path))
        config = replace(experiment.default_config(), **values, teacher_weights="teacher.pth", data_dir="data")
        settings.validate(config)
        assert (config.lr_schedule, config.milestones, config.student_epochs) == ("step", "150,180,210", 240), path
        assert config.teacher_epochs == 0 and config.batch_size == 64 and not config.nesterov, path


@pytest.mark.parametrize(("url", "shown"), [
    (f"sqlite:///s.db?pass%77ord={SECRET}", "sqlite:///s.db?pass%77ord=***"),
    (f"postgresql://kd@db/kd?sslpassword={SECRET}&sslmode=require",
     "postgresql://kd@db/kd?sslpassword=***&sslmode=require"),
    (f"mysql://kd@db/kd?PassWord={SECRET}&PWD={SECRET}", "mysql://kd@db/kd?PassWord=***&PWD=***"),
    (f"postgresql://kd:{SECRET}@db/kd?%70assword={SECRET}", "postgresql://kd:***@db/kd?%70assword=***"),
    ("postgresql://kd@db/kd?sslmode=require", "postgresql://kd@db/kd?sslmode=require"),
])
def test_every_password_like_key_is_hidden_however_it_is_spelled(url, shown):
    assert settings.without_password(url) == shown


@pytest.mark.parametrize(("url", "shown"), [
    (f"postgresql://kd:{PASSWORD}@db.example:5432/kd", "postgresql://kd:***@db.example:5432/kd"),
    (f"mysql+pymysql://kd:{PASSWORD}@db/kd?charset=utf8&password={PASSWORD}",
     "mysql+pymysql://kd:***@db/kd?charset=utf8&password=***"),
    ("postgresql://kd@db/kd", "postgresql://kd@db/kd"),
    ("sqlite:////abs/sweep.db", "sqlite:////abs/sweep.db"),
    ("/shared/sweeps/kd.journal", "/shared/sweeps/kd.journal"),
])
def test_a_storage_password_is_hidden(url, shown):
    assert settings.without_password(url) == shown


def test_a_feature_method_that_cannot_pair_the_models_is_named():
    config = default_config(kd_methods="kd,fitnet", teacher_model="mobilenet_v3_small", image_size=64)
    with pytest.raises(SettingsError, match="^--kd-methods fitnet: No feature stages are known for MobileNetV3"):
        settings.method_weights(config)


@pytest.mark.parametrize(("method", "part", "ce_weight", "term_weight"), [
    ("kd", "kd", 0.1, 0.9), ("dist", "dist", 1.0, 2.0), ("kd_ls", "kd", 0.1, 9.0)])
def test_a_recipe_gives_each_method_its_references_loss(method, part, ce_weight, term_weight):
    import torch
    from conftest import LABELS3, STUDENT3, TEACHER3

    import KD_engine

    values = command_line.config_file_settings(str(ROOT / "configs" / "resnet56_resnet20.yaml"))
    config = replace(experiment.default_config(), **{**values, "kd_methods": method},
                     teacher_weights="t.pth")
    assert config.alpha == 0.1 and config.loss_weights == "reference"
    criterion = KD_engine.make_criterion(method, torch.nn.Identity(), torch.nn.Identity(),
                                         settings.method_setup(config))
    out = criterion(torch.nn.Identity(), STUDENT3, LABELS3, TEACHER3)
    assert out["loss"].item() == pytest.approx(ce_weight * out["ce"].item() + term_weight * out[part].item(), rel=1e-6)
    assert settings.method_weights(config) == {"reference_weights": {method: {"ce": ce_weight, part: term_weight}}}


def test_a_recipe_resolves_each_methods_reference_weights_for_its_pair():
    values = command_line.config_file_settings(str(ROOT / "configs" / "resnet56_resnet20.yaml"))
    config = replace(experiment.default_config(), **{**values, "kd_methods": "dkd,reviewkd,at"},
                     teacher_weights="t.pth")
    assert settings.method_weights(config) == {"reference_weights": {
        "dkd": {"ce": 1.0, "tckd": 1.0, "nckd": 2.0}, "reviewkd": {"ce": 1.0, "kd": 0.0, "hcl": 0.6},
        "at": {"ce": 1.0, "kd": 0.0, "at": 1000.0}}}
    alpha_mix = settings.method_weights(replace(config, loss_weights="alpha", kd_methods="dist"))
    assert alpha_mix == {"logit_weights": {"dist": {"dist": 2.0}}}


@pytest.mark.parametrize(("changes", "flag"), [({"kd_methods": "fitnet", "beta": 50.0}, "--beta"),
                                               ({"kd_methods": "dkd_ls", "dkd_beta": 2.0}, "--dkd-beta")])
def test_a_weight_the_reference_loss_weights_would_not_use_is_refused(changes, flag):
    config = replace(experiment.default_config(), loss_weights="reference", **changes)
    with pytest.raises(SettingsError, match=f"{flag} weighs a term of the alpha mix, but --loss-weights reference"):
        settings.validate(config)
    settings.validate(replace(config, loss_weights="alpha"))
