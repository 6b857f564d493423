"""How hard the feature methods pull on the student, next to the CE term (a benchmark, not a test).

    python benchmarks/method_strength.py [--teacher-checkpoint PATH] [--teacher-epochs N] [--batch-size N]

For the default pair (VGG16 -> ResNet18 at 32 px), on one real batch of the bundled digits, with a
teacher trained briefly on them (or loaded from --teacher-checkpoint) and the student at its
initialization, it prints the ratio of gradient norms over the student's parameters,
feature term / CE term:

- ours: KD_engine's `fitnet`, `at` and `reviewkd` criteria with the project's defaults (experiment.ALPHA,
  BETA and FEATURE_LAYERS), the CE term being ALPHA * CE and the feature term BETA * feature (ReviewKD
  after its warm-up);
- reference: the same ratio from a transcription, written out below and sharing no code with
  KD_engine, of the reference implementations' formulas and weights (RepDistiller's
  distiller_zoo/FitNet.py, AT.py, models/util.py ConvReg and run scripts; mdistiller's FitNet.py,
  AT.py and CIFAR-100 configs): CE weight 1; FitNets hint weight 100, MSE between a conv + BN + ReLU
  regressor (ConvReg, transcribed in reference_connectors.py) of the student's feature at hint_layer 2 and
  the teacher's; AT weight 1000, p = 2,
  L2-normalized maps, squared differences averaged over samples and positions, summed over the
  stage outputs; ReviewKD weight 5 (mdistiller's configs/cifar100/reviewkd.yaml), its ABFs and HCL
  loss (transcribed in method_reference.py, the ABFs starting from our ABFs' weights) from the
  student's stage outputs after the stem and its pooled feature to the teacher's maps before their
  last ReLU (mdistiller's preact_feats: the BN outputs before VGG's stage ReLUs) and pooled feature.

Target: each of ours within 0.5x-2x of its reference. The last line is
`STRENGTH fitnet=<x> at=<y> reviewkd=<z> reference_fitnet=<x0> reference_at=<y0> reference_reviewkd=<z0>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from method_reference import REVIEW_WEIGHT, ref_review_term, reference_abfs
from reference_connectors import ref_conv_reg
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data_setup  # noqa: E402
import engine  # noqa: E402
import experiment  # noqa: E402
import KD_engine  # noqa: E402
import model_builder  # noqa: E402
from config import settings  # noqa: E402
from core import compute  # noqa: E402
from training import checkpoints  # noqa: E402

TEACHER, STUDENT, IMAGE_SIZE = "vgg16_bn", "resnet18", 32
TARGET = (0.5, 2.0)  # ours / reference

# ---------------------------------------------------------------- the references, transcribed

REFERENCE_CE_WEIGHT = 1.0
REFERENCE_HINT_WEIGHT = 100.0  # RepDistiller run_cifar_distill.sh "-b 100"; mdistiller FITNET.LOSS.FEAT_WEIGHT
REFERENCE_AT_WEIGHT = 1000.0  # RepDistiller "-b 1000"; mdistiller AT.LOSS.FEAT_WEIGHT
REFERENCE_WEIGHTS = {"fitnet": REFERENCE_HINT_WEIGHT, "at": REFERENCE_AT_WEIGHT, "reviewkd": REVIEW_WEIGHT}
REFERENCE_HINT_LAYER = 2
# The references' feature lists (forward(is_feat=True), without the pooled vector): the stem's output,
# then every block's output after its ReLU, here named as the layers of this project's two models.
REFERENCE_FEATURES = {
    "vgg16_bn": ["features.5", "features.12", "features.22", "features.32", "features.42"],
    "resnet18": ["relu", "layer1", "layer2", "layer3", "layer4"],
}
# ReviewKD's levels: the teacher's preact_feats[1:] (for VGG the BN outputs before the stage ReLUs) and the
# student's feats[1:], each with its pooled feature last.
REVIEW_TEACHER = ["features.11", "features.21", "features.31", "features.41", "avgpool"]
REVIEW_STUDENT = ["layer1", "layer2", "layer3", "layer4", "avgpool"]


def reference_attention(feature: torch.Tensor) -> torch.Tensor:
    return F.normalize(feature.pow(2).mean(1).view(feature.size(0), -1))


def reference_at_pair(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return (reference_attention(f_s) - reference_attention(f_t)).pow(2).mean()


def reference_layers(method: str) -> str:
    """The layer pairs (teacher:student) the reference distills for `method`, as text."""
    if method == "reviewkd":
        return ",".join(f"{t}:{s}" for t, s in zip(REVIEW_TEACHER, REVIEW_STUDENT, strict=True))
    teacher, student = REFERENCE_FEATURES[TEACHER], REFERENCE_FEATURES[STUDENT]
    pairs = [REFERENCE_HINT_LAYER] if method == "fitnet" else range(1, min(len(teacher), len(student)))
    return ",".join(f"{teacher[i]}:{student[i]}" for i in pairs)


def hooked_forward(model: nn.Module, names: list[str],
                   images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and the named layers' outputs of one forward pass, through plain forward hooks (copied:
    an in-place ReLU after a BN would change the BN's output)."""
    outputs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o.clone()))
               for name in names]
    try:
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return logits, [outputs[name] for name in names]


