"""CRD (methods/crd.py): the loss, the memory bank and its constants against a transcription of RepDistiller's crd/
on fixed tensors and negatives, the negatives' draws, the step through the distillation step, and what a
checkpoint keeps."""

import copy
import dataclasses

import pytest
import torch
from conftest import default_config, method_setup, tiny_convnet

import KD_engine
from benchmarks import reference_crd
from config import settings
from methods import crd

SAMPLES, BATCH, NEGATIVES = 30, 6, 10


def fixed_batches(steps: int = 2) -> list[tuple[torch.Tensor, ...]]:
    """Per step: student features (6, 8), teacher features (6, 12), distinct sample indices, and each image's
    own index followed by 10 fixed negatives."""
    generator = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(steps):
        indices = torch.randperm(SAMPLES, generator=generator)[:BATCH]
        negatives = torch.randint(0, SAMPLES, (BATCH, NEGATIVES), generator=generator)
        batches.append((torch.randn(BATCH, 8, generator=generator), 3 * torch.randn(BATCH, 12, generator=generator),
                        indices, torch.cat([indices[:, None], negatives], dim=1)))
    return batches


def test_two_steps_equal_the_reference_transcription():
    """Values, gradients, the normalization constants (set on the first batch only) and the banks after each
    momentum update: a wrong Z, momentum or normalization changes the second step or the banks."""
    torch.manual_seed(0)
    head = crd.ContrastiveHead(8, 12, SAMPLES)
    embed_s, embed_t, memory = reference_crd.reference_parts(head, NEGATIVES)
    for step, (f_s, f_t, indices, contrast) in enumerate(fixed_batches()):
        ours_input, ref_input = f_s.clone().requires_grad_(), f_s.clone().requires_grad_()
        ours = head(ours_input, f_t, indices, contrast)
        reference = reference_crd.ref_crd_loss(ref_input, f_t, indices, contrast, embed_s, embed_t, memory)
        assert ours.item() == pytest.approx(reference.item(), rel=1e-6), step
        ours.backward()
        reference.backward()
        torch.testing.assert_close(ours_input.grad, ref_input.grad, rtol=1e-5, atol=1e-7)
        for ours_linear, ref_linear in ((head.embed_student.linear, embed_s), (head.embed_teacher.linear, embed_t)):
            torch.testing.assert_close(ours_linear.weight.grad, ref_linear.weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(head.memory.normalizers, memory.params[2:4])
        torch.testing.assert_close(head.memory.student_memory, memory.memory_v1)
        torch.testing.assert_close(head.memory.teacher_memory, memory.memory_v2)
    assert head.memory.student_memory.norm(dim=1)[indices].tolist() == pytest.approx([1.0] * BATCH)


def test_contrast_loss_by_hand():
    # One image, one negative, N = 4: noise K/N = 0.25; P = 0.75 and 0.25.
    scores = torch.tensor([[0.75, 0.25]])
    expected = -(torch.log(torch.tensor(0.75 / (1.0 + 1e-7))) + torch.log(torch.tensor(0.25 / (0.5 + 1e-7))))
    assert crd.contrast_loss(scores, 4).item() == pytest.approx(expected.item(), rel=1e-6)


def test_negatives_are_distinct_images_of_other_classes_drawn_again_per_epoch():
    labels = torch.arange(40) % 4
    sampler = crd.NegativeSampler(labels, crd.negative_count(labels, 100), seed=3)
    assert sampler.count == 30, "capped at the images outside the largest class"
    sampler.set_epoch(2)
    indices = torch.tensor([0, 5, 6, 39])
    first = sampler.draw(indices)
    assert first.shape == (4, 31) and first[:, 0].tolist() == indices.tolist()
    for row, index in zip(first, indices, strict=True):
        assert len(set(row[1:].tolist())) == 30 and not (labels[row[1:]] == labels[index]).any()
    sampler.set_epoch(2)
    assert torch.equal(sampler.draw(indices), first), "an epoch's draws are replayed (a resumed run's)"
    sampler.set_epoch(3)
    assert not torch.equal(sampler.draw(indices), first)
    assert crd.negative_count(labels, 7) == 7


def crd_step(**settings_):
    torch.manual_seed(0)
    teacher, student = tiny_convnet(6), tiny_convnet(4)
    setup = dataclasses.replace(method_setup(image_size=8, **settings_), train_labels=torch.arange(SAMPLES) % 3)
    return KD_engine.make_criterion("crd", teacher, student, setup), student


def test_step_mixes_ce_kd_and_crd_and_trains_both_embeddings():
    step, student = crd_step(alpha=0.5, crd_negatives=5)
    assert step.needs_sample_indices and step.method.teacher_layers == {"7": True}
    step.set_epoch(1)
    images, indices = torch.randn(4, 3, 8, 8), torch.tensor([3, 7, 11, 20])
    out = step(student, images, indices % 3, indices)
    expected = 0.5 * out["ce"] + 0.5 * out["kd"] + 0.8 * 0.5 * out["crd"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    out["loss"].backward()
    assert all(parameter.grad is not None for parameter in step.trainable.parameters())
    assert step.trainable.memory.normalizers.min() > 0, "Z set on the first batch"
    saved = step.trainable.state_dict()
    assert {"memory.student_memory", "memory.teacher_memory", "memory.normalizers"} <= set(saved)
    assert saved["memory.student_memory"].shape == (SAMPLES, crd.EMBEDDING_DIM), "one row per training image"
    step.close()


def test_a_step_without_sample_indices_or_training_labels_is_refused():
    student = tiny_convnet(4)
    step = KD_engine.make_criterion("crd", tiny_convnet(6), student, method_setup(image_size=8))
    with pytest.raises(RuntimeError, match="train_labels"):
        step(student, torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), torch.tensor([0, 1]))


def test_crd_kd_is_the_papers_crd_plus_kd_under_reference_weights():
    assert KD_engine.method_class("crd").reference_weights == {"ce": 1.0, "kd": 0.0, "crd": 0.8}
    assert KD_engine.method_class("crd_kd").reference_weights == {"ce": 1.0, "kd": 1.0, "crd": 0.8}


def test_crd_beside_crd_kd_is_refused_where_their_losses_are_the_same():
    with pytest.raises(settings.SettingsError, match="crd and crd_kd, the same loss under --loss-weights alpha"):
        settings.validate(default_config(kd_methods="crd, CRD_KD"))
    settings.validate(default_config(kd_methods="crd,crd_kd", loss_weights="reference"))
    settings.validate(default_config(kd_methods="kd,crd_kd"))


def test_the_memory_bank_is_counted_against_the_memory_budget():
    plain = default_config(kd_methods="kd", memory_budget_mb=100.0, image_size=32)
    assert settings.image_budget_mb(plain) == 100.0
    with_crd = dataclasses.replace(plain, kd_methods="kd,crd")
    # 3072 bytes of pixels and 1024 of bank per image: a quarter of the budget goes to the bank.
    assert settings.image_budget_mb(with_crd) == pytest.approx(75.0)


def test_a_checkpointed_bank_restores_the_next_steps():
    step, student = crd_step(crd_negatives=5)
    step.set_epoch(1)
    images, indices = torch.randn(4, 3, 8, 8), torch.tensor([3, 7, 11, 20])
    step(student, images, indices % 3, indices)
    saved = copy.deepcopy(step.trainable.state_dict())
    later = step(student, images, indices % 3, indices)["crd"]
    fresh, fresh_student = crd_step(crd_negatives=5)
    fresh.trainable.load_state_dict(saved)
    fresh.set_epoch(1)
    fresh.method.sampler.draw(indices)  # the first step's draw, as the resumed epoch replays it
    assert fresh(fresh_student, images, indices % 3, indices)["crd"].item() == pytest.approx(later.item(), rel=1e-6)
