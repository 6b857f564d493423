"""CRD against a transcription of RepDistiller's crd/ (method_reference.py prints its row; also run alone).

    python benchmarks/reference_crd.py [--seed N] [--batch-size N] [--classes N]

The transcription below follows HobbitLong/RepDistiller crd/criterion.py (`CRDLoss.forward`, `Embed`,
`Normalize`, `ContrastLoss.forward`) and crd/memory.py (`ContrastMemory.__init__` and `forward`: the scores, the
normalization constants set on the first batch, the momentum update), with the weight of
scripts/run_cifar_distill.sh (`--distill crd -r 1 -a 0 -b 0.8`). It shares no code with methods/crd.py.

`crd_row` runs our criterion (the reference's pair resnet32x4 -> resnet8x4 at initialization, --alpha 1, so CE +
0.8 CRD) for two steps on a training split of CIFAR-100's size, recording each step's embeddings' inputs and
negatives; the transcription replays both steps from the same starting embeddings and memory bank. The row is
(ours, reference, ours / reference) for the second step's term (its scores use the bank the first step updated
and the constants Z it set), and the relative difference of the gradients with respect to the student's
features; the banks after both steps are compared too.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import experiment  # noqa: E402
import KD_engine  # noqa: E402
import model_builder  # noqa: E402
from config import settings  # noqa: E402

TARGET = 1e-4
TEACHER, STUDENT = "resnet32x4", "resnet8x4"
REF_WEIGHT = 0.8  # run_cifar_distill.sh -b 0.8
REF_NCE_T, REF_NCE_M, REF_EPS = 0.07, 0.5, 1e-7  # train_student.py --nce_t, --nce_m; criterion.py eps
SAMPLES, NEGATIVES = 50000, 16384  # CIFAR-100's training split, train_student.py --nce_k

# ---------------------------------------------------------------- RepDistiller crd/, transcribed


def ref_embed(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """criterion.py Embed: flatten, linear, Normalize(2)."""
    x = linear(x.view(x.shape[0], -1))
    norm = x.pow(2).sum(1, keepdim=True).pow(1.0 / 2)
    return x.div(norm)


class RefContrastMemory:
    """memory.py ContrastMemory's state and forward, given the sampled indices (`idx`)."""

    def __init__(self, memory_v1: torch.Tensor, memory_v2: torch.Tensor, nce_k: int) -> None:
        self.params = torch.tensor([nce_k, REF_NCE_T, -1, -1, REF_NCE_M])
        self.memory_v1, self.memory_v2 = memory_v1.clone(), memory_v2.clone()

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        K, T = int(self.params[0].item()), self.params[1].item()
        Z_v1, Z_v2, momentum = self.params[2].item(), self.params[3].item(), self.params[4].item()
        batch_size, (output_size, input_size) = v1.size(0), self.memory_v1.shape
        weight_v1 = torch.index_select(self.memory_v1, 0, idx.view(-1)).detach().view(batch_size, K + 1, input_size)
        out_v2 = torch.exp(torch.div(torch.bmm(weight_v1, v2.view(batch_size, input_size, 1)), T))
        weight_v2 = torch.index_select(self.memory_v2, 0, idx.view(-1)).detach().view(batch_size, K + 1, input_size)
        out_v1 = torch.exp(torch.div(torch.bmm(weight_v2, v1.view(batch_size, input_size, 1)), T))
        if Z_v1 < 0:
            self.params[2] = out_v1.mean() * output_size
            Z_v1 = self.params[2].clone().detach().item()
        if Z_v2 < 0:
            self.params[3] = out_v2.mean() * output_size
            Z_v2 = self.params[3].clone().detach().item()
        out_v1, out_v2 = torch.div(out_v1, Z_v1).contiguous(), torch.div(out_v2, Z_v2).contiguous()
        with torch.no_grad():
            for memory, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
                pos = torch.index_select(memory, 0, y.view(-1))
                pos.mul_(momentum)
                pos.add_(torch.mul(v, 1 - momentum))
                memory.index_copy_(0, y, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5)))
        return out_v1, out_v2


