"""What a run leaves for people to read: the comparison tables, the reading of the result and the HTML
report (a Jinja2 template, every value escaped), all read from the files of a run directory.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jinja2

import utils
from core import errors, plots, records
from results import deploy, significance
from sweep import findings

RESULTS = "results.json"  # per model (results.evaluation writes it last: its presence marks a finished model)
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


def export_sentence(export: dict[str, Any]) -> str:
    """What an ONNX export wrote and how its check went, for the console and the report."""
    verdict = "passed" if export["passed"] else "FAILED"
    # Exports of earlier versions were checked on validation images and compared logits only.
    split = export.get("checked_split", "validation")
    predictions = "" if "differing_predictions" not in export else (
        f", and {export['differing_predictions']} of its predictions differ")
    return (f"exported {export['onnx']}: ONNX Runtime's logits differ from PyTorch's by at most "
            f"{export['max_abs_diff']:.2g} on {export['checked_images']} {split} images (tolerance "
            f"{export['tolerance']:.0e}){predictions}: {verdict}")


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
    lines += [significance.gain_sentence(role, models[role], models[records.BASELINE], seeds,
                                         significance.collapsed_seeds(models[role], models[records.BASELINE],
                                                                      summary.dataset)) for role in distilled]
    if distilled:
        zero_spread = any(models[role].zero_spread for role in distilled)
        lines.append("significant: " + significance.rule(several, zero_spread))
    note = precision_note(models)
    if note:
        lines.append(note)
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


def precision_note(models: dict[str, records.ModelRow]) -> str | None:
    """Where models were trained and first evaluated under autocast: that the test figures are those of the
    saved fp32 weights, with each model's test top-1 under the autocast beside (None for fp32 runs)."""
    under = {role: row.test_autocast for role, row in models.items() if row.test_autocast}
    if not under:
        return None
    precision = next(iter(under.values()))["precision"]
    return (f"Test figures: the saved fp32 weights, as prediction_for_one.py and the ONNX file run them; test top-1 "
            f"under the run's {precision} autocast: " + ", ".join(
                f"{role} {utils.format_metric(test['top1'])}" for role, test in under.items()))


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
    notes = ["each model timed against the teacher in alternating rounds; speed-ups: the median over rounds of the "
             f"teacher's batch-1 time / the model's (latency) and of batch-{deploy.THROUGHPUT_BATCH} (throughput)"]
    if "unclear" in marked:
        notes.append("unclear: the interquartile range of the per-round ratios holds 1, so this measurement cannot "
                     f"tell which is faster (median ratios: {', '.join(marked['unclear'])})")
    if teacher.speeds_apart:
        notes.append(f"noisy: {teacher.speeds_apart}, so the machine's load changed while it measured: no speed-up "
                     "of this table is claimed")
    elif "noisy" in marked:
        notes.append(f"noisy: the interquartile range of the per-round ratios stayed wider than "
                     f"{100 * deploy.NOISY_SPREAD:g}% of their median in {deploy.MEASURE_PASSES} tries (a busy "
                     f"machine): no speed-up is claimed from it (median ratios: {', '.join(marked['noisy'])})")
    return (f"Deployment on {summary.device} ({summary.precision}):\n" + utils.text_table(header, rows)
            + "".join(note + "\n" for note in notes))


# ---------------------------------------------------------------- head to head (several distilled students)

PAIR_TEST_WORDS = {"mcnemar": "McNemar", "t": "t-test", records.ZERO_SPREAD_TEST: "McNemar, every seed"}


def _points(value: float) -> str:
    return f"{100 * value:+.2f}"


def comparison_rule(comparisons: records.Comparisons, seeds: list[int]) -> str:
    """What decided each head-to-head pair and how the family was corrected, in words (the tables' note)."""
    count = len(comparisons.pairs)
    test = (f"the paired t-test of its differences over seeds {', '.join(map(str, seeds))} (where every seed "
            "differed by the same, each seed's exact McNemar test: the largest p)" if len(seeds) > 1
            else "the exact McNemar test of the two on the same test images")
    correction = (f"p not corrected for the family of {count} pairs (some differ by chance)"
                  if comparisons.correction == "none" else
                  f"p corrected by Holm's step-down over the family of {count} pairs")
    return (f"each pair: {test}; {correction} (--comparison-correction {comparisons.correction}); a pair differs "
            f"where its {corrected_p_column(comparisons)} < {comparisons.level:g}")


