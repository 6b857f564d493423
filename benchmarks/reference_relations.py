"""The relational and embedding methods (sp, cc, vid, rkd, pkt, nst) against transcriptions of RepDistiller's code.

Used by benchmarks/method_reference.py (its REFERENCE line) and by the methods' tests. The transcriptions below
follow HobbitLong/RepDistiller's distiller_zoo/*.py step by step and share no code with methods/:

- sp: distiller_zoo/SP.py `Similarity.similarity_loss` (lines 16-30) on feat[-2] (train_student.py, loops.py 144-148);
- cc: distiller_zoo/CC.py `Correlation.forward` (lines 14-17) on feat[-1] through two `LinearEmbed`s to 128
  dimensions (models/util.py 185-194; train_student.py 211-218, loops.py 162-165), both trained;
- vid: distiller_zoo/VID.py `VIDLoss` (lines 9-54), one per pair of feat[1:-1], VIDLoss(s, t, t) (train_student.py
  219-226, loops.py 166-170), summed;
- rkd: distiller_zoo/RKD.py `RKDLoss` (lines 8-58, w_d 25, w_a 50) on feat[-1] (loops.py 149-152);
- pkt: distiller_zoo/PKT.py `cosine_similarity_loss` (lines 16-42) on feat[-1] (loops.py 153-156);
- nst: distiller_zoo/NST.py `NSTLoss` (lines 13-42, full_loss) on feat[1:-1] (loops.py 139-143), summed.

Weights: scripts/run_cifar_distill.sh, `-a 0 -b W` beside CE 1 (`-r 1`). RepDistiller's feat list for its CIFAR
ResNets is [stem, layer1, layer2, layer3, pooled vector]; here it is taken from the models by plain hooks.

`rows(args)` gives, per method, (ours, reference, ours / reference, relative difference of the gradients): ours is
the whole criterion run on resnet32x4 -> resnet8x4 (at --alpha 1, the references' CE weight of 1 and no KD term);
the gradient is that of our term and the transcription's with respect to the student's features (and, for cc and
vid, to the trainable modules, which start from the same weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import experiment
import KD_engine
import model_builder
from config import settings

TEACHER, STUDENT = "resnet32x4", "resnet8x4"  # scripts/run_cifar_distill.sh's pair
METHODS = ("sp", "cc", "vid", "rkd", "pkt", "nst")  # in the REFERENCE line's order
REFERENCE_WEIGHTS = {"sp": 3000.0, "cc": 0.02, "vid": 1.0, "rkd": 1.0, "pkt": 30000.0, "nst": 50.0}  # its -b
CC_FEAT_DIM = 128  # train_student.py --feat_dim
VID_INIT_PRED_VAR, VID_EPS = 5.0, 1e-5  # VIDLoss defaults

# ---------------------------------------------------------------- the references, transcribed


def ref_sp(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Similarity.similarity_loss."""
    bsz = f_s.shape[0]
    f_s, f_t = f_s.reshape(bsz, -1), f_t.reshape(bsz, -1)
    G_s = torch.nn.functional.normalize(torch.mm(f_s, torch.t(f_s)))  # noqa: N806 (the reference's names)
    G_t = torch.nn.functional.normalize(torch.mm(f_t, torch.t(f_t)))  # noqa: N806
    G_diff = G_t - G_s  # noqa: N806
    return (G_diff * G_diff).view(-1, 1).sum(0)[0] / (bsz * bsz)


