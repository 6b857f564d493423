"""Contrastive representation distillation (Tian, Krishnan and Isola, "Contrastive Representation Distillation",
ICLR 2020), as RepDistiller computes it (crd/criterion.py: CRDLoss, Embed, ContrastLoss; crd/memory.py:
ContrastMemory), with the sample indices and negatives of its dataset/cifar100.py (CIFAR100InstanceSample, mode
'exact'):

- both models' embeddings (their classifiers' input, RepDistiller's feat[-1]) go through a trained linear layer to
  128 dimensions and are L2-normalized (`Embedding`);
- a memory bank keeps one such embedding of each model per training image, moved towards the step's embedding at
  momentum 0.5 and renormalized after each step (`ContrastMemory`);
- each image's embedding is scored against the other model's bank at its own row (the positive) and at the rows of
  16,384 images of other classes, drawn without replacement (the negatives): exp(v . m / 0.07) / Z, where Z is N
  times the mean score of the first batch, one constant per model, kept in the bank;
- the NCE loss of those scores (`contrast_loss`, the paper's Eq. 18), summed over both models as anchors.

Weight 0.8 beside CE 1 (RepDistiller scripts/run_cifar_distill.sh, `-a 0 -b 0.8`); `crd_kd` is the paper's
"CRD+KD", with Hinton's KD at weight 1 (`-a 1 -b 0.8`). With fewer training images than that, the negatives of an
image are capped at the number of images outside the largest class, so every image's are distinct, as the
reference's are on CIFAR-100.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

import model_builder
from core import compute
from methods.base import Setting, Setup, register
from methods.feature_maps import SETTINGS, FeatureMethod

EMBEDDING_DIM = 128  # RepDistiller's --feat_dim
NCE_TEMPERATURE = 0.07  # --nce_t
MOMENTUM = 0.5  # --nce_m: the share of a bank row kept at each update
NEGATIVES = 16384  # --nce_k
EPSILON = 1e-7  # crd/criterion.py's eps
BANK_BYTES_PER_IMAGE = 2 * EMBEDDING_DIM * 4  # a float32 row in each model's bank

CRD_SETTINGS = {
    **SETTINGS,
    "crd_negatives": Setting(int, NEGATIVES, "crd: negatives per training image, drawn from the other classes "
                             "without replacement (RepDistiller's --nce_k); capped at the images outside the "
                             "largest class", check=lambda value: value >= 1, rule="must be >= 1"),
}


class Embedding(nn.Module):
    """CRD's embedding head: a linear layer to `EMBEDDING_DIM` dimensions, then unit L2 norm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, EMBEDDING_DIM)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        embedded = self.linear(features.flatten(1))
        return embedded / embedded.pow(2).sum(1, keepdim=True).sqrt()