def corrected_p_column(comparisons: records.Comparisons) -> str:
    """The name of the corrected p (its column's header): it names the correction."""
    return "Holm p" if comparisons.correction == "holm" else "uncorrected p"


def _several_seeds(comparisons: records.Comparisons) -> bool:
    return len(comparisons.ranking[0].test_top1_by_seed) > 1


def pair_columns(comparisons: records.Comparisons) -> list[str]:
    """The head-to-head pairs table's columns (with one seed: no per-seed columns, no interval)."""
    corrected_p = corrected_p_column(comparisons)
    if not _several_seeds(comparisons):
        return ["pair", "difference", "test", "p", corrected_p, "verdict"]
    return ["pair", "difference per seed", "mean", "95% interval", "test", "p", corrected_p,
            f"McNemar p per seed ({corrected_p})", "verdict"]


def pair_cells(pair: records.ComparedPair) -> list[str]:
    """One pair's cells, as `pair_columns` names them: differences in points (the first's test top-1 minus the
    second's), its tests' p raw and corrected, and its verdict."""
    name, verdict = f"{records.method_of(pair.first)} - {records.method_of(pair.second)}", (
        "differ" if pair.significant else "tied")
    tests = [PAIR_TEST_WORDS[pair.test], f"{pair.p:.3g}", f"{pair.p_corrected:.3g}"]
    if len(pair.difference_by_seed) == 1:
        return [name, _points(pair.difference_mean), *tests, verdict]
    interval = "" if pair.difference_ci95 is None else "[{}, {}]".format(*map(_points, pair.difference_ci95))
    per_seed = ", ".join(f"{p:.2g} ({pair.mcnemar_p_corrected_by_seed[seed]:.2g})"
                         for seed, p in pair.mcnemar_p_by_seed.items())
    return [name, ", ".join(map(_points, pair.difference_by_seed.values())), _points(pair.difference_mean),
            interval, *tests, per_seed, verdict]


def ranking_columns(comparisons: records.Comparisons) -> list[str]:
    """The ranking table's columns (with one seed: no per-seed column)."""
    if not _several_seeds(comparisons):
        return ["rank", "student", "test top-1", "against the best"]
    return ["rank", "student", "test top-1 mean", "per seed", "against the best"]


def ranking_rows(comparisons: records.Comparisons) -> list[list[str]]:
    """The ranking's rows: each student's mean (and per-seed) test top-1, and whether a corrected test separates it
    from the best (with that pair's corrected p)."""
    best, several = comparisons.ranking[0].role, _several_seeds(comparisons)
    against = {pair.second: pair for pair in comparisons.pairs if pair.first == best}
    rows = []
    for rank, student in enumerate(comparisons.ranking, start=1):
        pair = against.get(student.role)
        verdict = "best" if pair is None else (
            f"{'tied' if student.tied_with_best else 'behind'} ({corrected_p_column(comparisons)} "
            f"{pair.p_corrected:.3g})")
        per_seed = [", ".join(map(utils.format_metric, student.test_top1_by_seed.values()))] if several else []
        rows.append([str(rank), records.method_of(student.role), utils.format_metric(student.test_top1_mean),
                     *per_seed, verdict])
    return rows


def difference_matrix(comparisons: records.Comparisons) -> list[list[tuple[str, bool]]]:
    """The mean differences of every two students in ranking order: cell (row, column) is the row's mean test
    top-1 minus the column's, in points, with whether the pair differs; the diagonal is empty."""
    pairs = {(pair.first, pair.second): pair for pair in comparisons.pairs}
    roles = [student.role for student in comparisons.ranking]
    matrix = []
    for row in roles:
        cells = []
        for column in roles:
            pair, sign = pairs.get((row, column)), 1
            if pair is None and (column, row) in pairs:
                pair, sign = pairs[(column, row)], -1
            cells.append(("", False) if pair is None else (_points(sign * pair.difference_mean), pair.significant))
        matrix.append(cells)
    return matrix


