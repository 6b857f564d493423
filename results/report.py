"""What a run leaves for people to read: each model's folder (metrics, plots, its results), the run
directory, the comparison tables, the HTML report (a Jinja2 template, every value escaped) and the
ledger of runs.
"""

from __future__ import annotations

import base64
import csv
import fcntl
import io
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import torch
from torch import nn

import engine
import KD_engine
import model_builder
import utils
from config import settings
from core import compute, errors, records
from results import deploy, significance
from sweep import findings
from training import checkpoints, model_run

RESULTS = "results.json"  # per model; written last, its presence marks the model as finished for --resume
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


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
               for split in records.SPLITS if not (split == "val" and fit.best_val_outputs is not None)}
    if fit.best_val_outputs is not None:
        # The selected weights are the best epoch's: its validation pass already holds these outputs.
        outputs["val"] = fit.best_val_outputs
    outputs = {split: outputs[split] for split in records.SPLITS}
    results = {split: engine.metrics_from_logits(*outputs[split], class_names) for split in records.SPLITS}
    top_class, top_share = utils.most_predicted(outputs["test"][0], class_names)
    row = records.ModelRow(
        arch=arch, **deploy.describe(model), best_epoch=fit.best_epoch, epochs_trained=len(fit.history),
        stopped_early=fit.stopped_early, train_seconds=round(fit.train_seconds, 2),
        test={key: results["test"][key] for key in records.TEST_KEYS}, test_top_class=top_class,
        test_top_class_share=top_share,
    )
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
        print(f"[{role}] {export_sentence(row.export)}")
    write_model_folder(context, role, arch, model, fit, folder, outputs, results)
    # Written last: its presence marks the model as finished for --resume.
    utils.write_json(folder / RESULTS, {"model": role, **row.to_dict(),
                                        "test_correct": significance.correct_flags(*outputs["test"]),
                                        "splits": results})
    (folder / checkpoints.TRAIN_STATE).unlink(missing_ok=True)
    return row


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
        utils.plot_confusion(utils.confusion(logits, labels, len(class_names)), class_names,
                             f"{role}: {split} confusion matrix", folder / f"confusion_matrix_{split}.png")
    utils.write_json(folder / "history.json", {"best_epoch": fit.best_epoch, "epochs": fit.history})
    utils.write_text(folder / "training_metrics.txt", f"{role} ({arch}), best epoch {fit.best_epoch} by validation "
                     f"{config.select_metric}\n" + utils.history_table(fit.history, len(class_names)))
    utils.write_text(folder / "detailed_metrics.txt",
                     f"{role} ({arch}) at its best epoch {fit.best_epoch}\n\n" + utils.metrics_table(results))
    stats = torchinfo_summary(model_builder.unwrap(model), input_size=(1, 3, config.image_size, config.image_size),
                              device=context.device, mode="eval", verbose=0)
    utils.write_text(folder / "model_summary.txt", str(stats) + "\n")
    if fit.history:
        utils.save_figure(utils.curves_figure({role: fit.history}, "loss", "loss", f"{role}: loss",
                                              KD_engine.LOSS_PARTS), folder / "loss_curve.png")
        utils.save_figure(utils.curves_figure({role: fit.history}, "top1", "top1", f"{role}: top-1 accuracy"),
                          folder / "accuracy_curve.png")
    title = f"{role}: top-1 and top-3 accuracy" if utils.shows_top_k(len(class_names)) else f"{role}: top-1 accuracy"
    utils.plot_topk(results, title, folder / "top1_top3_comparison.png", len(class_names))


def export_model(context: model_run.Context, role: str, arch: str, model: nn.Module, folder: Path) -> dict[str, Any]:
    """Write <model folder>/model.onnx and check it against PyTorch on real validation images."""
    path = folder / "model.onnx"
    metadata = {"arch": arch, "class_names": context.data.class_names, "image_size": context.config.image_size,
                "resize": context.config.resize, "mean": context.data.mean, "std": context.data.std, "role": role}
    images = next(iter(context.eval_loaders["val"]))[0][:64]
    check = deploy.export_checked(model, path, context.config.image_size, metadata, images)
    return {"onnx": str(path.relative_to(context.run_dir)), **check}


