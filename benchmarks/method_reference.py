"""The new methods' losses against transcriptions of their references' formulas (a benchmark, not a test).

    python benchmarks/method_reference.py [--seed N] [--batch-size N] [--classes N]

On the same tensors, each method's distillation term is computed twice: by this project's criterion
(KD_engine.make_criterion with the project's defaults, experiment.default_config()) and by a
transcription, written out below and sharing no code with KD_engine or KD_features, of its
reference's formula and CIFAR weights. Both are taken beside a CE weight of 1 (ours: (loss -
ALPHA * CE) / ALPHA; the reference's: its distillation term over its own CE weight), after the
warm-ups. The gradients of the two terms with respect to the student's logits (for ReviewKD: its
feature maps, through the ABFs, which start from the same weights) are compared too.

- dist: hunto/image_classification_sota lib/models/losses/dist_kd.py `DIST` (DIST_KD's loss), with
  configs/strategies/distill/dist_cifar.yaml: CE 1, DIST 2, tau 4, beta = gamma = 1.
- kd_ls, dkd_ls: sunshangquan/logit-standardization-KD mdistiller/distillers/KD.py and DKD.py
  (`normalize`, `kd_loss`, `dkd_loss`) with tools/train.py's --logit-stand --base-temp 2 --kd-weight 9:
  KD with CE 0.1 and KD 9; DKD with CE 1, alpha 1 x 9, beta 8 x 9 (the resnet32x4 -> resnet8x4 config).
- dist_ls: DIST_KD's DIST on the z-scores of the logit-standardization reference at its base
  temperature 2, weighed by the rule that reference applies to DKD (x 9): no published setting.
- reviewkd: megvii-research/mdistiller mdistiller/distillers/ReviewKD.py (`ABF`, `hcl_loss`,
  `forward_train`), configs/cifar100/reviewkd.yaml (CE 1, ReviewKD 5), for its pair resnet32x4 ->
  resnet8x4 at initialization: the student's stage outputs and pooled feature, the teacher's maps
  before the last ReLU of each stage (written out here from the last block's input) and its pooled
  feature. Our value comes from the whole criterion run on the two models (at --alpha 1, the
  references' loss); the gradient from our ABFs and HCL on the features the transcription uses.
- reviewkd_wrn: the same on wrn_40_2 -> wrn_40_1, the teacher's maps as mdistiller's models/cifar/wrn.py
  `preact_feats` takes them: each block's output through the next block's bn1, the last through the final bn1
  (dvlab ReviewKD's wide_resnet_cifar.py the same); weight 5 (dvlab's CIFAR-100/script/reviewKD.sh); the
  teacher's BNs given random statistics, as a trained teacher's (a fresh BN is nearly the identity).

- crd: RepDistiller crd/ (criterion.py, memory.py) at -a 0 -b 0.8, two steps through the memory bank: see
  benchmarks/reference_crd.py (its gradient column also holds the banks' largest difference).
- sp, cc, vid, rkd, pkt, nst: RepDistiller's distiller_zoo, transcribed in benchmarks/reference_relations.py.
- ab, ft (and ft_init, its paraphraser's stage), fsp: benchmarks/reference_connectors.py.

The last line is `REFERENCE dist=<r> kd_ls=<r> dkd_ls=<r> dist_ls=<r> reviewkd=<r> reviewkd_wrn=<r> sp=<r> ... crd=<r>
ab=<r> ft=<r> ft_init=<r> fsp=<r>`, r being ours / reference for the term's value (target: within 1e-4 of 1, the
gradients as close).
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

import reference_connectors  # noqa: E402  (ab, ft, fsp: benchmarks/reference_connectors.py)

import experiment  # noqa: E402
import KD_engine  # noqa: E402
import model_builder  # noqa: E402
from benchmarks import reference_crd, reference_relations  # noqa: E402
from config import settings  # noqa: E402
from methods import reviewkd  # noqa: E402

TARGET = 1e-4
TEACHER, STUDENT = "resnet32x4", "resnet8x4"  # the references' CIFAR pair for ReviewKD and the LS DKD config
WRN_PAIR = ("wrn_40_2", "wrn_40_1")  # ReviewKD with a pre-activation teacher (dvlab's reviewKD.sh, weight 5)

# ---------------------------------------------------------------- the references, transcribed

DIST_CE, DIST_KD_WEIGHT, DIST_TAU = 1.0, 2.0, 4.0  # dist_cifar.yaml: ori_loss_weight, kd_loss_weight, kd dist_t4
LS_BASE_TEMP, LS_KD_WEIGHT = 2.0, 9.0  # logit-standardization-KD tools/train.py defaults
LS_KD_CE = 0.1  # its cfg.KD.LOSS.CE_WEIGHT
DKD_CE, DKD_ALPHA, DKD_BETA = 1.0, 1.0, 8.0  # its cfg.DKD (resnet32x4 -> resnet8x4 keeps BETA 8)
REVIEW_CE, REVIEW_WEIGHT, REVIEW_MID_MAX = 1.0, 5.0, 512  # mdistiller reviewkd.yaml, cfg.REVIEWKD


def ref_normalize(logit: torch.Tensor) -> torch.Tensor:
    """The LS reference's normalize(): z-score with the unbiased std and 1e-7 in the denominator."""
    return (logit - logit.mean(dim=-1, keepdim=True)) / (1e-7 + logit.std(dim=-1, keepdim=True))