def reference_terms(teacher: nn.Module, student: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    seed: int, review_abfs: nn.ModuleList | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per method, (weighted CE term, weighted feature term) as the references compute them; ReviewKD's
    only with its ABFs (the reference's modules, deepest first)."""
    with torch.no_grad():
        _, feat_t = hooked_forward(teacher, REFERENCE_FEATURES[TEACHER] + REVIEW_TEACHER, images)
    logits, feat_s = hooked_forward(student, REFERENCE_FEATURES[STUDENT] + REVIEW_STUDENT, images)
    (feat_t, review_t), (feat_s, review_s) = ((f[:5], f[5:]) for f in (feat_t, feat_s))
    torch.manual_seed(seed)
    regressor = ref_conv_reg(feat_s[REFERENCE_HINT_LAYER].shape, feat_t[REFERENCE_HINT_LAYER].shape)
    hint = F.mse_loss(regressor(feat_s[REFERENCE_HINT_LAYER]), feat_t[REFERENCE_HINT_LAYER])
    attention = sum(reference_at_pair(f_s, f_t) for f_s, f_t in zip(feat_s[1:], feat_t[1:], strict=False))
    ce = REFERENCE_CE_WEIGHT * F.cross_entropy(logits, labels)
    terms = {"fitnet": (ce, REFERENCE_HINT_WEIGHT * hint), "at": (ce, REFERENCE_AT_WEIGHT * attention)}
    if review_abfs is not None:
        terms["reviewkd"] = (ce, REFERENCE_CE_WEIGHT * ref_review_term(review_abfs, review_s, review_t))
    return terms


# ---------------------------------------------------------------- ours, and the measurement


def our_terms(method: str, teacher: nn.Module, student: nn.Module, images: torch.Tensor, labels: torch.Tensor,
              seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], KD_engine.DistillationStep]:
    """(ALPHA * CE, BETA * feature) of our criterion with the project's defaults, and the criterion."""
    torch.manual_seed(seed)
    config = dataclasses.replace(experiment.default_config(), image_size=IMAGE_SIZE)
    criterion = KD_engine.make_criterion(method, teacher, student, settings.method_setup(config))
    out = criterion(student, images, labels)
    criterion.close()
    return (config.alpha * out["ce"], criterion.method.beta * out[criterion.method.part]), criterion


def gradient_norm(term: torch.Tensor, parameters: list[nn.Parameter]) -> float:
    """L2 norm of the term's gradient over the parameters (a parameter it does not reach counts 0)."""
    grads = torch.autograd.grad(term, parameters, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))


def strength(terms: tuple[torch.Tensor, torch.Tensor], student: nn.Module) -> tuple[float, float, float]:
    """(|grad CE term|, |grad feature term|, their ratio) over the student's parameters."""
    parameters = list(student.parameters())
    ce, feature = (gradient_norm(term, parameters) for term in terms)
    return ce, feature, feature / ce