def export_sentence(export: dict[str, Any]) -> str:
    """What an ONNX export wrote and how its check went, for the console and the report."""
    verdict = "passed" if export["passed"] else "FAILED"
    return (f"exported {export['onnx']}: ONNX Runtime's logits differ from PyTorch's by at most "
            f"{export['max_abs_diff']:.2g} on {export['checked_images']} validation images (tolerance "
            f"{export['tolerance']:.0e}): {verdict}")


def finished_row(folder: Path, name: str) -> records.ModelRow | None:
    """The summary row of a model an interrupted run already finished, or None: also when its results.json
    is empty or cannot be read (as a power cut while it was written can leave it), and that model is then
    trained again (continuing from its training state, if one is left)."""
    path = folder / RESULTS
    if not path.is_file():
        return None
    try:
        results = _run_file(path)
        row = records.ModelRow.from_dict({key: value for key, value in results.items()
                                         if key not in ("model", "test_correct", "splits")}, str(path))
    except ValueError as error:
        if compute.is_main_process():
            print(f"[{name}] not finished: {error}; training it again")
        return None
    if compute.is_main_process():
        (folder / checkpoints.TRAIN_STATE).unlink(missing_ok=True)
        print(f"[{name}] finished before the interruption: kept as it was")
    return row


def read_test_correct(folder: Path) -> np.ndarray:
    """Which test images a finished model classified correctly (test-split order), from its results.json."""
    results = utils.read_json(folder / RESULTS)
    if "test_correct" not in results:
        raise errors.SettingsError(f"'{folder / RESULTS}' was written by an earlier version without per-image test "
                                   "results; delete it to train that model again.")
    return significance.parse_correct_flags(results["test_correct"])


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


# ---------------------------------------------------------------- comparison tables


def comparison_table(summary: records.RunSummary) -> str:
    """The final table: one row per model with size, training time and test metrics (of the first seed),
    then, over several seeds, mean +- std of test top-1 and of the gain over the baseline; below it every
    distilled student's gain with its verdict (significant or within noise), and with several seeds
    every student's top-1, gain and verdict in every seed."""
    seeds, models = summary.seeds, summary.models
    several = len(seeds) > 1
    metrics = utils.shown_metrics(len(summary.dataset.class_names))
    header = ["model", "arch", "params", "MB", "best ep", "train", *metrics]
    if several:
        header += ["top1 mean+-std", "gain mean+-std", "gain 95% interval"]

    def mean_and_std(mean: float | None, std: float | None) -> str:
        return "" if mean is None else f"{100 * mean:.2f}+-{100 * std:.2f}"

    rows = []
    for role, row in models.items():
        cells = [role, row.arch, f"{row.params:,}", f"{row.size_mb:.1f}", str(row.best_epoch),
                 utils.format_seconds(row.train_seconds), *(utils.format_metric(row.test.get(k)) for k in metrics)]
        if several:
            interval = row.gain_top1_ci95
            cells += [mean_and_std(row.test_top1_mean, row.test_top1_std),
                      mean_and_std(row.gain_top1_mean, row.gain_top1_std),
                      "" if interval is None else f"[{100 * interval[0]:+.2f}, {100 * interval[1]:+.2f}]"]
        rows.append(cells)
    lines = [utils.text_table(header, rows, left=2).rstrip("\n")]
    distilled = [role for role in models if records.is_distilled(role)]
    lines += [significance.gain_sentence(role, models[role], models[records.BASELINE], seeds) for role in distilled]
    if distilled:
        zero_spread = any(models[role].zero_spread for role in distilled)
        lines.append("significant: " + significance.rule(several, zero_spread))
    tested = {role: row for role, row in models.items() if row.test_top1_last_epoch is not None}
    if tested:
        lines.append("test top-1 of the last epoch / of the best epoch " + records.CHOSEN_ON_TEST + ": " + ", ".join(
            f"{role} {utils.format_metric(row.test_top1_last_epoch)} / "
            f"{utils.format_metric(row.test_top1_best_epoch_on_test)}" for role, row in tested.items()))
    if several:
        lines.append(f"seeds {', '.join(map(str, seeds))}: the teacher is trained once (seed {seeds[0]}); "
                     "per-model columns are the first seed's, mean+-std over all seeds (sample std)")
        lines.append("\nEvery seed (gain: over the baseline of the same seed; verdict: exact McNemar test of the "
                     "two):\n" + utils.text_table(SEED_COLUMNS, significance.seed_rows(summary), left=2).rstrip("\n"))
    return "\n".join(lines) + "\n"