def head_to_head_sentence(comparisons: records.Comparisons) -> str:
    """The ranking in one sentence: the best student, those tied with it, and those behind it."""
    best, *others = comparisons.ranking
    tied = [records.method_of(student.role) for student in others if student.tied_with_best]
    behind = [records.method_of(student.role) for student in others if not student.tied_with_best]
    test = "test corrected by Holm's step-down" if comparisons.correction == "holm" else "uncorrected test"
    sentence = (f"Head to head, {records.method_of(best.role)} has the best mean test top-1 "
                f"({utils.format_metric(best.test_top1_mean)}%); ")
    sentence += (f"no {test} separates it from {', '.join(tied)}" if tied
                 else f"every other student is behind it by the {test}")
    if tied and behind:
        sentence += f"; {', '.join(behind)} {'is' if len(behind) == 1 else 'are'} behind it"
    return sentence + "."


def head_to_head_text(summary: records.RunSummary, every_pair: bool = True) -> str:
    """The head-to-head section of the console and comparison.txt: the ranking, then every pair (`every_pair`) or
    only the pairs that differ; empty for a run without comparisons."""
    comparisons = summary.comparisons
    if comparisons is None:
        return ""
    lines = ["\n" + head_to_head_sentence(comparisons),
             utils.text_table(ranking_columns(comparisons), ranking_rows(comparisons), left=2).rstrip("\n")]
    shown = [pair for pair in comparisons.pairs if every_pair or pair.significant]
    if not shown:
        lines.append(f"No pair differs (smallest {corrected_p_column(comparisons)} "
                     f"{min(pair.p_corrected for pair in comparisons.pairs):.3g}).")
    else:
        lines.append(("Every pair" if every_pair else "Pairs that differ") + " (differences: the first's test top-1 "
                     "minus the second's, in points):")
        lines.append(utils.text_table(pair_columns(comparisons), [pair_cells(pair) for pair in shown]).rstrip("\n"))
    lines.append(f"head to head: {comparison_rule(comparisons, summary.seeds)}")
    return "\n".join(lines) + "\n"


def reading_of_result(summary: records.RunSummary) -> list[str]:
    """A few plain sentences on what distillation bought and what the student costs, from the summary's numbers:
    the verdicts first, then a student costlier than its teacher, then what the student keeps (with chance where
    it is near). A distilled student that has not learned the task (significance.failure) is said to be so."""
    models = summary.models
    teacher, baseline = models.get(records.TEACHER), models.get(records.BASELINE)
    distilled_roles = [role for role in models if records.is_distilled(role)]
    distilled = models[distilled_roles[0]] if distilled_roles else None
    student = distilled or baseline  # every student has the same architecture
    sentences = [] if not baseline else [
        significance.gain_sentence(role, models[role], baseline, summary.seeds,
                                   significance.collapsed_seeds(models[role], baseline, summary.dataset))
        for role in distilled_roles]
    kept = _kept_sentences(summary, teacher, distilled, distilled_roles)
    if distilled and significance.failure(distilled, summary.dataset):
        sentences = kept + sentences  # a verdict on a student that learned nothing is no result: that leads
        kept = []
    costlier = significance.costlier_sentence(student, teacher) if teacher and student else None
    sentences += ([costlier] if costlier else []) + kept
    if teacher and student and student.flops_per_image is not None and teacher.flops_per_image and not costlier:
        ratio = student.flops_per_image / teacher.flops_per_image
        sentences.append(f"The student needs {ratio:.3g}x the teacher's FLOPs per image "
                         f"({student.flops_per_image / 1e9:.3g} vs {teacher.flops_per_image / 1e9:.3g} GFLOPs).")
    clauses = [] if not (teacher and student) else [clause for kind in deploy.SPEED_KINDS
                                                    if (clause := deploy.speed_clause(student, teacher, kind))]
    if clauses:
        sentences.append(f"Measured on {summary.device} against the teacher, the student: {'; '.join(clauses)}.")
    if summary.comparisons is not None:
        sentences.append(head_to_head_sentence(summary.comparisons))
    if summary.sweep is not None:
        sentences.append(findings.summary_sentence(summary.sweep))
    samples = summary.dataset.sizes.get("test")
    if baseline and distilled_roles and samples:
        sentences.append(f"One test image is {100 / samples:.2f} points here.")
    return sentences


