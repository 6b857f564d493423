"""Attention transfer (methods/at.py) against hand computation, and the reference's layer pairs."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import KD_engine
from methods import at


def hand_attention(channels):
    """p=2 attention of one sample's map given as channels of flat positions: channel mean of squares, unit norm."""
    squares = [sum(c[i] ** 2 for c in channels) / len(channels) for i in range(len(channels[0]))]
    norm = math.sqrt(sum(v * v for v in squares))
    return [v / norm for v in squares]


def test_attention_transfer_matches_hand_computation():
    # One sample, two channels, a 1x2 map.
    student = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    teacher = torch.tensor([[[[0.0, 1.0]], [[1.0, 1.0]]]])
    a_s = hand_attention([[1.0, 2.0], [3.0, 0.0]])  # [5, 2] / sqrt(29)
    a_t = hand_attention([[0.0, 1.0], [1.0, 1.0]])  # [0.5, 1] / sqrt(1.25)
    expected = sum((s - t) ** 2 for s, t in zip(a_s, a_t, strict=True)) / 2  # a mean over the 2 positions
    assert at.at_loss([student], [teacher]).item() == pytest.approx(expected, rel=1e-6)
    assert at.at_loss([student], [student * 3]).item() == pytest.approx(0.0, abs=1e-7)
    # Pairs are summed: a second pair (a 2x1 map of one channel: attention [0.6, 0.8] vs [1, 0]).
    second_student, second_teacher = torch.tensor([[[[3.0], [4.0]]]]).sqrt(), torch.tensor([[[[1.0], [0.0]]]])
    second = ((0.6 - 1.0) ** 2 + (0.8 - 0.0) ** 2) / 2
    both = at.at_loss([student, second_student], [teacher, second_teacher])
    assert both.item() == pytest.approx(expected + second, rel=1e-6)


def test_attention_transfer_batch_mean_and_spatial_mismatch():
    torch.manual_seed(2)
    student = torch.randn(3, 4, 8, 8)
    teacher = F.avg_pool2d(student, 2)  # 4x4: the student's map is pooled to it
    assert at.at_loss([student], [teacher]).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(3, 6, 4, 4)  # channel counts may differ
    per_sample = [at.at_loss([student[i : i + 1]], [other[i : i + 1]]).item() for i in range(3)]
    assert at.at_loss([student], [other]).item() == pytest.approx(sum(per_sample) / 3, rel=1e-5)


def test_default_vgg_to_resnet_pairs_are_the_stage_outputs(real_models):
    assert at.AT.default_pairs(*real_models) == [
        ("features.12", "layer1"), ("features.22", "layer2"), ("features.32", "layer3"), ("features.42", "layer4")]


def test_a_method_refuses_settings_its_checks_refuse_when_built():
    teacher, student = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
    with pytest.raises(ValueError, match=r"^--beta must be >= 0 \(got -1.0\)\.$"):
        KD_engine.make_criterion("at", teacher, student, KD_engine.library_setup(beta=-1.0))