SEED_COLUMNS = ["model", "seed", "top1", "gain", "verdict"]


def deployment_table(summary: records.RunSummary) -> str:
    """Size and speed of every model on this run's device, and each one's two speed-ups over the teacher,
    batch-1 latency and batch throughput, each with its own verdict (deploy.speedup_cell)."""
    header = ["model", "params", "file MB", "GFLOPs/img", "latency ms", "latency IQR", "speed-up",
              f"img/s @{deploy.THROUGHPUT_BATCH}", "img/s IQR", "speed-up"]

    def interval(low_high: list[float], digits: int) -> str:
        return "-".join(f"{value:.{digits}f}" for value in low_high)

    rows, marked, teacher = [], {}, summary.models[records.TEACHER]
    for role, row in summary.models.items():
        cells = {kind: deploy.speedup_cell(row, kind, teacher) for kind in deploy.SPEED_KINDS}
        for kind, cell in cells.items():
            if cell in ("unclear", "noisy"):
                ratio = getattr(row, deploy.SPEED_KINDS[kind][0][0])
                marked.setdefault(cell, []).append(f"{role} {deploy.SPEED_KINDS[kind][1]} {ratio:.2f}x")
        rows.append([role, f"{row.params:,}", f"{row.file_mb:.1f}", f"{row.flops_per_image / 1e9:.3g}",
                     f"{row.latency_ms:.2f}", interval(row.latency_ms_iqr, 2), cells["latency"],
                     f"{row.throughput_img_s:.1f}", interval(row.throughput_img_s_iqr, 1), cells["throughput"]])
    notes = ["medians and interquartile ranges over interleaved rounds; speed-ups: the teacher's median batch-1 "
             f"latency / the model's, and the model's median batch-{deploy.THROUGHPUT_BATCH} throughput / the "
             "teacher's"]
    if "unclear" in marked:
        notes.append("unclear: the model's and the teacher's interquartile ranges overlap, so this measurement cannot "
                     f"tell which is faster (median ratios: {', '.join(marked['unclear'])})")
    if "noisy" in marked:
        notes.append(f"noisy: a measurement's interquartile range stayed wider than {100 * deploy.NOISY_SPREAD:g}% of "
                     f"its median in {deploy.MEASURE_PASSES} tries (a busy machine): no speed-up is claimed from it "
                     f"(median ratios: {', '.join(marked['noisy'])})")
    return (f"Deployment on {summary.device} ({summary.precision}):\n" + utils.text_table(header, rows)
            + "".join(note + "\n" for note in notes))