def ref_relation(y_s: torch.Tensor, y_t: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DIST's inter_class_relation: 1 - the mean of the rows' cosine similarity after centering."""
    a, b = y_s - y_s.mean(1).unsqueeze(1), y_t - y_t.mean(1).unsqueeze(1)
    return 1 - ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).mean()


def ref_dist(z_s: torch.Tensor, z_t: torch.Tensor, tau: float) -> torch.Tensor:
    """DIST(beta=1, gamma=1, tau).forward: tau^2 * inter + tau^2 * intra of the softened probabilities."""
    y_s, y_t = (z_s / tau).softmax(dim=1), (z_t / tau).softmax(dim=1)
    return tau**2 * ref_relation(y_s, y_t) + tau**2 * ref_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))


def ref_kd(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """The LS reference's kd_loss with logit_stand: KL(p_t || p_s) summed over classes, batch mean, x T^2."""
    z_s, z_t = ref_normalize(z_s), ref_normalize(z_t)
    kl = F.kl_div(F.log_softmax(z_s / temperature, dim=1), F.softmax(z_t / temperature, dim=1), reduction="none")
    return kl.sum(1).mean() * temperature**2


def ref_dkd(z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor, alpha: float, beta: float,
            temperature: float) -> torch.Tensor:
    """The LS reference's dkd_loss with logit_stand: masked target / others probabilities, the -1000 trick."""
    z_s, z_t = ref_normalize(z_s), ref_normalize(z_t)
    gt = torch.zeros_like(z_s).scatter_(1, target.unsqueeze(1), 1).bool()
    other = torch.ones_like(z_s).scatter_(1, target.unsqueeze(1), 0).bool()

    def binary(p: torch.Tensor) -> torch.Tensor:
        return torch.cat([(p * gt).sum(1, keepdim=True), (p * other).sum(1, keepdim=True)], dim=1)

    p_s, p_t = binary(F.softmax(z_s / temperature, dim=1)), binary(F.softmax(z_t / temperature, dim=1))
    tckd = F.kl_div(torch.log(p_s), p_t, reduction="sum") * temperature**2 / target.shape[0]
    p_t2 = F.softmax(z_t / temperature - 1000.0 * gt, dim=1)
    log_p_s2 = F.log_softmax(z_s / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_p_s2, p_t2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def reference_logit_terms(z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each logit method's distillation term over its reference's CE weight."""
    return {
        "dist": DIST_KD_WEIGHT * ref_dist(z_s, z_t, DIST_TAU) / DIST_CE,
        "kd_ls": LS_KD_WEIGHT * ref_kd(z_s, z_t, LS_BASE_TEMP) / LS_KD_CE,
        "dkd_ls": ref_dkd(z_s, z_t, target, DKD_ALPHA * LS_KD_WEIGHT, DKD_BETA * LS_KD_WEIGHT, LS_BASE_TEMP) / DKD_CE,
        "dist_ls": LS_KD_WEIGHT * DIST_KD_WEIGHT * ref_dist(ref_normalize(z_s), ref_normalize(z_t), LS_BASE_TEMP)
        / DIST_CE,
    }


class RefABF(nn.Module):
    """mdistiller's ABF: conv1 (1x1 + BN), the attention fusion with the upsampled residual, conv2 (3x3 + BN)."""

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, 1, bias=False), nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channel, out_channel, 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(out_channel))
        self.att_conv = nn.Sequential(nn.Conv2d(mid_channel * 2, 2, 1), nn.Sigmoid()) if fuse else None

    def forward(self, x, y=None, shape=None, out_shape=None):
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (shape, shape), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        return self.conv2(x), x


def ref_hcl(fstudent: list[torch.Tensor], fteacher: list[torch.Tensor]) -> torch.Tensor:
    """mdistiller's hcl_loss."""
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher, strict=True):
        h = fs.shape[2]
        loss, cnt, tot = F.mse_loss(fs, ft), 1.0, 1.0
        for level in (4, 2, 1):
            if level >= h:
                continue
            cnt /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, (level, level)),
                                     F.adaptive_avg_pool2d(ft, (level, level))) * cnt
            tot += cnt
        loss_all = loss_all + loss / tot
    return loss_all