def _kept_sentences(summary: records.RunSummary, teacher: records.ModelRow | None,
                    distilled: records.ModelRow | None, roles: list[str]) -> list[str]:
    """What the distilled student keeps of the teacher's top-1 (chance named where the student is near it), or
    that it has not learned the task."""
    if not (teacher and distilled):
        return []
    failed = significance.failure(distilled, summary.dataset)
    if failed:
        return [f"The distilled student ({records.method_of(roles[0])}) {failed}: it has not learned "
                "to tell the classes apart, so its accuracy and its gain are no result (see the warnings)."]
    pooled = distilled.test_top1_mean is not None and len(summary.seeds) > 1  # not the first seed's alone
    chance = significance.chance_level(summary.dataset)
    top1 = distilled.test_top1_mean if pooled else distilled.test["top1"]
    near = top1 < chance + significance.CHANCE_SHOWN_GAP * (1 - chance)
    kept = top1 / teacher.test["top1"] if teacher.test["top1"] else None
    mean = f"its mean over seeds {', '.join(map(str, summary.seeds))} " if pooled else ""
    sentences = [f"The distilled student keeps {utils.format_metric(kept)}% of the teacher's test top-1 "
                 f"({mean}{utils.format_metric(top1)}% vs {utils.format_metric(teacher.test['top1'])}%"
                 + (f", where always answering the most frequent class scores {utils.format_metric(chance)}%"
                    if near else "") + f") with {100 * distilled.params / teacher.params:.0f}% of its parameters."]
    if top1 > teacher.test["top1"]:
        sentences.append("The student outscored its teacher on the test split: the teacher was not the "
                         "stronger model here, so the soft targets carried little extra knowledge.")
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
        if row.gain_top1_mean is not None:
            gain = f"{pooled_gain(row)}; first seed {gain}"

    def median_iqr(median: float | None, iqr: list[float] | None, digits: int) -> str:
        if median is None:
            return "—"
        return f"{median:.{digits}f}" + ("" if iqr is None else " ({:.{d}f}–{:.{d}f})".format(*iqr, d=digits))

    speedups = [{"n/a": "—", "unclear": "unclear (ratios hold 1)", "noisy": "noisy (no claim)"}.get(cell, cell)
                .replace("x", "×") for cell in (deploy.speedup_cell(row, kind, teacher) for kind in deploy.SPEED_KINDS)]
    flops = "—" if row.flops_per_image is None else f"{row.flops_per_image / 1e9:.3g}"
    return [role, row.arch, *(utils.format_metric(row.test.get(k)) for k in metrics),
            f"{row.params:,}", f"{row.size_mb:.1f}", flops, median_iqr(row.latency_ms, row.latency_ms_iqr, 2),
            speedups[0], median_iqr(row.throughput_img_s, row.throughput_img_s_iqr, 1), speedups[1], gain,
            str(row.best_epoch)]