def reading_of_result(summary: records.RunSummary) -> list[str]:
    """A few plain sentences on what distillation bought and what the student costs, from the summary's numbers.

    A distilled student that has not learned the task (significance.failure) is said to be so, not praised."""
    sentences = []
    models = summary.models
    teacher, baseline = models.get(records.TEACHER), models.get(records.BASELINE)
    distilled_roles = [role for role in models if records.is_distilled(role)]
    distilled = models[distilled_roles[0]] if distilled_roles else None
    student = distilled or baseline  # every student has the same architecture
    failed = None if distilled is None else significance.failure(distilled, summary.dataset)
    if teacher and distilled and failed:
        method = records.method_of(distilled_roles[0])
        sentences.append(f"The distilled student ({method}) {failed}: it has not learned "
                         "to tell the classes apart, so its accuracy and its gain are no result (see the warnings).")
    elif teacher and distilled:
        kept = distilled.test["top1"] / teacher.test["top1"] if teacher.test["top1"] else None
        sentences.append(
            f"The distilled student keeps {utils.format_metric(kept)}% of the teacher's test top-1 "
            f"({utils.format_metric(distilled.test['top1'])}% vs {utils.format_metric(teacher.test['top1'])}%) "
            f"with {100 * distilled.params / teacher.params:.0f}% of its parameters.")
        if distilled.test["top1"] > teacher.test["top1"]:
            sentences.append("The student outscored its teacher on the test split: the teacher was not the "
                             "stronger model here, so the soft targets carried little extra knowledge.")
    if teacher and student and student.flops_per_image is not None and teacher.flops_per_image:
        ratio = student.flops_per_image / teacher.flops_per_image
        cost = (f"{ratio:.3g}x the teacher's FLOPs per image ({student.flops_per_image / 1e9:.3g} vs "
                f"{teacher.flops_per_image / 1e9:.3g} GFLOPs)")
        sentences.append(f"The student is not cheaper than its teacher: it needs {cost}." if ratio >= 1
                         else f"The student needs {cost}.")
    clauses = [] if not (teacher and student) else [clause for kind in deploy.SPEED_KINDS
                                                    if (clause := deploy.speed_clause(student, teacher, kind))]
    if clauses:
        sentences.append(f"Measured on {summary.device} against the teacher, the student: {'; '.join(clauses)}.")
    if baseline:
        sentences += [significance.gain_sentence(role, models[role], baseline, summary.seeds)
                      for role in distilled_roles]
    samples = summary.dataset.sizes.get("test")
    if baseline and distilled_roles and samples:
        sentences.append(f"One test image is {100 / samples:.2f} points here.")
    return sentences


# ---------------------------------------------------------------- the HTML report


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


METRIC_COLUMNS = {"top1": "test top-1 %", "top3": "top-3 %", "f1_macro": "macro F1 %", "auc_macro": "macro AUC %"}
MODEL_COLUMNS = ["model", "architecture", *METRIC_COLUMNS.values(), "parameters", "size MB", "GFLOPs / image",
                 "latency ms, batch 1, median (IQR)", "speed-up, batch 1",
                 f"images/s, batch {deploy.THROUGHPUT_BATCH}, median (IQR)",
                 f"speed-up, batch {deploy.THROUGHPUT_BATCH}",
                 "gain over baseline", "best epoch"]


def _model_cells(
    role: str, row: records.ModelRow, baseline: records.ModelRow | None,
    metrics: tuple[str, ...] = tuple(METRIC_COLUMNS), teacher: records.ModelRow | None = None,
) -> list[str]:
    """One model's cells in the report's table of models (`metrics`: the test metrics shown)."""
    gain = "—"
    if records.is_distilled(role) and baseline is not None:
        gain = f"{100 * (row.test['top1'] - baseline.test['top1']):+.2f}"
        if row.mcnemar_p is not None:
            gain += f", {significance.verdict(row.mcnemar_p)}"

    def median_iqr(median: float | None, iqr: list[float] | None, digits: int) -> str:
        if median is None:
            return "—"
        return f"{median:.{digits}f}" + ("" if iqr is None else " ({:.{d}f}–{:.{d}f})".format(*iqr, d=digits))

    speedups = [{"n/a": "—", "unclear": "unclear (IQRs overlap)", "noisy": "noisy (no claim)"}.get(cell, cell)
                .replace("x", "×") for cell in (deploy.speedup_cell(row, kind, teacher) for kind in deploy.SPEED_KINDS)]
    flops = "—" if row.flops_per_image is None else f"{row.flops_per_image / 1e9:.3g}"
    return [role, row.arch, *(utils.format_metric(row.test.get(k)) for k in metrics),
            f"{row.params:,}", f"{row.size_mb:.1f}", flops, median_iqr(row.latency_ms, row.latency_ms_iqr, 2),
            speedups[0], median_iqr(row.throughput_img_s, row.throughput_img_s_iqr, 1), speedups[1], gain,
            str(row.best_epoch)]


def _models_table(summary: records.RunSummary) -> tuple[list[str], list[list[str]]]:
    """The report's table of models: its columns (top-3 only where it says something) and one row per model."""
    metrics = utils.shown_metrics(len(summary.dataset.class_names))
    hidden = {label for key, label in METRIC_COLUMNS.items() if key not in metrics}
    baseline = summary.models.get(records.BASELINE)
    return ([column for column in MODEL_COLUMNS if column not in hidden],
            [_model_cells(role, row, baseline, metrics, summary.models.get(records.TEACHER))
             for role, row in summary.models.items()])