def ref_review_term(abfs: nn.ModuleList, student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]):
    """mdistiller's ReviewKD.forward_train after the warm-up: REVIEWKD_WEIGHT * hcl over the CE weight.
    `abfs` deepest first (mdistiller's reversed list); features shallowest first, the pooled one last."""
    shapes = [f.shape[-1] for f in student_feats][::-1]
    out_shapes = [f.shape[-1] for f in teacher_feats][::-1]
    x = student_feats[::-1]
    out, res = abfs[0](x[0], out_shape=out_shapes[0])
    results = [out]
    for feature, abf, shape, out_shape in zip(x[1:], abfs[1:], shapes[1:], out_shapes[1:], strict=True):
        out, res = abf(feature, res, shape, out_shape)
        results.insert(0, out)
    return REVIEW_WEIGHT * ref_hcl(results, teacher_feats) / REVIEW_CE


def reference_abfs(ours: nn.Module) -> nn.ModuleList:
    """The reference's ABFs (deepest first) with our ABFs' weights, by the reference's parameter names."""
    names = {"reduce": "conv1", "output": "conv2", "attention": "att_conv"}
    abfs = []
    for abf in reversed(list(ours.abfs)):
        width = abf.reduce[0].out_channels
        ref = RefABF(abf.reduce[0].in_channels, width, abf.output[0].out_channels, abf.attention is not None)
        state = {names[key.split(".")[0]] + key[key.index("."):]: value
                 for key, value in abf.state_dict().items()}
        ref.load_state_dict(state)
        abfs.append(ref)
    return nn.ModuleList(abfs)


# ---------------------------------------------------------------- the models' features, the reference's way


def captured(model: nn.Module, names: list[str], inputs: bool = False) -> tuple[dict, list]:
    """Plain forward hooks keeping each named module's output (or its input, copied) of the next forward."""
    kept: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    if inputs:
        handles = [modules[n].register_forward_pre_hook(lambda m, i, n=n: kept.__setitem__(n, i[0].clone()))
                   for n in names]
    else:
        handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: kept.__setitem__(n, o)) for n in names]
    return kept, handles