def pooled_gain(row: records.ModelRow) -> str:
    """A distilled student's gain over seeds for the table of models: mean ± sample std, the 95% interval (none
    where every seed gained the same) and the pooled verdict."""
    interval = "" if row.gain_top1_ci95 is None else ", 95% interval [{:+.2f}, {:+.2f}]".format(
        *(100 * bound for bound in row.gain_top1_ci95))
    return (f"over {len(row.gain_top1_by_seed)} seeds {100 * row.gain_top1_mean:+.2f} ± {100 * row.gain_top1_std:.2f}"
            f"{interval}: {significance.verdict(row.gain_top1_p, row.gain_significant)}")


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
    """The report's table of the data: classes, split sizes with each class's count, how validation and test were
    obtained, skipped files."""
    dataset, skipped = summary.dataset, summary.skipped_files
    rows = [(f"classes ({len(dataset.class_names)})", ", ".join(dataset.class_names))]
    counts = dataset.carving.get("class_counts") or {}
    rows += [(f"{split} images", str(size) + ("" if not counts.get(split) else " ({})".format(", ".join(
        f"{name} {count}" for name, count in counts[split].items())))) for split, size in dataset.sizes.items()]
    rows.append(("validation", dataset.validation))
    carved = (("test", "test"), ("train_subset", "training subset"))
    rows += [(label, str(dataset.carving[key])) for key, label in carved if dataset.carving.get(key)]
    listing = "; ".join(f"{item['path']} ({item['reason']})" for item in skipped)
    rows.append(("skipped files", f"{len(skipped)}: {listing}" if skipped else "none"))
    return rows


def read_run_file(path: Path, record: type[records.Record] | None = None) -> Any:
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
    return _png_data_uri(plots.figure_png(plots.per_class_f1_figure(per_class, class_names), dpi=100))


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
    summary = records.RunSummary.from_dict(read_run_file(run_dir / "summary.json"), str(run_dir / "summary.json"))
    config = read_run_file(run_dir / "config.json")
    roles = list(summary.models)
    results = {role: read_run_file(run_dir / role / RESULTS, records.ModelResults) for role in roles}
    histories = {role: read_run_file(run_dir / role / "history.json", records.ModelHistory)["epochs"] for role in roles}
    curves = [{"label": label, "src": _png_data_uri(plots.figure_png(plots.curves_figure(histories, key, key), 100))}
              for key, label in (("loss", "loss (train: training objective, val: CE)"), ("top1", "top-1 accuracy"))]
    confusions = [{"label": role, "src": _png_data_uri(_run_bytes(run_dir / role / "confusion_matrix_test.png"))}
                  for role in roles]
    students = [role for role in roles if role.startswith(records.STUDENT_PREFIX)]
    per_class_f1 = _per_class_f1(results, students, summary.dataset.class_names, run_dir)
    metric = significance.METRIC_NAMES.get(config.get("select_metric", "top1"), config.get("select_metric"))
    models_note = (f"Best epoch chosen on validation {metric} (--select-metric); test metrics of those weights. "
                   f"Latency (batch 1) and throughput (batch {deploy.THROUGHPUT_BATCH}) measured against the teacher "
                   "in alternating rounds; speed-ups: the median over rounds of the teacher's time over the model's, "
                   "each 'unclear' where the interquartile range of the per-round ratios holds 1 and 'noisy' where it "
                   f"stayed wider than {100 * deploy.NOISY_SPREAD:g}% of their median or identical architectures "
                   f"measured apart. Gain verdict: {significance.rule(False)} (first seed).")
    note = precision_note(summary.models)
    if note:
        models_note += f" {note}."
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
        head_to_head=_head_to_head_view(summary),
        test_figure_rows=_test_figure_rows(summary), chosen_on_test=records.CHOSEN_ON_TEST,
        settings_rows=[(key, json.dumps(value)) for key, value in config.items() if key != "dataset"],
    )


def _head_to_head_view(summary: records.RunSummary) -> dict[str, Any] | None:
    """The report's Head to head section: the ranking, the matrix of mean differences (significant cells marked)
    and every pair; None for a run without comparisons."""
    comparisons = summary.comparisons
    if comparisons is None:
        return None
    return {"lead": head_to_head_sentence(comparisons), "rule": comparison_rule(comparisons, summary.seeds),
            "ranking_columns": ranking_columns(comparisons), "ranking_rows": ranking_rows(comparisons),
            "names": [records.method_of(student.role) for student in comparisons.ranking],
            "matrix": difference_matrix(comparisons), "pair_columns": pair_columns(comparisons),
            "pair_rows": [pair_cells(pair) for pair in comparisons.pairs]}


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