def _exports(summary: records.RunSummary) -> list[str]:
    """One sentence per ONNX export (--export onnx): the file written and its check against PyTorch."""
    return [f"{role}: {export_sentence(row.export)}." for role, row in summary.models.items() if row.export]


def wall_time(summary: records.RunSummary) -> str:
    """The run's wall time; over several sittings (--resume) the total and the last sitting's."""
    total = utils.format_seconds(summary.wall_seconds)
    if not summary.sittings or summary.sittings < 2 or summary.wall_seconds_last_sitting is None:
        return total
    last = utils.format_seconds(summary.wall_seconds_last_sitting)
    return f"{total} in {summary.sittings} sittings (the last {last})"


def _data_rows(summary: records.RunSummary) -> list[tuple[str, str]]:
    """The report's table of the data: classes, split sizes, how validation and test were obtained, skipped files."""
    dataset, skipped = summary.dataset, summary.skipped_files
    rows = [(f"classes ({len(dataset.class_names)})", ", ".join(dataset.class_names))]
    rows += [(f"{split} images", str(size)) for split, size in dataset.sizes.items()]
    rows.append(("validation", dataset.validation))
    carved = (("test", "test"), ("train_subset", "training subset"))
    rows += [(label, str(dataset.carving[key])) for key, label in carved if dataset.carving.get(key)]
    listing = "; ".join(f"{item['path']} ({item['reason']})" for item in skipped)
    rows.append(("skipped files", f"{len(skipped)}: {listing}" if skipped else "none"))
    return rows


