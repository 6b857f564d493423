"""The sweep's search space (sweep.search_space): the spec grammar and the searchable settings."""

from __future__ import annotations

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

import experiment
from config import settings
from sweep import search_space

# ---------------------------------------------------------------- the spec


def test_spec_grammar_gives_typed_distributions():
    space = search_space.parse_spec("temperature=1:10:log, alpha=0.1:0.9,batch-size=16:64,student_epochs=1|2,"
                                   "method=kd|dkd")
    assert space["temperature"] == FloatDistribution(1.0, 10.0, log=True)
    assert space["alpha"] == FloatDistribution(0.1, 0.9)
    assert space["batch_size"] == IntDistribution(16, 64)
    assert space["student_epochs"] == CategoricalDistribution((1, 2))
    assert all(type(choice) is int for choice in space["student_epochs"].choices)
    assert space["method"] == CategoricalDistribution(("kd", "dkd"))
    config = search_space.trial_config(experiment.default_config(), {"alpha": 0.3, "method": "dkd", "batch_size": 20})
    assert (config.alpha, config.kd_methods, config.batch_size) == (0.3, "dkd", 20)


def test_searchable_settings_come_from_the_config_types(monkeypatch):
    names = search_space.searchable_settings()
    for name in ("temperature", "alpha", "beta", "dkd_alpha", "dkd_beta", "student_lr", "weight_decay",
                 "label_smoothing", "dkd_warmup_epochs"):
        assert name in names
    for name in ("teacher_lr", "teacher_epochs", "seed", "image_size", "val_fraction", "workers", "kd_methods"):
        assert name not in names
    # A setting a new method adds is searchable without touching the sweep.
    monkeypatch.setitem(settings.FIELDS, "new_method_weight", settings.Flag("distillation methods", "a new weight"))
    monkeypatch.setitem(settings.TYPES, "new_method_weight", float)
    assert "new_method_weight" in search_space.searchable_settings()
    assert search_space.parse_spec("new_method_weight=1:2")["new_method_weight"] == FloatDistribution(1.0, 2.0)


def test_the_users_settings_are_a_trial_unless_outside_a_range():
    space = search_space.parse_spec("temperature=1:10:log,alpha=0.1:0.9,method=kd|dkd")
    config = experiment.default_config()
    assert search_space.user_params(config, space) == ({"temperature": 4.0, "alpha": 0.5, "method": "kd"}, [])
    hot = settings.Config(**{**vars(config), "temperature": 20.0, "kd_methods": "fitnet"})
    assert search_space.user_params(hot, space)[1] == ["temperature=20", "method=fitnet"]


def test_only_settings_that_change_the_training_batches_keep_trials_apart():
    """Trials that draw other batches cannot share a lockstep pass; the method, rates and epochs can differ."""
    config = experiment.default_config()
    shared = search_space.parse_spec("temperature=1:10:log,alpha=0.1:0.9,student_lr=0.001:0.1,student_epochs=1|2,"
                                     "method=kd|fitnet")
    assert search_space.stream_changing(config, shared) == []
    apart = search_space.parse_spec("alpha=0.1:0.9,batch_size=16:64")
    assert search_space.stream_changing(config, apart) == ["batch_size"]
    assert search_space.stream_changing(config, search_space.parse_spec(f"batch_size={config.batch_size}|8")) == [
        "batch_size"], "one choice equal to the user's batch size still leaves the other apart"