class ContrastMemory(nn.Module):
    """Each model's embedding of every training image (`samples` rows), initialized uniform in +-1/sqrt(dim / 3) as
    the reference's is, and the two normalization constants Z (-1 until the first batch sets them)."""

    def __init__(self, samples: int, dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        bound = 1 / math.sqrt(dim / 3)
        self.register_buffer("student_memory", torch.rand(samples, dim) * (2 * bound) - bound)
        self.register_buffer("teacher_memory", torch.rand(samples, dim) * (2 * bound) - bound)
        self.register_buffer("normalizers", torch.full((2,), -1.0))

    def scores(self, student: torch.Tensor, teacher: torch.Tensor, contrast: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1 + K) scores of the student's embeddings against the teacher's bank at the rows `contrast` (each
        image's own first), and of the teacher's against the student's bank, each divided by its Z."""
        batch, rows = contrast.shape
        student_scores = torch.exp(torch.bmm(self.teacher_memory[contrast.flatten()].view(batch, rows, -1),
                                             student[:, :, None]).squeeze(2) / NCE_TEMPERATURE)
        teacher_scores = torch.exp(torch.bmm(self.student_memory[contrast.flatten()].view(batch, rows, -1),
                                             teacher[:, :, None]).squeeze(2) / NCE_TEMPERATURE)
        first = torch.stack([student_scores.mean(), teacher_scores.mean()]).detach() * len(self.student_memory)
        # Set once, on the device: no step waits for the host to ask whether they are set.
        self.normalizers.copy_(torch.where(self.normalizers < 0, first, self.normalizers))
        return student_scores / self.normalizers[0], teacher_scores / self.normalizers[1]

    @torch.no_grad()
    def update(self, indices: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> None:
        """Move the images' rows to MOMENTUM * row + (1 - MOMENTUM) * embedding, renormalized."""
        for memory, embedding in ((self.student_memory, student), (self.teacher_memory, teacher)):
            rows = memory[indices] * MOMENTUM + embedding * (1 - MOMENTUM)
            memory.index_copy_(0, indices, rows / rows.pow(2).sum(1, keepdim=True).sqrt())


def contrast_loss(scores: torch.Tensor, samples: int) -> torch.Tensor:
    """The NCE loss of (B, 1 + K) normalized scores, the positive first, with noise 1 / `samples` per image:
    -(sum log(P / (P + K/N + eps)) over positives + sum log((K/N) / (P + K/N + eps)) over negatives) / B."""
    noise = (scores.shape[1] - 1) / samples
    positives, negatives = scores[:, 0], scores[:, 1:]
    positive_term = torch.log(positives / (positives + (noise + EPSILON))).sum()
    negative_term = torch.log(noise / (negatives + (noise + EPSILON))).sum()
    return -(positive_term + negative_term) / scores.shape[0]


class ContrastiveHead(nn.Module):
    """What CRD trains with the student (the two embeddings) and keeps (the memory bank of `samples` images)."""

    def __init__(self, student_dim: int, teacher_dim: int, samples: int) -> None:
        super().__init__()
        self.embed_student = Embedding(student_dim)
        self.embed_teacher = Embedding(teacher_dim)
        self.memory = ContrastMemory(samples)

    @torch.compiler.disable  # the bank's in-place update stays out of a compiled step's graph
    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor, indices: torch.Tensor,
                contrast: torch.Tensor) -> torch.Tensor:
        """CRD's loss for the images `indices` against the bank rows `contrast`, in float32 (exp(x / 0.07)
        magnifies a bf16 rounding 14-fold); then the bank takes the embeddings of every rank's images."""
        with torch.autocast(student_features.device.type, enabled=False):
            student = self.embed_student(student_features.float())
            teacher = self.embed_teacher(teacher_features.float())
            student_scores, teacher_scores = self.memory.scores(student, teacher, contrast)
            self.memory.update(compute.gather_rows(indices), compute.gather_rows(student.detach()),
                               compute.gather_rows(teacher.detach()))
        samples = len(self.memory.student_memory)
        return contrast_loss(student_scores, samples) + contrast_loss(teacher_scores, samples)


def negative_count(labels: torch.Tensor, wanted: int) -> int:
    """Negatives per image: `wanted`, at most the images outside the largest class (then all are distinct)."""
    return min(wanted, len(labels) - int(torch.bincount(labels).max()))


class NegativeSampler:
    """Each image's own index, then `count` indices of images of other classes drawn uniformly without
    replacement (CIFAR100InstanceSample's 'exact' mode), from a generator seeded by `seed`, the epoch and the rank
    at each epoch's start: a run resumed at an epoch draws what the uninterrupted one drew."""

    def __init__(self, labels: torch.Tensor, count: int, seed: int) -> None:
        self.labels, self.count, self.seed = labels, count, seed
        self.epoch = 1
        self.generator: torch.Generator | None = None

    def set_epoch(self, epoch: int) -> None:
        """Start the epoch's draws."""
        self.epoch, self.generator = epoch, None

    @torch.compiler.disable
    def draw(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, 1 + count) training-split indices for the images `indices`."""
        if self.labels.device != indices.device:
            self.labels = self.labels.to(indices.device)
        if self.generator is None:
            rank = compute.rank_and_world()[0]
            self.generator = torch.Generator(indices.device).manual_seed(hash((self.seed, self.epoch, rank)))
        others = (self.labels[None, :] != self.labels[indices][:, None]).float()
        negatives = torch.multinomial(others, self.count, replacement=False, generator=self.generator)
        return torch.cat([indices[:, None], negatives], dim=1)


@register
class CRD(FeatureMethod):
    """CRD's contrastive loss between the models' embeddings, through a memory bank of the training split."""

    name = "crd"
    year = 2020
    citation = "Tian, Krishnan & Isola, ICLR 2020; RepDistiller crd/criterion.py, crd/memory.py"
    parts = {"crd": "CRD contrastive"}
    settings = CRD_SETTINGS
    reference_weight = 0.8
    reference_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "kd": 0.0, "crd": 0.8}
    part = "crd"
    embedding = True
    needs_sample_indices = True
    memory_per_image = BANK_BYTES_PER_IMAGE

    def __init__(self, teacher: nn.Module, student: nn.Module, setup: Setup) -> None:
        labels = setup.train_labels
        self.samples = 0 if labels is None else len(labels)  # a bank of no rows where no training split is given
        super().__init__(teacher, student, setup)
        self.indices: torch.Tensor | None = None
        self.sampler: NegativeSampler | None = None
        if labels is not None:
            seed = int(torch.randint(2**62, (1,), device="cpu"))  # from the student's seeded start: as on resume
            self.sampler = NegativeSampler(labels, negative_count(labels.cpu(), self.config.crd_negatives), seed)
            if compute.is_main_process():
                print(self.description())

    def description(self) -> str:
        """The console's line: the bank's size and the negatives per image (and why fewer than asked)."""
        wanted, count = self.config.crd_negatives, self.sampler.count
        capped = (f" (the images outside the largest class: fewer than --crd-negatives {wanted})"
                  if count < wanted else "")
        return (f"[{self.name}] memory bank of 2 x {self.samples} x {EMBEDDING_DIM} float32 embeddings "
                f"({self.samples * BANK_BYTES_PER_IMAGE / 2**20:.1f} MiB, counted against --memory-budget-mb); "
                f"{count} negatives per image{capped}")

    @classmethod
    def default_pairs(cls, teacher: nn.Module, student: nn.Module) -> list[tuple[str, str]]:
        """The models' classifiers, whose inputs are the embeddings."""
        return [(model_builder.classifier_layer(teacher), model_builder.classifier_layer(student))]

    def make_trainable(self, shapes: Any) -> nn.Module:
        if len(shapes) != 1:
            raise ValueError(f"CRD distills one pair of embeddings, not {len(shapes)}.")
        (student_shape, teacher_shape), = shapes  # an embedding may come as (N, C, 1, 1): its size is C
        return ContrastiveHead(math.prod(student_shape[1:]), math.prod(teacher_shape[1:]), self.samples)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def take_sample_indices(self, indices: torch.Tensor) -> None:
        self.indices = indices

    def feature_loss(self, student_features: list[torch.Tensor], teacher_features: list[torch.Tensor],
                     ) -> torch.Tensor:
        if self.sampler is None or self.indices is None:
            raise RuntimeError("CRD needs the training split's labels (Setup.train_labels) and each batch's sample "
                               "indices (take_sample_indices).")
        contrast = self.sampler.draw(self.indices)
        return self._trainable(student_features[0].flatten(1), teacher_features[0].flatten(1), self.indices, contrast)


@register
class CRDKD(CRD):
    """The paper's CRD+KD: under --loss-weights reference, CE + KD + 0.8 CRD (under alpha, the same loss as crd)."""

    name = "crd_kd"
    citation = "Tian, Krishnan & Isola, ICLR 2020 (CRD+KD); RepDistiller crd/, scripts/run_cifar_distill.sh -a 1"
    reference_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "kd": 1.0, "crd": 0.8}
    same_under_alpha = "crd"