def ref_preact(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mdistiller's BasicBlock preact: bn2(conv2(relu(bn1(conv1(x))))) + residual, before its last ReLU."""
    out = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
    return out + (x if block.downsample is None else block.downsample(x))


# ---------------------------------------------------------------- ours against the reference


def compare(ours: torch.Tensor, reference: torch.Tensor, wrt: torch.Tensor | list[torch.Tensor]) -> tuple:
    """(ours, reference, ours / reference, relative difference of their gradients w.r.t. `wrt`)."""
    wrt = wrt if isinstance(wrt, list) else [wrt]
    g_ours = torch.autograd.grad(ours, wrt, retain_graph=True)
    g_ref = torch.autograd.grad(reference, wrt, retain_graph=True)
    difference = sum(float((a - b).pow(2).sum()) for a, b in zip(g_ours, g_ref, strict=True)) ** 0.5
    size = sum(float(b.pow(2).sum()) for b in g_ref) ** 0.5
    ours, reference = float(ours.detach()), float(reference.detach())
    return ours, reference, ours / reference, difference / size


def logit_rows(args: argparse.Namespace) -> dict[str, tuple]:
    """The logit methods on logits spread like a trained teacher's and a young student's."""
    generator = torch.Generator().manual_seed(args.seed)
    target = torch.randint(0, args.classes, (args.batch_size,), generator=generator)
    z_t = 3 * torch.randn(args.batch_size, args.classes, generator=generator) + 8 * F.one_hot(target, args.classes)
    z_s = torch.randn(args.batch_size, args.classes, generator=generator).requires_grad_()
    reference = reference_logit_terms(z_s, z_t, target)
    # The project's defaults for the LS reference's DKD pair (its dkd_beta: 8).
    pair = dataclasses.replace(experiment.default_config(), teacher_model=TEACHER, student_model=STUDENT)
    setup, alpha = settings.method_setup(pair), pair.alpha
    rows = {}
    for method in reference:
        criterion = KD_engine.make_criterion(method, nn.Identity(), nn.Identity(), setup)
        out = criterion(nn.Identity(), z_s, target, z_t)
        ours = (out["loss"] - alpha * out["ce"]) / alpha
        rows[method] = compare(ours, reference[method], z_s)
    return rows


def review_comparison(
    args: argparse.Namespace, pair: tuple[str, str], stages: list[str],
    teacher_maps: Callable[[nn.Module], tuple[list[str], bool]],
    preacts: Callable[[nn.Module, dict], list[torch.Tensor]], trained_statistics: bool = False,
) -> tuple:
    """ReviewKD on a pair at initialization: our criterion's value (at --alpha 1, the references' loss), the
    transcription's on the student's `stages` and pooled feature and the teacher's `preacts` (computed from the
    teacher's modules `teacher_maps` names: their inputs where its flag says so, else their outputs), and the
    gradients' difference (our ABFs and HCL on the very features the transcription is given). With
    `trained_statistics`, the teacher's BNs get random statistics and affine weights, as a trained teacher's (a
    fresh BN is nearly the identity, which would hide whether a map is taken before or after it)."""
    torch.manual_seed(args.seed)
    teacher = model_builder.build_model(pair[0], args.classes, 32)
    if trained_statistics:
        with torch.no_grad():
            for bn in (module for module in teacher.modules() if isinstance(module, nn.BatchNorm2d)):
                bn.running_mean.normal_(0, 0.5)
                bn.running_var.uniform_(0.25, 4)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.2)
    student = model_builder.build_model(pair[1], args.classes, 32).train()
    config = dataclasses.replace(experiment.default_config(), teacher_model=pair[0], student_model=pair[1], alpha=1.0)
    criterion = KD_engine.make_criterion("reviewkd", teacher, student, settings.method_setup(config))
    student_kept, student_handles = captured(student, [*stages, "avgpool"])
    teacher_kept, teacher_handles = captured(teacher, *teacher_maps(teacher))
    pooled, pooled_handles = captured(teacher, ["avgpool"])
    images = torch.randn(args.batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    labels = torch.randint(0, args.classes, (args.batch_size,), generator=torch.Generator().manual_seed(args.seed))
    out = criterion(student, images, labels)
    for handle in student_handles + teacher_handles + pooled_handles:
        handle.remove()
    with torch.no_grad():
        teacher_feats = [*preacts(teacher, teacher_kept), pooled["avgpool"].clone()]
    student_feats = [student_kept[name].detach().clone().requires_grad_() for name in [*stages, "avgpool"]]
    reference = ref_review_term(reference_abfs(criterion.trainable), student_feats, teacher_feats)
    ours_value = float(out["loss"].detach() - out["ce"].detach())  # alpha 1: CE + beta * HCL, beta = 5 x 1
    ours = criterion.method.beta * reviewkd.hcl_loss(criterion.trainable(student_feats), teacher_feats)
    gradient = compare(ours, reference, student_feats)[3]
    criterion.close()
    return ours_value, reference.item(), ours_value / reference.item(), gradient


def reviewkd_row(args: argparse.Namespace) -> tuple:
    """ReviewKD on the reference's pair: each ResNet stage's last block before its ReLU (`ref_preact`)."""
    stages = ["layer1", "layer2", "layer3"]

    def last_blocks(teacher: nn.Module) -> tuple[list[str], bool]:
        return [f"{stage}.{len(getattr(teacher, stage)) - 1}" for stage in stages], True

    def preacts(teacher: nn.Module, inputs: dict) -> list[torch.Tensor]:
        return [ref_preact(getattr(teacher, stage)[-1], inputs[name])
                for stage, name in zip(stages, last_blocks(teacher)[0], strict=True)]

    return review_comparison(args, (TEACHER, STUDENT), stages, last_blocks, preacts)


def reviewkd_wrn_row(args: argparse.Namespace) -> tuple:
    """ReviewKD on wrn_40_2 -> wrn_40_1 (dvlab's reviewKD.sh: weight 5): each block's output through the next
    block's first BN, the last through the final BN (mdistiller models/cifar/wrn.py `preact_feats`), the
    teacher's BNs with a trained teacher's kind of statistics."""
    stages = ["block1", "block2", "block3"]

    def preacts(teacher: nn.Module, outputs: dict) -> list[torch.Tensor]:
        bns = [teacher.block2[0].bn1, teacher.block3[0].bn1, teacher.bn1]
        return [bn(outputs[stage]) for bn, stage in zip(bns, stages, strict=True)]

    return review_comparison(args, WRN_PAIR, stages, lambda teacher: (stages, False), preacts,
                             trained_statistics=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="samples (the references' CIFAR batch)")
    parser.add_argument("--classes", type=int, default=100, help="classes (the references' CIFAR-100)")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    rows = {**logit_rows(args), "reviewkd": reviewkd_row(args), "reviewkd_wrn": reviewkd_wrn_row(args),
            **reference_relations.rows(args), **reference_crd.rows(args), **reference_connectors.rows(args)}
    print(f"Batch {args.batch_size}, {args.classes} classes, seed {args.seed}, fp32 on the CPU. Each term beside a "
          f"CE weight of 1; ours at the project's defaults (ALPHA={experiment.ALPHA}).\n")
    header = f"{'method':<14}{'ours':>14}{'reference':>14}{'ours / reference':>20}{'gradient rel. diff':>22}"
    print(header + "\n" + "-" * len(header))
    for method, (ours, reference, ratio, gradient) in rows.items():
        print(f"{method:<14}{ours:>14.6f}{reference:>14.6f}{ratio:>20.7f}{gradient:>22.2e}")
    print()
    for method, (_, _, ratio, gradient) in rows.items():
        verdict = "within" if abs(ratio - 1) <= TARGET and gradient <= TARGET else "OUTSIDE"
        print(f"{method}: |ratio - 1| = {abs(ratio - 1):.1e}, gradient {gradient:.1e} ({verdict} the {TARGET:g} "
              "target)")
    print("REFERENCE " + " ".join(f"{method}={ratio:.6f}" for method, (_, _, ratio, _) in rows.items()))


if __name__ == "__main__":
    main()