def _run_file(path: Path, record: type[records.Record] | None = None) -> Any:
    """A JSON file of the run (a mapping), checked against its record type when given: ValueError naming
    the file, and the field, when it cannot be read or does not fit. The JSON as read is returned."""
    try:
        data = utils.read_json(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read '{path}' ({_reason(error)})") from None
    if record is not None:
        record.from_dict(data, str(path))
    elif not isinstance(data, dict):
        raise ValueError(f"'{path}' must hold a mapping, not {type(data).__name__}")
    return data


def _run_bytes(path: Path) -> bytes:
    """A file of the run, or ValueError naming it."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read '{path}' ({_reason(error)})") from None


def _reason(error: Exception) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else errors.one_line(error)


def _per_class_f1(results: dict[str, Any], students: list[str], class_names: list[str], run_dir: Path) -> str | None:
    """The students' per-class test F1 as a PNG data URI (None without students with per-class scores)."""
    scored = [role for role in students if results[role]["splits"].get("test", {}).get("per_class") is not None]
    if not scored or not class_names:
        return None
    per_class = {role: results[role]["splits"]["test"]["per_class"] for role in scored}
    for role, scores in per_class.items():
        unscored = [name for name in class_names if "f1" not in scores.get(name, {})]
        if unscored:
            raise ValueError(f"'{run_dir / role / RESULTS}' has no test F1 of class {unscored[0]!r}")
    return _png_data_uri(utils.figure_png(utils.per_class_f1_figure(per_class, class_names), dpi=100))


def _test_figure_rows(summary: records.RunSummary) -> list[list[str]]:
    """Per model with --eval-test-every-epoch figures: its validation-selected test top-1, the last epoch's and
    the best epoch's chosen on the test split."""
    return [[role, utils.format_metric(row.test.get("top1")), utils.format_metric(row.test_top1_last_epoch),
             utils.format_metric(row.test_top1_best_epoch_on_test)]
            for role, row in summary.models.items() if row.test_top1_last_epoch is not None]


def build_report(run_dir: str | Path) -> str:
    """A self-contained HTML report of a finished run, read from the files in its directory.

    Every file is read through its record type (summary.json: records.RunSummary; each model's
    history.json and results.json: records.ModelHistory, records.ModelResults): one that is missing,
    damaged or whose fields have the wrong types raises ValueError naming the file and the field.
    """
    run_dir = Path(run_dir)
    summary = records.RunSummary.from_dict(_run_file(run_dir / "summary.json"), str(run_dir / "summary.json"))
    config = _run_file(run_dir / "config.json")
    roles = list(summary.models)
    results = {role: _run_file(run_dir / role / RESULTS, records.ModelResults) for role in roles}
    histories = {role: _run_file(run_dir / role / "history.json", records.ModelHistory)["epochs"] for role in roles}
    curves = [{"label": label, "src": _png_data_uri(utils.figure_png(utils.curves_figure(histories, key, key), 100))}
              for key, label in (("loss", "loss (train: training objective, val: CE)"), ("top1", "top-1 accuracy"))]
    confusions = [{"label": role, "src": _png_data_uri(_run_bytes(run_dir / role / "confusion_matrix_test.png"))}
                  for role in roles]
    students = [role for role in roles if role.startswith(records.STUDENT_PREFIX)]
    per_class_f1 = _per_class_f1(results, students, summary.dataset.class_names, run_dir)
    metric = significance.METRIC_NAMES.get(config.get("select_metric", "top1"), config.get("select_metric"))
    models_note = (f"Best epoch chosen on validation {metric} (--select-metric); test metrics of those weights. "
                   f"Latency (batch 1) and throughput (batch {deploy.THROUGHPUT_BATCH}) measured with the other models "
                   "in interleaved rounds; speed-ups: the teacher's median latency over the model's, and the model's "
                   "median throughput over the teacher's, each 'unclear' where the two interquartile ranges overlap "
                   f"and 'noisy' where a measurement's range stayed wider than {100 * deploy.NOISY_SPREAD:g}% of its "
                   f"median. Gain verdict: {significance.rule(False)} (first seed).")
    columns, model_rows = _models_table(summary)
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                                     undefined=jinja2.StrictUndefined)
    return environment.get_template("report.html").render(
        run_name=run_dir.name, finished_at=summary.finished_at, device=summary.device, precision=summary.precision,
        wall_time=wall_time(summary), reading=reading_of_result(summary),
        warnings=summary.warnings, model_columns=columns, model_rows=model_rows, models_note=models_note,
        seed_columns=SEED_COLUMNS, seed_rows=significance.seed_rows(summary) if len(summary.seeds) > 1 else [],
        exports=_exports(summary), curves=curves, confusions=confusions, per_class_f1=per_class_f1,
        data_rows=_data_rows(summary), sweep=None if summary.sweep is None else _sweep_view(summary.sweep),
        test_figure_rows=_test_figure_rows(summary), chosen_on_test=records.CHOSEN_ON_TEST,
        settings_rows=[(key, json.dumps(value)) for key, value in config.items() if key != "dataset"],
    )


def _sweep_view(sweep: records.SweepRecord) -> dict[str, Any]:
    """The report's Sweep section (see findings.section), its figures as data URIs."""
    view = findings.section(sweep)
    view["figures"] = [{"label": label, "src": _png_data_uri(png)} for label, png in view["figures"]]
    return view


def write_report(run_dir: str | Path) -> Path:
    """Write RUN/report.html (atomically) and return its path."""
    path = Path(run_dir) / "report.html"
    utils.write_text(path, build_report(run_dir))
    return path


# ---------------------------------------------------------------- the ledger of runs

LEDGER_ROLES = (records.TEACHER, records.BASELINE, records.distilled_role("kd"))  # each has its own top-1 column
LEDGER_COLUMNS = [
    "finished_at", "run_dir", "dataset", "teacher_model", "student_model", "teacher_checkpoint", "teacher_epochs",
    "student_epochs", "optimizer", "teacher_lr", "student_lr", "kd_methods", "temperature", "alpha", "batch_size",
    "image_size", "seed", "seeds", *(f"{role}_top1" for role in LEDGER_ROLES), "distilled_top1", "kd_gain_top1",
    "wall_seconds", "wall_seconds_last_sitting", "sweep",
]


