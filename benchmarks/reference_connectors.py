"""AB, FT and FSP against transcriptions of RepDistiller's code, for benchmarks/method_reference.py.

    python benchmarks/reference_connectors.py [--seed N] [--batch-size N] [--classes N]

On the references' pair resnet32x4 -> resnet8x4 at initialization (32 px, random images), each loss is
computed by this project's method (KD_engine.make_criterion at the project's defaults, alpha 1) and by a
transcription, written out below and sharing no code with methods/, of HobbitLong/RepDistiller:

- ab: the initialization stage's loss, distiller_zoo/AB.py `ABLoss` (margin 1) summed as helper/pretrain.py
  sums it, on models/util.py `Connector` (ConvReg without its ReLU, our connectors' weights copied) of the
  student's stage maps before their last ReLU (resnet.py's preact=True), against the teacher's.
- ft: the second stage's term, 200 x distiller_zoo/FT.py `FactorTransfer` (p1 2, p2 1) of models/util.py's
  `Translator` of the student's last stage map and `Paraphraser(is_factor=True)` of the teacher's (weights
  copied); ft_init: the stage's MSE between the paraphraser's reconstruction of the teacher's map and the map.
- fsp: the initialization stage's loss, distiller_zoo/FSP.py summed as helper/pretrain.py sums it, on the
  stem's and the stages' outputs (feat[:-1]) of both models.

Each row: (ours, reference, ours / reference, relative difference of the gradients): for ab, ft and fsp with
respect to the student's feature layers, for ft_init to the paraphraser's weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import experiment  # noqa: E402
import KD_engine  # noqa: E402
import model_builder  # noqa: E402
from config import settings  # noqa: E402
from methods import base  # noqa: E402

TEACHER, STUDENT = "resnet32x4", "resnet8x4"  # RepDistiller scripts/run_cifar_distill.sh's pair
FT_WEIGHT = 200.0  # run_cifar_distill.sh: --distill factor -a 0 -b 200
STAGES = ("layer1", "layer2", "layer3")

# ---------------------------------------------------------------- RepDistiller, transcribed


def ref_ab(g_s: list[torch.Tensor], g_t: list[torch.Tensor], margin: float = 1.0) -> torch.Tensor:
    """ABLoss(feat_num).forward, then sum(loss_group) as in helper/pretrain.py."""
    feat_num, bsz = len(g_s), g_s[0].shape[0]
    w = [2 ** (i - feat_num + 1) for i in range(feat_num)]
    losses = []
    for source, target in zip(g_s, g_t, strict=True):
        loss = ((source + margin) ** 2 * ((source > -margin) & (target <= 0)).float()
                + (source - margin) ** 2 * ((source <= margin) & (target > 0)).float())
        losses.append(torch.abs(loss).sum())
    losses = [wi * li / bsz / 1000 * 3 for wi, li in zip(w, losses, strict=True)]
    return sum(losses)


def ref_conv_reg(s_shape: torch.Size, t_shape: torch.Size, use_relu: bool = True) -> nn.Module:
    """ConvReg (also benchmarks/method_strength.py's FitNets regressor): the convolution chosen by the heights, then
    BN, then a ReLU when `use_relu`."""
    s_C, s_H, s_W = s_shape[1:]
    t_C, t_H, t_W = t_shape[1:]
    if s_H == 2 * t_H:
        conv = nn.Conv2d(s_C, t_C, kernel_size=3, stride=2, padding=1)
    elif s_H * 2 == t_H:
        conv = nn.ConvTranspose2d(s_C, t_C, kernel_size=4, stride=2, padding=1)
    elif s_H >= t_H:
        conv = nn.Conv2d(s_C, t_C, kernel_size=(1 + s_H - t_H, 1 + s_W - t_W))
    else:
        raise ValueError(f"the reference has no regressor for student {s_H} px, teacher {t_H} px")
    return nn.Sequential(conv, nn.BatchNorm2d(t_C), *([nn.ReLU()] if use_relu else []))


def ref_connector(s_shapes: list[torch.Size], t_shapes: list[torch.Size]) -> nn.ModuleList:
    """Connector: nothing where channels and height agree, else ConvReg without ReLU."""
    return nn.ModuleList(nn.Sequential() if s[1] == t[1] and s[2] == t[2] else ref_conv_reg(s, t, use_relu=False)
                         for s, t in zip(s_shapes, t_shapes, strict=True))


def ref_factor_transfer(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """FactorTransfer(p1=2, p2=1).factor_loss."""
    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))

    def factor(f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))

    return (factor(f_s) - factor(f_t)).abs().mean()


def ref_encoder(in_channel: int, out_channel: int, use_bn: bool, transposed: bool = False) -> nn.Sequential:
    """The Paraphraser's / Translator's three 3x3 layers (BN slots as in models/util.py, filled when use_bn)."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    channels = [(out_channel, out_channel), (out_channel, in_channel), (in_channel, in_channel)] if transposed else \
        [(in_channel, in_channel), (in_channel, out_channel), (out_channel, out_channel)]
    layers = []
    for first, second in channels:
        layers += [conv(first, second, 3, 1, 1), nn.BatchNorm2d(second) if use_bn else nn.Sequential(),
                   nn.LeakyReLU(0.1, inplace=True)]
    return nn.Sequential(*layers)


def ref_fsp(g_s: list[torch.Tensor], g_t: list[torch.Tensor]) -> torch.Tensor:
    """FSP.forward, then sum(loss_group) as in helper/pretrain.py."""
    def compute_fsp(g: list[torch.Tensor]) -> list[torch.Tensor]:
        fsp_list = []
        for i in range(len(g) - 1):
            bot, top = g[i], g[i + 1]
            b_H, t_H = bot.shape[2], top.shape[2]
            if b_H > t_H:
                bot = F.adaptive_avg_pool2d(bot, (t_H, t_H))
            elif b_H < t_H:
                top = F.adaptive_avg_pool2d(top, (b_H, b_H))
            bot = bot.unsqueeze(1).flatten(3)
            top = top.unsqueeze(2).flatten(3)
            fsp_list.append((bot * top).mean(-1))
        return fsp_list

    return sum((s - t).pow(2).mean() for s, t in zip(compute_fsp(g_s), compute_fsp(g_t), strict=True))


def ref_features(model: nn.Module, x: torch.Tensor, preact: bool = False) -> list[torch.Tensor]:
    """RepDistiller resnet.py's feat[:-1] (f0 .. f3), each stage's before its last ReLU when `preact`."""
    x = F.relu(model.bn1(model.conv1(x)))
    feats = [x]
    for stage in STAGES:
        blocks = getattr(model, stage)
        x = blocks[:-1](x)
        block = blocks[-1]
        out = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
        out = out + (x if block.downsample is None else block.downsample(x))
        x = F.relu(out)
        feats.append(out if preact else x)
    return feats


# ---------------------------------------------------------------- ours against the reference


def compare(ours: torch.Tensor, reference: torch.Tensor, wrt: list[torch.Tensor],
            reference_wrt: list[torch.Tensor] | None = None) -> tuple:
    """(ours, reference, ours / reference, relative difference of the gradients, ours w.r.t. `wrt` and the
    reference's w.r.t. `reference_wrt`, the same tensors unless given)."""
    g_ours = torch.autograd.grad(ours, wrt, retain_graph=True)
    g_ref = torch.autograd.grad(reference, reference_wrt or wrt, retain_graph=True)
    difference = sum(float((a - b).pow(2).sum()) for a, b in zip(g_ours, g_ref, strict=True)) ** 0.5
    size = sum(float(b.pow(2).sum()) for b in g_ref) ** 0.5
    ours, reference = float(ours.detach()), float(reference.detach())
    return ours, reference, ours / reference, difference / size


def criterion_on_pair(method: str, args: argparse.Namespace) -> tuple[nn.Module, nn.Module, KD_engine.DistillationStep]:
    """The references' pair at initialization (seeded) and our criterion for `method` at alpha 1."""
    torch.manual_seed(args.seed)
    teacher = model_builder.build_model(TEACHER, args.classes, 32)
    student = model_builder.build_model(STUDENT, args.classes, 32).train()
    config = dataclasses.replace(experiment.default_config(), teacher_model=TEACHER, student_model=STUDENT, alpha=1.0)
    return teacher, student, KD_engine.make_criterion(method, teacher, student, settings.method_setup(config))


def copy_in_order(reference: nn.Module, ours: nn.Module) -> None:
    """Our module's parameters and buffers into the transcription's, in order (their layers are numbered
    differently: the references keep empty BN slots)."""
    theirs, mine = reference.state_dict().values(), ours.state_dict().values()
    with torch.no_grad():
        for target, source in zip(theirs, mine, strict=True):
            target.copy_(source)


def features_of(student: nn.Module) -> list[nn.Parameter]:
    """The student's parameters but its classifier's (RepDistiller's get_feat_modules)."""
    return [parameter for name, parameter in student.named_parameters() if not name.startswith("fc.")]


def batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded images and labels."""
    generator = torch.Generator().manual_seed(args.seed)
    return (torch.randn(args.batch_size, 3, 32, 32, generator=generator),
            torch.randint(0, args.classes, (args.batch_size,), generator=generator))


def init_stage_loss(method: base.Method, teacher: nn.Module, student: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Our `method`'s initialization-stage loss on `images`, its stage closed (hooks off) before the reference runs."""
    stage = method.init_stage(teacher, student)
    loss = stage.loss(images)
    stage.close()
    return loss


def stage_row(method: str, args: argparse.Namespace,
              reference_of: Callable[[nn.Module, nn.Module, torch.Tensor, base.Method], torch.Tensor]) -> tuple:
    """`method`'s initialization-stage loss against `reference_of(teacher, student, images, our method)`, the
    gradients with respect to the student's feature layers."""
    teacher, student, criterion = criterion_on_pair(method, args)
    images, _ = batch(args)
    ours = init_stage_loss(criterion.method, teacher, student, images)
    reference = reference_of(teacher, student, images, criterion.method)
    criterion.close()
    return compare(ours, reference, features_of(student))


def ab_reference(teacher: nn.Module, student: nn.Module, images: torch.Tensor, method: base.Method) -> torch.Tensor:
    """AB's initialization-stage loss, through reference connectors holding our connectors' weights."""
    with torch.no_grad():
        g_t = ref_features(teacher, images, preact=True)[1:]
    g_s = ref_features(student, images, preact=True)[1:]
    connector = ref_connector([f.shape for f in g_s], [f.shape for f in g_t])
    copy_in_order(connector, method.stage_modules)
    return ref_ab([module(f) for module, f in zip(connector, g_s, strict=True)], g_t)


def ft_rows(args: argparse.Namespace) -> dict[str, tuple]:
    """FT's second-stage term and its paraphraser's reconstruction loss."""
    teacher, student, criterion = criterion_on_pair("ft", args)
    method = criterion.method
    images, labels = batch(args)
    out = criterion(student, images, labels)
    ours = out["loss"] - out["ce"]  # alpha 1: CE + 200 x FT
    with torch.no_grad():
        f_t = ref_features(teacher, images)[-1]
    f_s = ref_features(student, images)[-1]
    paraphraser = nn.ModuleDict({"encoder": ref_encoder(f_t.shape[1], f_t.shape[1] // 2, use_bn=False),
                                 "decoder": ref_encoder(f_t.shape[1], f_t.shape[1] // 2, False, transposed=True)})
    copy_in_order(paraphraser, method.paraphraser)
    translator = ref_encoder(f_s.shape[1], f_t.shape[1] // 2, use_bn=True)
    copy_in_order(translator, method.trainable)
    reference = FT_WEIGHT * ref_factor_transfer(translator(f_s), paraphraser["encoder"](f_t))
    rows = {"ft": compare(ours, reference, features_of(student))}
    ours_init = init_stage_loss(method, teacher, student, images)
    reference_init = nn.MSELoss()(paraphraser["decoder"](paraphraser["encoder"](f_t)), f_t)
    rows["ft_init"] = compare(ours_init, reference_init, list(method.paraphraser.parameters()),
                              list(paraphraser.parameters()))
    criterion.close()
    return rows


def fsp_reference(teacher: nn.Module, student: nn.Module, images: torch.Tensor, method: base.Method) -> torch.Tensor:
    """FSP's initialization-stage loss (`method`, ours, has no part in it)."""
    with torch.no_grad():
        g_t = ref_features(teacher, images)
    return ref_fsp(ref_features(student, images), g_t)


def rows(args: argparse.Namespace) -> dict[str, tuple]:
    """ab, ft, ft_init and fsp, each (ours, reference, ours / reference, gradient's relative difference)."""
    torch.set_grad_enabled(True)
    return {"ab": stage_row("ab", args, ab_reference), **ft_rows(args), "fsp": stage_row("fsp", args, fsp_reference)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    for method, (ours, reference, ratio, gradient) in rows(parser.parse_args()).items():
        print(f"{method:<8}{ours:>14.6f}{reference:>14.6f}{ratio:>12.7f}{gradient:>12.2e}")


if __name__ == "__main__":
    main()