def ref_cc(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Correlation.forward on the embedded features."""
    delta = torch.abs(f_s - f_t)
    return torch.mean((delta[:-1] * delta[1:]).sum(1))


class RefLinearEmbed(nn.Module):
    """models/util.py LinearEmbed."""

    def __init__(self, dim_in: int, dim_out: int = CC_FEAT_DIM) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.view(x.shape[0], -1))


class RefVIDLoss(nn.Module):
    """VIDLoss: a 1x1-conv regressor's Gaussian likelihood of the teacher's map, a softplus variance per channel."""

    def __init__(self, num_input_channels: int, num_mid_channel: int, num_target_channels: int) -> None:
        super().__init__()

        def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
            return nn.Conv2d(in_channels, out_channels, kernel_size=1, padding=0, bias=False)

        self.regressor = nn.Sequential(conv1x1(num_input_channels, num_mid_channel), nn.ReLU(),
                                       conv1x1(num_mid_channel, num_mid_channel), nn.ReLU(),
                                       conv1x1(num_mid_channel, num_target_channels))
        self.log_scale = nn.Parameter(math.log(math.exp(VID_INIT_PRED_VAR - VID_EPS) - 1.0)
                                      * torch.ones(num_target_channels))

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        s_H, t_H = input.shape[2], target.shape[2]  # noqa: N806
        if s_H > t_H:
            input = F.adaptive_avg_pool2d(input, (t_H, t_H))
        elif s_H < t_H:
            target = F.adaptive_avg_pool2d(target, (s_H, s_H))
        pred_mean = self.regressor(input)
        pred_var = (torch.log(1.0 + torch.exp(self.log_scale)) + VID_EPS).view(1, -1, 1, 1)
        neg_log_prob = 0.5 * ((pred_mean - target) ** 2 / pred_var + torch.log(pred_var))
        return torch.mean(neg_log_prob)


def ref_pdist(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """RKDLoss.pdist (not squared)."""
    e_square = e.pow(2).sum(dim=1)
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt().clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def ref_rkd(f_s: torch.Tensor, f_t: torch.Tensor, w_d: float = 25.0, w_a: float = 50.0) -> torch.Tensor:
    """RKDLoss.forward: distance and angle losses, the teacher's side without gradient."""
    student, teacher = f_s.view(f_s.shape[0], -1), f_t.view(f_t.shape[0], -1)
    with torch.no_grad():
        t_d = ref_pdist(teacher)
        t_d = t_d / t_d[t_d > 0].mean()
    d = ref_pdist(student)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    with torch.no_grad():
        norm_td = F.normalize(teacher.unsqueeze(0) - teacher.unsqueeze(1), p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    norm_sd = F.normalize(student.unsqueeze(0) - student.unsqueeze(1), p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    loss_a = F.smooth_l1_loss(s_angle, t_angle)
    return w_d * loss_d + w_a * loss_a


def ref_pkt(output_net: torch.Tensor, target_net: torch.Tensor, eps: float = 0.0000001) -> torch.Tensor:
    """PKT.cosine_similarity_loss."""
    output_net = output_net / (torch.sqrt(torch.sum(output_net ** 2, dim=1, keepdim=True)) + eps)
    output_net = torch.where(output_net != output_net, torch.zeros_like(output_net), output_net)
    target_net = target_net / (torch.sqrt(torch.sum(target_net ** 2, dim=1, keepdim=True)) + eps)
    target_net = torch.where(target_net != target_net, torch.zeros_like(target_net), target_net)
    model_similarity = (torch.mm(output_net, output_net.transpose(0, 1)) + 1.0) / 2.0
    target_similarity = (torch.mm(target_net, target_net.transpose(0, 1)) + 1.0) / 2.0
    model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
    target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)
    return torch.mean(target_similarity * torch.log((target_similarity + eps) / (model_similarity + eps)))


def ref_poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """NSTLoss.poly_kernel: every pair of channels' (a . b)^2 by broadcasting."""
    return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)


def ref_nst(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """NSTLoss.nst_loss with full_loss."""
    s_H, t_H = f_s.shape[2], f_t.shape[2]  # noqa: N806
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
    f_s = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
    f_t = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)
    return (ref_poly_kernel(f_t, f_t).mean().detach() + ref_poly_kernel(f_s, f_s).mean()
            - 2 * ref_poly_kernel(f_s, f_t).mean())


def reference_term(method: str, feat_s: list[torch.Tensor], feat_t: list[torch.Tensor],
                   modules: nn.ModuleList | None = None) -> torch.Tensor:
    """The method's term as loops.py's train_distill forms it from RepDistiller's feature lists, times its -b:
    `modules` are cc's (embed_s, embed_t) or vid's VIDLosses."""
    if method == "sp":
        term = ref_sp(feat_s[-2], feat_t[-2])
    elif method == "cc":
        term = ref_cc(modules[0](feat_s[-1]), modules[1](feat_t[-1]))
    elif method == "vid":
        term = sum(loss(f_s, f_t) for f_s, f_t, loss in zip(feat_s[1:-1], feat_t[1:-1], modules, strict=True))
    elif method == "rkd":
        term = ref_rkd(feat_s[-1], feat_t[-1])
    elif method == "pkt":
        term = ref_pkt(feat_s[-1], feat_t[-1])
    else:
        term = sum(ref_nst(f_s, f_t) for f_s, f_t in zip(feat_s[1:-1], feat_t[1:-1], strict=True))
    return REFERENCE_WEIGHTS[method] * term


def reference_modules(method: str, trainable: nn.Module | None) -> nn.ModuleList | None:
    """The reference's trainable modules for cc (embed_s, embed_t) or vid (a VIDLoss per pair), holding the
    weights our method's `trainable` starts from; None for the other methods."""
    if method == "cc":
        connectors = trainable.pairs[0]
        embeds = nn.ModuleList([RefLinearEmbed(connectors.student.in_features),
                                RefLinearEmbed(connectors.teacher.in_features)])
        embeds[0].linear.load_state_dict(connectors.student.state_dict())
        embeds[1].linear.load_state_dict(connectors.teacher.state_dict())
        return embeds
    if method == "vid":
        losses = nn.ModuleList()
        for ours in trainable.pairs:
            convs = [layer for layer in ours.regressor if isinstance(layer, nn.Conv2d)]
            losses.append(RefVIDLoss(convs[0].in_channels, convs[0].out_channels, convs[-1].out_channels))
            losses[-1].load_state_dict(ours.state_dict())
        return losses
    return None


# ---------------------------------------------------------------- the models' features, the reference's way

FEATURE_LIST = ("relu", "layer1", "layer2", "layer3", "avgpool")  # RepDistiller's CIFAR ResNet feat, in our names
OUR_FEATURES = {"sp": slice(-2, -1), "cc": slice(-1, None), "rkd": slice(-1, None), "pkt": slice(-1, None),
                "nst": slice(1, -1), "vid": slice(1, -1)}  # which of feat each method's loss takes (loops.py)


def feature_list(model: nn.Module) -> tuple[list[torch.Tensor], list]:
    """A list filled by the model's next forward with RepDistiller's feat (the pooled vector flattened), and the
    plain forward hooks that fill it."""
    kept: list[torch.Tensor] = []
    modules = dict(model.named_modules())

    def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        kept.append(output.flatten(1) if module is modules["avgpool"] else output)
    return kept, [modules[name].register_forward_hook(keep) for name in FEATURE_LIST]


def gradient_difference(ours: torch.Tensor, reference: torch.Tensor, wrt_ours: list[torch.Tensor],
                        wrt_reference: list[torch.Tensor]) -> float:
    """||grad ours - grad reference|| / ||grad reference||, over tensors paired in order."""
    g_ours = torch.autograd.grad(ours, wrt_ours, retain_graph=True, materialize_grads=True)
    g_reference = torch.autograd.grad(reference, wrt_reference, retain_graph=True, materialize_grads=True)
    difference = sum(float((a - b).pow(2).sum()) for a, b in zip(g_ours, g_reference, strict=True))
    return (difference / sum(float(b.pow(2).sum()) for b in g_reference)) ** 0.5


def agreement(ours_loss: Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor],
              reference_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], student: torch.Tensor,
              teacher: torch.Tensor) -> tuple[float, float]:
    """(ours / reference, `gradient_difference` with respect to `student`) of our loss of one layer pair and the
    transcription's on the same tensors."""
    ours, reference = ours_loss([student], [teacher]), reference_loss(student, teacher)
    return float(ours.detach()) / float(reference.detach()), gradient_difference(ours, reference, [student], [student])