def ledger_row(config: settings.Config, summary: records.RunSummary, run_dir: Path) -> dict[str, Any]:
    """One line of the runs ledger: what was run, with which key settings, and how it scored."""
    dataset = "bundled digits" if settings.is_bundled(config) else (config.data_dir or config.train_dir)
    models = summary.models
    distilled = [role for role in models if records.is_distilled(role)]
    return {
        "finished_at": summary.finished_at, "run_dir": str(run_dir), "dataset": dataset,
        **{key: getattr(config, key) for key in ("teacher_model", "student_model", "student_epochs", "optimizer",
                                                  "student_lr", "temperature", "alpha", "batch_size", "image_size",
                                                  "seed")},
        # A reused teacher was not trained in this run: its checkpoint stands where its training settings would.
        "teacher_checkpoint": config.teacher_checkpoint or "",
        "teacher_epochs": "" if config.teacher_checkpoint else config.teacher_epochs,
        "teacher_lr": "" if config.teacher_checkpoint else config.teacher_lr,
        "kd_methods": ",".join(settings.kd_methods(config)), "seeds": ",".join(map(str, settings.seeds(config))),
        **{f"{role}_top1": round(models[role].test["top1"], 6) if role in models else None for role in LEDGER_ROLES},
        "distilled_top1": " ".join(f"{records.method_of(role)}={models[role].test['top1']:.6f}" for role in distilled),
        "kd_gain_top1": None if summary.kd_gain_top1 is None else round(summary.kd_gain_top1, 6),
        "wall_seconds": summary.wall_seconds,  # every sitting of a resumed run
        "wall_seconds_last_sitting": (summary.wall_seconds if summary.wall_seconds_last_sitting is None
                                      else summary.wall_seconds_last_sitting),
        # A sweep's row: the settings above are its best trial's.
        "sweep": "" if summary.sweep is None else (f"{summary.sweep.spec}; {len(summary.sweep.trials)} trials, best "
                                                   f"{summary.sweep.best_trial}"),
    }


def append_ledger(path: str | Path, row: dict[str, Any]) -> None:
    """Append one row to a CSV ledger, writing the header first when the file is new.

    A ledger written by an older version, with fewer columns, is migrated: its header gains the
    missing columns (its own columns, even unknown ones, keep their values), rewritten atomically.
    An exclusive lock on a companion `.lock` file makes runs finishing at once append whole rows,
    one after the other, and never lose one to a migration. A run has one row: a resumed run that
    published before (its summary.json was damaged) replaces its row.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            header: list[str] = []
            if path.is_file() and path.stat().st_size:
                with open(path, encoding="utf-8", newline="") as ledger:
                    header = next(csv.reader(ledger), [])
            columns = header + [column for column in LEDGER_COLUMNS if column not in header]
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
            if header and columns == header and _ends_whole(path) and not _holds_run(path, row):  # else rewritten
                writer.writerow({k: row.get(k, "") for k in columns})
                _append_durably(path, buffer.getvalue())
                return
            rows = []
            if header:
                with open(path, encoding="utf-8", newline="") as ledger:  # a rebuilt run's older row gives way
                    rows = [old for old in csv.DictReader(ledger) if old.get("run_dir") != row.get("run_dir")]
            writer.writeheader()
            writer.writerows(rows + [{k: row.get(k, "") for k in columns}])
            utils.write_text(path, buffer.getvalue())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _holds_run(path: Path, row: dict[str, Any]) -> bool:
    """Whether the ledger has a row of `row`'s run directory already (a run whose summary.json was rebuilt):
    a run has one row."""
    with open(path, encoding="utf-8", newline="") as ledger:
        return any(old.get("run_dir") == row.get("run_dir") for old in csv.DictReader(ledger))


def _ends_whole(path: Path) -> bool:
    """Whether a ledger's last row is whole: a crash during an append can leave half a row without its newline,
    which the next row appended would fuse with (then the ledger is rewritten, the fragment a row of its own)."""
    with open(path, "rb") as ledger:
        ledger.seek(-1, os.SEEK_END)
        return ledger.read(1) == b"\n"


def _append_durably(path: Path, text: str) -> None:
    """Append text to a file and wait until it is on disk."""
    with open(path, "a", encoding="utf-8", newline="") as ledger:
        ledger.write(text)
        ledger.flush()
        os.fsync(ledger.fileno())
