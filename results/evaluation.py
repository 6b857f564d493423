"""Evaluating a trained model and writing what it leaves: its folder (metrics, plots, an ONNX export and,
last, results.json), the run directory and its config.json and skipped_files.log.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import engine
import KD_engine
import model_builder
import utils
from config import settings
from core import compute, errors, paired_tests, plots, records
from results import deploy, report
from training import checkpoints, model_run

# ---------------------------------------------------------------- one model's folder


def evaluate_model(
    context: model_run.Context, role: str, arch: str, model: nn.Module, fit: engine.FitResult, folder: Path,
) -> records.ModelRow:
    """Evaluate the selected model on every split and write its folder of metrics, plots and reports.

    Every rank takes part in the evaluation; only rank 0 writes files.
    """
    class_names = context.data.class_names
    outputs = {split: tuple(tensor.cpu() for tensor in engine.predict(
                   model, context.eval_loaders[split], context.device, context.amp_dtype, f"{role} {split}"))
               for split in ("train", "val") if not (split == "val" and fit.best_val_outputs is not None)}
    if fit.best_val_outputs is not None:
        # The selected weights are the best epoch's: its validation pass already holds these outputs.
        outputs["val"] = fit.best_val_outputs
    outputs["test"], autocast_test = test_outputs(model, context.eval_loaders["test"], context.device,
                                                  context.amp_dtype, f"{role} test")
    outputs = {split: outputs[split] for split in records.SPLITS}
    results = {split: engine.metrics_from_logits(*outputs[split], class_names) for split in records.SPLITS}
    top_class, top_share = utils.most_predicted(outputs["test"][0], class_names)
    row = records.ModelRow(
        arch=arch, **deploy.describe(model), best_epoch=fit.best_epoch, epochs_trained=len(fit.history),
        stopped_early=fit.stopped_early, train_seconds=round(fit.train_seconds, 2),
        test={key: results["test"][key] for key in records.TEST_KEYS}, test_top_class=top_class,
        test_top_class_share=top_share,
    )
    if autocast_test is not None:
        autocast_results = engine.metrics_from_logits(*autocast_test, class_names)
        row.test_autocast = {"precision": compute.precision_name(context.amp_dtype),
                             **{key: autocast_results[key] for key in records.TEST_KEYS}}
    pretrained = context.initial_weights(role)
    if pretrained is not None:
        row.pretrained = model_builder.pretrained_fit(model, pretrained)[1]
    tested = [epoch["test"]["top1"] for epoch in fit.history if "test" in epoch]  # --eval-test-every-epoch
    if tested:
        row.test_top1_last_epoch, row.test_top1_best_epoch_on_test = tested[-1], max(tested)
    if not compute.is_main_process():
        return row
    context.saver.wait()  # best_model.pth is measured below, and the training state removed
    figures = deploy.file_figures(model, folder / checkpoints.BEST_MODEL, context.config.image_size)
    row.file_mb, row.flops_per_image = figures["file_mb"], figures["flops_per_image"]
    if context.config.export == "onnx":
        row.export = export_model(context, role, arch, model, folder)
        print(f"[{role}] {report.export_sentence(row.export)}")
    write_model_folder(context, role, arch, model, fit, folder, outputs, results)
    # Written last: its presence marks the model as finished for --resume.
    utils.write_json(folder / report.RESULTS, {"model": role, **row.to_dict(),
                                        "test_correct": paired_tests.correct_flags(*outputs["test"]),
                                        "splits": results})
    (folder / checkpoints.TRAIN_STATE).unlink(missing_ok=True)
    return row


def test_outputs(
    model: nn.Module, data_loader: engine.Batches, device: torch.device, amp_dtype: torch.dtype | None,
    description: str,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """The test split's logits and labels (on the host) of the model as saved and deployed (fp32, as
    prediction_for_one.py and the ONNX file run it), and, where the run trained under autocast
    (`amp_dtype`), under that autocast too (None otherwise): reduced precision can flip a prediction."""
    deployed = tuple(tensor.cpu() for tensor in engine.predict(model, data_loader, device, None, description))
    if amp_dtype is None:
        return deployed, None
    autocast = tuple(tensor.cpu() for tensor in engine.predict(
        model, data_loader, device, amp_dtype, f"{description} ({compute.precision_name(amp_dtype)})"))
    return deployed, autocast


def write_model_folder(
    context: model_run.Context, role: str, arch: str, model: nn.Module, fit: engine.FitResult, folder: Path,
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]], results: dict[str, dict[str, Any]],
) -> None:
    """A model's reports: per split its classification report and confusion matrix; its history,
    metrics tables, layer summary, learning curves and top-k bars."""
    from torchinfo import summary as torchinfo_summary

    class_names, config = context.data.class_names, context.config
    for split, (logits, labels) in outputs.items():
        results[split]["per_class"] = utils.per_class_scores(logits, labels, class_names)
        utils.write_text(folder / f"classification_report_{split}.txt", utils.report_text(logits, labels, class_names))
        plots.plot_confusion(utils.confusion(logits, labels, len(class_names)), class_names,
                             f"{role}: {split} confusion matrix", folder / f"confusion_matrix_{split}.png")
    utils.write_json(folder / "history.json", {"best_epoch": fit.best_epoch, "epochs": fit.history})
    utils.write_text(folder / "training_metrics.txt", f"{role} ({arch}), best epoch {fit.best_epoch} by validation "
                     f"{config.select_metric}\n" + utils.history_table(fit.history, len(class_names)))
    utils.write_text(folder / "detailed_metrics.txt",
                     f"{role} ({arch}) at its best epoch {fit.best_epoch}\n\n" + utils.metrics_table(results))
    stats = torchinfo_summary(compute.unwrap(model), input_size=(1, 3, config.image_size, config.image_size),
                              device=context.device, mode="eval", verbose=0)
    utils.write_text(folder / "model_summary.txt", str(stats) + "\n")
    if fit.history:
        plots.save_figure(plots.curves_figure({role: fit.history}, "loss", "loss", f"{role}: loss",
                                              KD_engine.loss_parts()), folder / "loss_curve.png")
        plots.save_figure(plots.curves_figure({role: fit.history}, "top1", "top1", f"{role}: top-1 accuracy"),
                          folder / "accuracy_curve.png")
    title = f"{role}: top-1 and top-3 accuracy" if utils.shows_top_k(len(class_names)) else f"{role}: top-1 accuracy"
    plots.plot_topk(results, title, folder / "top1_top3_comparison.png", len(class_names))


def export_model(context: model_run.Context, role: str, arch: str, model: nn.Module, folder: Path) -> dict[str, Any]:
    """Write <model folder>/model.onnx and check it against PyTorch (fp32, as saved) on the whole test split."""
    path = folder / "model.onnx"
    metadata = {"arch": arch, "class_names": context.data.class_names, "image_size": context.config.image_size,
                "resize": context.config.resize, "mean": context.data.mean, "std": context.data.std, "role": role}
    batches = (images for images, *_ in context.eval_loaders["test"])
    check = deploy.export_checked(model, path, context.config.image_size, metadata, batches)
    return {"onnx": str(path.relative_to(context.run_dir)), **check}



RESUMED_KEPT = "finished before the interruption"  # why finished_row keeps a model, by default


def finished_row(folder: Path, name: str, kept: str = RESUMED_KEPT) -> records.ModelRow | None:
    """The summary row of a model an interrupted run already finished, or None: also when its results.json
    is empty or cannot be read (as a power cut while it was written can leave it), and that model is then
    trained again (continuing from its training state, if one is left). `kept` says why a finished one is kept."""
    path = folder / report.RESULTS
    if not path.is_file():
        return None
    try:
        results = report.read_run_file(path)
        row = records.ModelRow.from_dict({key: value for key, value in results.items()
                                         if key not in ("model", "test_correct", "splits")}, str(path))
    except ValueError as error:
        if compute.is_main_process():
            print(f"[{name}] not finished: {error}; training it again")
        return None
    if compute.is_main_process():
        (folder / checkpoints.TRAIN_STATE).unlink(missing_ok=True)
        print(f"[{name}] {kept}: kept as it was")
    return row


def read_test_correct(folder: Path) -> np.ndarray:
    """Which test images a finished model classified correctly (test-split order), from its results.json."""
    path = folder / report.RESULTS
    results = utils.read_json(path)
    if "test_correct" not in results:
        raise errors.SettingsError(f"'{path}' was written by an earlier version without per-image test "
                                   "results; delete it to train that model again.")
    return paired_tests.parse_correct_flags(results["test_correct"])


# ---------------------------------------------------------------- the run directory


def make_run_dir(output_dir: str | None) -> Path:
    """The run directory: as given, or a new runs/<timestamp> folder (rank 0 decides for all)."""
    if not compute.is_main_process():
        return Path(compute.broadcast_object(None))
    if output_dir is not None:
        path = Path(output_dir)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path("runs") / stamp
        suffix = 1
        while path.exists():
            suffix += 1
            path = Path("runs") / f"{stamp}-{suffix}"
    path.mkdir(parents=True, exist_ok=True)
    return Path(compute.broadcast_object(str(path)))


def write_run_config(run_dir: Path, config: settings.Config, resolved: dict[str, Any],
                     dataset: records.DatasetRecord) -> None:
    """RUN/config.json: every setting, what the run resolved (device, precision, ...) and its data."""
    utils.write_json(run_dir / "config.json",
                     {**settings.saved_config(config), "resolved": resolved, "dataset": dataset.to_dict()})


def write_skipped_files(run_dir: Path, skipped: list[dict[str, str]]) -> None:
    """RUN/skipped_files.log, one unreadable file a line with its reason, and a line on the console.

    A name is written as a Python string literal (quoted, control characters escaped), so a file
    whose name holds a newline cannot fake lines of the log.
    """
    if not skipped:
        return
    lines = "".join(f"{entry['path']!r}: {' '.join(entry['reason'].split())}\n" for entry in skipped)
    utils.write_text(run_dir / "skipped_files.log", lines)
    print(f"Skipped {len(skipped)} unreadable file{'s' if len(skipped) > 1 else ''} "
          f"(listed in {run_dir / 'skipped_files.log'} and summary.json)")