def trained_teacher(args: argparse.Namespace, data: data_setup.DatasetSplits,
                    device: torch.device) -> tuple[nn.Module, str]:
    """The teacher and a line describing it: loaded from --teacher-checkpoint, or trained briefly here."""
    if args.teacher_checkpoint:
        checkpoint = checkpoints.load_checkpoint(args.teacher_checkpoint)
        if checkpoint.get("arch") != TEACHER or checkpoint.get("class_names") != data.class_names:
            sys.exit(f"error: '{args.teacher_checkpoint}' is not a VGG16 teacher of the bundled digits "
                     f"(it holds a {checkpoint.get('arch')} of classes {checkpoint.get('class_names')}).")
        teacher = model_builder.build_model(TEACHER, len(data.class_names), IMAGE_SIZE)
        teacher.load_state_dict(checkpoint["state_dict"])
        data.mean, data.std = checkpoint["mean"], checkpoint["std"]
        return teacher.to(device), f"VGG16 loaded from {args.teacher_checkpoint} (epoch {checkpoint['epoch']})"
    torch.manual_seed(args.seed)
    teacher = model_builder.build_model(TEACHER, len(data.class_names),
                                        IMAGE_SIZE).to(device, memory_format=torch.channels_last)
    loader = data_setup.BatchLoader(data.train, experiment.BATCH_SIZE, data.mean, data.std, device,
                                    data_setup.Augmentation(pad=experiment.CROP_PADDING, hflip=False), seed=args.seed)
    val_loader = data_setup.BatchLoader(data.val, experiment.EVAL_BATCH_SIZE, data.mean, data.std, device)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=experiment.TEACHER_LR, weight_decay=experiment.WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=experiment.TEACHER_LR,
                                                    total_steps=args.teacher_epochs * len(loader), pct_start=0.25)
    fit = engine.fit(teacher, loader, val_loader, engine.SupervisedCriterion(), optimizer, args.teacher_epochs,
                     data.class_names, device, scheduler, compute.resolve_amp_dtype("auto", device),
                     hooks=engine.FitHooks(log=lambda line: None), name="teacher")
    top1 = fit.history[fit.best_epoch - 1]["val"]["top1"]
    return teacher, f"VGG16 trained {args.teacher_epochs} epochs here (validation top-1 {100 * top1:.2f}%)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--teacher-checkpoint", default=None,
                        help="a VGG16 best_model.pth trained on the bundled digits at 32 px")
    parser.add_argument("--teacher-epochs", type=int, default=2, help="epochs of the briefly trained teacher")
    parser.add_argument("--batch-size", type=int, default=64, help="images in the one real training batch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device("cpu")
    data = data_setup.load_splits(data_setup.DataDescription(image_size=IMAGE_SIZE,
                                                             val_fraction=experiment.VAL_FRACTION, seed=args.seed,
                                                             cache_dir=data_setup.DEFAULT_CACHE_DIR))
    teacher, described = trained_teacher(args, data, device)
    teacher = KD_engine.freeze(teacher.to(memory_format=torch.contiguous_format).float())
    batch_loader = data_setup.BatchLoader(data.train, args.batch_size, data.mean, data.std, device,
                                          data_setup.Augmentation(pad=experiment.CROP_PADDING, hflip=False),
                                          seed=args.seed)
    images, labels = next(iter(batch_loader))
    images = images.contiguous()
    torch.manual_seed(args.seed)
    student = model_builder.build_model(STUDENT, len(data.class_names), IMAGE_SIZE).train()
    initial = {key: value.clone() for key, value in student.state_dict().items()}

    print(f"Teacher: {described}. Student: ResNet18 at initialization, train mode. One batch of {len(labels)} "
          f"training images of the bundled digits at {IMAGE_SIZE} px, fp32.")
    print(f"Ours: loss = ALPHA*CE + (1-ALPHA)*KD + BETA*feature with ALPHA={experiment.ALPHA}, "
          f"BETA={experiment.default_config().beta} "
          "(None: the references' weight times ALPHA). Reference: CE + weight * feature.\n")
    header = (f"{'method':<9}{'':<11}{'layers (teacher:student)':<92}{'CE w':>6}{'feat w':>8}"
              f"{'|grad CE|':>11}{'|grad feat|':>13}{'ratio':>9}")
    print(header + "\n" + "-" * len(header))
    ratios = {}
    for method in ("fitnet", "at", "reviewkd"):
        student.load_state_dict(initial)
        terms, criterion = our_terms(method, teacher, student, images, labels, args.seed)
        ours = strength(terms, student)
        layers = ",".join(f"{t}:{s}" for t, s in criterion.method.pairs)
        student.load_state_dict(initial)
        review_abfs = reference_abfs(criterion.trainable) if method == "reviewkd" else None
        reference = strength(reference_terms(teacher, student, images, labels, args.seed, review_abfs)[method],
                             student)
        for who, (weights, layer_text, (ce, feature, ratio)) in (
            ("ours", ((experiment.ALPHA, criterion.method.beta), layers, ours)),
            ("reference", ((REFERENCE_CE_WEIGHT, REFERENCE_WEIGHTS[method]), reference_layers(method), reference)),
        ):
            print(f"{method:<9}{who:<11}{layer_text:<92}{weights[0]:>6g}{weights[1]:>8g}{ce:>11.4f}{feature:>13.4f}"
                  f"{ratio:>9.3f}")
        ratios[method] = (ours[2], reference[2])
    print()
    for method, (ours, reference) in ratios.items():
        share = ours / reference
        verdict = "within" if TARGET[0] <= share <= TARGET[1] else "OUTSIDE"
        print(f"{method}: ours / reference = {share:.3f} ({verdict} the {TARGET[0]}x-{TARGET[1]}x target)")
    figures = [f"{method}={ours:.3f}" for method, (ours, _) in ratios.items()]
    figures += [f"reference_{method}={reference:.3f}" for method, (_, reference) in ratios.items()]
    print("STRENGTH " + " ".join(figures))


if __name__ == "__main__":
    main()