def method_row(method: str, teacher: nn.Module, student: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               config: settings.Config) -> tuple[float, float, float, float]:
    """(ours, reference, ours / reference, gradient difference) of `method` on one batch; `config` at alpha 1."""
    criterion = KD_engine.make_criterion(method, teacher, student, settings.method_setup(config))
    feat_s, student_hooks = feature_list(student)
    feat_t, teacher_hooks = feature_list(teacher)
    try:
        out = criterion(student, images, labels)
    finally:
        criterion.close()
        for handle in student_hooks + teacher_hooks:
            handle.remove()
    # Its term as the criterion weighs it (loss - CE would lose the small terms' digits to the CE's rounding).
    ours_value = float(criterion.method.beta * out[criterion.method.part].detach())
    feat_s = [feature.detach().clone().requires_grad_() for feature in feat_s]
    feat_t = [feature.detach().clone() for feature in feat_t]
    modules = reference_modules(method, criterion.trainable)
    reference = reference_term(method, feat_s, feat_t, modules)
    # The gradient: our term on the very features the transcription is given.
    ours = criterion.method.beta * criterion.method.feature_loss(feat_s[OUR_FEATURES[method]],
                                                                 feat_t[OUR_FEATURES[method]])
    trained = [] if modules is None else list(criterion.trainable.parameters())
    gradient = gradient_difference(ours, reference, feat_s + trained,
                                   feat_s + ([] if modules is None else list(modules.parameters())))
    reference_value = float(reference.detach())
    return ours_value, reference_value, ours_value / reference_value, gradient


def pair_rows(methods: tuple[str, ...], teacher_arch: str, student_arch: str, image_size: int, batch_size: int,
              classes: int, seed: int) -> dict[str, tuple]:
    """Each method's `method_row` between two untrained models, one batch of random images."""
    torch.manual_seed(seed)
    teacher = model_builder.build_model(teacher_arch, classes, image_size)
    student = model_builder.build_model(student_arch, classes, image_size).train()
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, classes, (batch_size,), generator=generator)
    config = dataclasses.replace(experiment.default_config(), teacher_model=teacher_arch, student_model=student_arch,
                                 image_size=image_size, alpha=1.0)
    return {method: method_row(method, teacher, student, images, labels, config) for method in methods}


def rows(args: argparse.Namespace) -> dict[str, tuple]:
    """Each method's row on the reference's pair at initialization, 32 px (`args`: seed, batch_size, classes)."""
    return pair_rows(METHODS, TEACHER, STUDENT, 32, args.batch_size, args.classes, args.seed)
