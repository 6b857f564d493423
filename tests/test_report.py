"""The HTML report, TensorBoard curves and the ledger of runs."""

import csv
import re
from html.parser import HTMLParser

import markupsafe
import pytest

import experiment
import report
import schema
import utils

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
    for role in report.LEDGER_ROLES:
        row = re.search(rf"<tr><td class=\"name\">{role}</td>(.*?)</tr>", text)
        assert row, role
        for key in utils.shown_metrics(len(summary["dataset"]["class_names"])):  # 3 classes: no top-3
            assert f"<td>{utils.format_metric(summary[role]['test'][key])}</td>" in row.group(1), (role, key)
        assert f"<td>{summary[role]['params']:,}</td>" in row.group(1)
    for sentence in report.reading_of_result(schema.RunSummary.from_dict(summary)):
        assert str(markupsafe.escape(sentence)) in text  # escaped as the template engine escapes every value
    assert "circle, cross, stripes" in text


def test_report_only_reproduces_the_report(tiny_run, capsys):
    original = (tiny_run / "report.html").read_bytes()
    (tiny_run / "report.html").unlink()
    assert experiment.main(["--report-only", str(tiny_run)]) == 0
    assert (tiny_run / "report.html").read_bytes() == original


def test_report_only_needs_a_finished_run(tmp_path, capsys):
    assert experiment.main(["--report-only", str(tmp_path)]) == 2
    assert "not a finished run directory" in capsys.readouterr().err


def test_ledger_gets_one_row_per_run(tiny_run):
    with open(tiny_run.parent / "experiments.csv", newline="", encoding="utf-8") as ledger:
        rows = list(csv.DictReader(ledger))
    summary = utils.read_json(tiny_run / "summary.json")
    assert len(rows) == 1
    assert rows[0]["run_dir"] == str(tiny_run)
    assert float(rows[0]["student_kd_top1"]) == pytest.approx(summary["student_kd"]["test"]["top1"], abs=1e-6)
    assert float(rows[0]["kd_gain_top1"]) == pytest.approx(summary["kd_gain_top1"], abs=1e-6)
    assert rows[0]["alpha"] == "0.5" and rows[0]["temperature"] == "4.0"


def test_concurrent_ledger_appends_keep_whole_rows(tmp_path):
    from multiprocessing import Pool

    path = tmp_path / "experiments.csv"
    with Pool(4) as pool:
        pool.starmap(report.append_ledger, [(path, {"run_dir": f"run{i}", "alpha": i}) for i in range(40)])
    with open(path, newline="", encoding="utf-8") as ledger:
        rows = list(csv.DictReader(ledger))
    assert sorted(r["run_dir"] for r in rows) == sorted(f"run{i}" for i in range(40))
    assert path.read_text().count("finished_at") == 1  # one header


def test_tensorboard_scalars_for_every_model(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for role in report.LEDGER_ROLES:
        events = EventAccumulator(str(tiny_run / "tensorboard" / role))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"lr", "train/loss", "train/top1", "val/loss", "val/top1"} <= tags, role
        assert [e.step for e in events.Scalars("val/top1")] == [1, 2]
    kd_tags = EventAccumulator(str(tiny_run / "tensorboard" / "student_kd"))
    kd_tags.Reload()
    assert {"train/ce", "train/kd"} <= set(kd_tags.Tags()["scalars"])


def test_missing_tensorboard_is_a_clear_error(monkeypatch, capsys, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    assert experiment.main(["--tensorboard", "--output-dir", str(tmp_path / "run")]) == 2
    assert "pip install tensorboard" in capsys.readouterr().err