def ref_contrast_loss(x: torch.Tensor, n_data: int) -> torch.Tensor:
    """criterion.py ContrastLoss.forward (Eq. 18)."""
    bsz, m = x.shape[0], x.size(1) - 1
    Pn = 1 / float(n_data)
    P_pos = x.select(1, 0)
    log_D1 = torch.div(P_pos, P_pos.add(m * Pn + REF_EPS)).log_()
    P_neg = x.narrow(1, 1, m)
    log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + REF_EPS)).log_()
    return -(log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz


def ref_crd_loss(f_s: torch.Tensor, f_t: torch.Tensor, idx: torch.Tensor, contrast_idx: torch.Tensor,
                 embed_s: nn.Linear, embed_t: nn.Linear, memory: RefContrastMemory) -> torch.Tensor:
    """criterion.py CRDLoss.forward: both embeddings, the memory's scores, the two NCE losses summed."""
    out_s, out_t = memory.forward(ref_embed(f_s, embed_s), ref_embed(f_t, embed_t), idx, contrast_idx)
    n_data = memory.memory_v1.shape[0]
    return (ref_contrast_loss(out_s, n_data) + ref_contrast_loss(out_t, n_data)).squeeze(0)


# ---------------------------------------------------------------- ours against the reference


def embedding_inputs(model: nn.Module) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    """Each forward's input of the model's classifier (RepDistiller's feat[-1]), detached, and the hook's handle."""
    kept: list[torch.Tensor] = []
    layer = dict(model.named_modules())[model_builder.classifier_layer(model)]
    return kept, layer.register_forward_pre_hook(lambda module, inputs: kept.append(inputs[0].detach().clone()))


def reference_parts(head: nn.Module, nce_k: int) -> tuple[nn.Linear, nn.Linear, RefContrastMemory]:
    """The transcription's embeddings and memory, starting from a copy of our head's state."""
    embed_s, embed_t = copy.deepcopy(head.embed_student.linear), copy.deepcopy(head.embed_teacher.linear)
    return embed_s, embed_t, RefContrastMemory(head.memory.student_memory, head.memory.teacher_memory, nce_k)


def crd_row(args: argparse.Namespace, samples: int = SAMPLES, negatives: int = NEGATIVES) -> tuple:
    """Two steps of our criterion and of the transcription; the second step's terms and gradients compared."""
    torch.manual_seed(args.seed)
    teacher = model_builder.build_model(TEACHER, args.classes, 32)
    student = model_builder.build_model(STUDENT, args.classes, 32).train()
    train_labels = torch.arange(samples) % args.classes
    config = dataclasses.replace(experiment.default_config(), teacher_model=TEACHER, student_model=STUDENT,
                                 alpha=1.0, crd_negatives=negatives)
    criterion = KD_engine.make_criterion("crd", teacher, student, settings.method_setup(
        config, train_labels=train_labels))
    criterion.set_epoch(1)
    head, sampler = criterion.trainable, criterion.method.sampler
    embed_s, embed_t, memory = reference_parts(head, sampler.count)
    drawn, draw = [], sampler.draw
    sampler.draw = lambda indices: drawn.append(draw(indices)) or drawn[-1]
    student_inputs, student_hook = embedding_inputs(student)
    teacher_inputs, teacher_hook = embedding_inputs(teacher)
    generator = torch.Generator().manual_seed(args.seed)
    steps = []
    for _ in range(2):
        indices = torch.randperm(samples, generator=generator)[: args.batch_size]
        images = torch.randn(args.batch_size, 3, 32, 32, generator=generator)
        before = copy.deepcopy(head.state_dict())
        out = criterion(student, images, train_labels[indices], indices)
        steps.append((indices, before, float((out["loss"] - out["ce"]).detach())))
    student_hook.remove(), teacher_hook.remove(), criterion.close()
    reference = None
    for step, (indices, _, _) in enumerate(steps):
        f_s = student_inputs[step].requires_grad_()
        reference = REF_WEIGHT * ref_crd_loss(f_s, teacher_inputs[step].clone(), indices, drawn[step], embed_s, embed_t,
                                              memory)
    indices, before, ours_value = steps[-1]
    replay = copy.deepcopy(head)
    replay.load_state_dict(before)
    ours = criterion.method.beta * replay(student_inputs[1], teacher_inputs[1].clone(), indices, drawn[1])
    g_ours, = torch.autograd.grad(ours, student_inputs[1])
    g_ref, = torch.autograd.grad(reference, student_inputs[1])
    banks = max(float((ours_bank - ref_bank).abs().max()) for ours_bank, ref_bank in (
        (head.memory.student_memory, memory.memory_v1), (head.memory.teacher_memory, memory.memory_v2)))
    gradient = float((g_ours - g_ref).norm() / g_ref.norm())
    return ours_value, float(reference), ours_value / float(reference), max(gradient, banks)


def rows(args: argparse.Namespace) -> dict[str, tuple]:
    """method_reference.py's rows for this file's methods: crd (crd_kd's CRD term is the same)."""
    return {"crd": crd_row(args)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args()
    ours, reference, ratio, difference = rows(args)["crd"]
    verdict = "within" if abs(ratio - 1) <= TARGET and difference <= TARGET else "OUTSIDE"
    print(f"crd: ours {ours:.6f}, reference {reference:.6f}, ratio {ratio:.7f}, gradient / bank difference "
          f"{difference:.1e} ({verdict} the {TARGET:g} target)")


if __name__ == "__main__":
    main()
