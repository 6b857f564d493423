"""A training step holds nothing that makes the host wait for the device, for every method, and an
epoch's results reach the host in one copy: counted on the CPU by step_profile."""

from __future__ import annotations

import pytest
import torch

import data_setup
import engine
import KD_engine
import model_builder
from benchmarks import step_profile

DEVICE = torch.device("cpu")
CLASSES, SIZE = 4, 16


def _loader(count: int = 30, batch_size: int = 12) -> data_setup.BatchLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    data = data_setup.ImageTensors(images, torch.arange(count) % CLASSES, [str(i) for i in range(count)], SIZE)
    return data_setup.BatchLoader(data, batch_size, [0.5] * 3, [0.25] * 3, DEVICE, data_setup.Augmentation(2, True))


def _profile(method: str) -> step_profile.StepCounter:
    """One epoch (3 steps, the last one smaller) of `method` with small literature models, counted."""
    torch.manual_seed(0)
    student, teacher = (model_builder.build_model("resnet8", CLASSES, SIZE).to(memory_format=torch.channels_last)
                        for _ in range(2))
    loader = _loader()
    if method == "plain":
        criterion = engine.SupervisedCriterion()
    else:
        setup = KD_engine.library_setup(image_size=SIZE, steps_per_epoch=len(loader), dkd_warmup_epochs=2)
        criterion = KD_engine.make_criterion(method, teacher, student, setup)
    trainable = criterion.trainable  # FitNets' regressors
    parameters = list(student.parameters()) + ([] if trainable is None else list(trainable.parameters()))
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, fused=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=len(loader))
    with step_profile.counting([student, teacher], optimizer) as counter:
        engine.train_one_epoch(student, step_profile.CountedSteps(loader, counter), criterion, optimizer,
                               [str(c) for c in range(CLASSES)], DEVICE, scheduler)
    return counter


@pytest.mark.parametrize("method", ["plain", *KD_engine.method_names()])
def test_no_step_makes_the_host_wait_and_the_epoch_is_read_once(method):
    counter = _profile(method)
    steps = range(len(_loader()))
    for region in (step_profile.MODEL, step_profile.OPTIMIZER, step_profile.OTHER):
        waits = {step: counter.sync_names.get((step, region)) for step in steps if counter.syncs[(step, region)]}
        assert not waits, f"{method}: host waits in the {region} region of steps {waits}"
    assert all(counter.ops[(step, step_profile.OTHER)] > 0 for step in steps)  # the counting saw every step
    assert counter.sync_names[("end", step_profile.OTHER)]["cpu"] == 1, "the epoch's results in one copy"


def test_the_counter_sees_host_waits():
    """The test above can fail: a boolean mask, `.item()` and a copy to the host are each seen."""
    values = torch.arange(6.0, device=DEVICE)
    with step_profile.counting() as counter:
        values[values > 2].sum()
        values.sum().item()
        values.to("cpu")
        values.to(DEVICE)  # a move to the run's device is taken for no host copy
    assert set(counter.sync_names[("setup", step_profile.OTHER)]) == {"index", "_local_scalar_dense", "item", "to"}
