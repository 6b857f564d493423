"""The report of a finished run: valid self-contained HTML, every model row, --report-only, and every text of the
run's files escaped."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import markupsafe
import pytest
from conftest import assert_one_sentence_exit_2

import experiment
import utils
from core import records
from results import ledger, report

pytestmark = pytest.mark.e2e


def test_the_report_names_the_selection_metric_used(tiny_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    config = utils.read_json(copy / "config.json")
    utils.write_json(copy / "config.json", {**config, "select_metric": "f1_macro"})
    assert "Best epoch chosen on validation macro F1" in report.build_report(copy)


VOID = {"meta", "img", "br", "hr", "link", "input", "source", "col", "area", "base", "wbr", "embed", "param", "track"}


class StructureChecker(HTMLParser):
    """Collects tags and image sources, and checks that every element is closed in order."""

    def __init__(self) -> None:
        super().__init__()
        self.stack, self.errors, self.images, self.links, self.tags = [], [], [], [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()


@pytest.fixture(scope="module")
def report_page(tiny_run):
    text = (tiny_run / "report.html").read_text(encoding="utf-8")
    checker = StructureChecker()
    checker.feed(text)
    checker.close()
    return text, checker


def test_report_is_valid_self_contained_html(report_page):
    text, checker = report_page
    assert text.startswith("<!DOCTYPE html>")
    assert checker.errors == [] and checker.stack == []
    assert {"html", "head", "body", "table", "img", "style"} <= checker.tags
    assert "<script" not in text
    assert len(checker.images) >= 2 + 3 + 1  # curves, three confusion matrices, per-class F1
    for source in checker.images:
        assert source.startswith("data:image/png;base64,") and len(source) > 1000
    assert checker.links == []
    assert not re.search(r"https?://", text), "the report must not reach the network"


def test_report_has_every_model_row_with_summary_numbers(tiny_run, report_page):
    text, _ = report_page
    summary = utils.read_json(tiny_run / "summary.json")
    for role in ledger.LEDGER_ROLES:
        row = re.search(rf"<tr><td class=\"name\">{role}</td>(.*?)</tr>", text)
        assert row, role
        for key in utils.shown_metrics(len(summary["dataset"]["class_names"])):  # 3 classes: no top-3
            assert f"<td>{utils.format_metric(summary[role]['test'][key])}</td>" in row.group(1), (role, key)
        assert f"<td>{summary[role]['params']:,}</td>" in row.group(1)
    for sentence in report.reading_of_result(records.RunSummary.from_dict(summary)):
        assert str(markupsafe.escape(sentence)) in text  # escaped as the template engine escapes every value
    assert "circle, cross, stripes" in text


def test_report_only_reproduces_the_report(tiny_run, capsys):
    original = (tiny_run / "report.html").read_bytes()
    (tiny_run / "report.html").unlink()
    assert experiment.main(["--report-only", str(tiny_run)]) == 0
    assert (tiny_run / "report.html").read_bytes() == original


# ---------------------------------------------------------------- files a user may have edited

SCRIPT = "<script>alert('{}')</script>"


def report_files(run: Path, copy: Path) -> Path:
    """The files --report-only reads, copied from a finished run (its checkpoints are left out)."""
    copy.mkdir()
    for name in ("summary.json", "config.json"):
        shutil.copy(run / name, copy / name)
    for role in ledger.LEDGER_ROLES:
        (copy / role).mkdir()
        for name in (report.RESULTS, "history.json", "confusion_matrix_test.png"):
            shutil.copy(run / role / name, copy / role / name)
    return copy


def edit_json(path: Path, change) -> None:
    data = utils.read_json(path)
    change(data)
    utils.write_json(path, data)


def test_every_text_of_the_files_arrives_escaped(tiny_run, tmp_path, capsys):
    run = report_files(tiny_run, tmp_path / "<script>alert('run')")
    hostile = SCRIPT.format("circle")

    def summary_with_scripts(summary):
        summary["teacher"]["arch"] = SCRIPT.format("arch")
        summary["warnings"].append(SCRIPT.format("warning"))
        summary["dataset"]["class_names"][0] = hostile
        summary["dataset"]["validation"] = SCRIPT.format("validation")
        summary["dataset"]["carving"]["test"] = SCRIPT.format("carving")
        summary["dataset"]["sizes"][SCRIPT.format("split")] = 3
        summary["skipped_files"] = [{"path": SCRIPT.format("path"), "reason": SCRIPT.format("reason")}]
        summary["device"], summary["finished_at"] = SCRIPT.format("device"), SCRIPT.format("finished")

    edit_json(run / "summary.json", summary_with_scripts)
    edit_json(run / "config.json", lambda config: config.update(teacher_model=SCRIPT.format("setting")))
    for role in ledger.LEDGER_ROLES:  # the per-class scores follow the renamed class
        edit_json(run / role / report.RESULTS,
                  lambda results: results["splits"]["test"]["per_class"].update(
                      {hostile: results["splits"]["test"]["per_class"].pop("circle")}))
    assert experiment.main(["--report-only", str(run)]) == 0, capsys.readouterr().err
    text = (run / "report.html").read_text(encoding="utf-8")
    assert "<script" not in text
    for name in ("arch", "warning", "circle", "validation", "carving", "split", "path", "reason", "device", "finished"):
        assert str(markupsafe.escape(SCRIPT.format(name))) in text, name
    assert str(markupsafe.escape("<script>alert('run')")) in text
    assert str(markupsafe.escape(json.dumps(SCRIPT.format("setting")))) in text
    checker = StructureChecker()
    checker.feed(text)
    assert checker.errors == [] and "script" not in checker.tags


@pytest.mark.parametrize("file, change, message", [
    ("summary.json", lambda data: data["student_kd"].update(best_epoch=SCRIPT.format(1)),
     "summary.json: student_kd.best_epoch must be an integer (got \"<script>"),
    ("summary.json", lambda data: data["dataset"]["sizes"].update(test=SCRIPT.format(1)),
     "summary.json.dataset.sizes must be a mapping"),
    ("summary.json", lambda data: data.update(warnings=SCRIPT.format(1)), "summary.json.warnings must be a list"),
    ("summary.json", lambda data: data["teacher"]["test"].pop("top1"), "teacher.test must hold the test top-1"),
    ("summary.json", lambda data: data["teacher"].update(latency_ms_iqr=[1.0]),
     "teacher.latency_ms_iqr must be [low, high] (got [1.0])"),
    ("summary.json", lambda data: data["teacher"].pop("latency_ms"),
     "teacher has 'latency_ms_iqr' without 'latency_ms'"),
    ("summary.json", lambda data: data.update({"../../elsewhere": data["teacher"]}),
     "holds '../../elsewhere', which is neither a field of a run nor a model's role"),
    ("summary.json", lambda data: data.update(skipped_files=[{"path": "x.png"}]),
     "summary.json.skipped_files[0] must hold the file's 'path' and the 'reason'"),
    ("student_kd/history.json", lambda data: data.update(epochs="all"), "history.json.epochs must be a list"),
    ("teacher/history.json", lambda data: data["epochs"][1].pop("val"), "history.json.epochs[1] lacks its field 'val'"),
    ("student_baseline/results.json", lambda data: data["splits"]["test"].update(per_class=[1]),
     "results.json.splits.test.per_class must be a mapping"),
    ("student_baseline/results.json", lambda data: data["splits"]["test"]["per_class"].pop("cross"),
     "results.json' has no test F1 of class 'cross'"),
])
def test_report_only_refuses_fields_that_do_not_fit_in_one_sentence(tiny_run, tmp_path, capsys, file, change, message):
    run = report_files(tiny_run, tmp_path / "run")
    edit_json(run / file, change)
    code = experiment.main(["--report-only", str(run)])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, f"--report-only '{run}': ", str(run / file), message)
    assert not (run / "report.html").exists()


@pytest.mark.parametrize("file, content, message", [
    ("summary.json", b"", "cannot read '{}' (Expecting value"),
    ("config.json", b"[1, 2]", "'{}' must hold a mapping, not list"),
    ("teacher/results.json", b"{\"splits\": ", "cannot read '{}' (Expecting value"),
    ("student_kd/history.json", None, "cannot read '{}' (No such file or directory)"),
    ("teacher/confusion_matrix_test.png", None, "cannot read '{}' (No such file or directory)"),
])
def test_report_only_refuses_missing_or_damaged_files_in_one_sentence(tiny_run, tmp_path, capsys, file, content,
                                                                     message):
    run = report_files(tiny_run, tmp_path / "run")
    if content is None:
        (run / file).unlink()
    else:
        (run / file).write_bytes(content)
    code = experiment.main(["--report-only", str(run)])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, f"--report-only '{run}': ", message.format(run / file))
