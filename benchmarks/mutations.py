"""Break the code on purpose and see whether the tests notice (a check, not a test): issue 34's mutations.

    python benchmarks/mutations.py [--only TEXT] [--timeout SECONDS]

Each mutation is (file, exact old text, new text, the tests that must catch it). For each, the tracked files
(`git ls-files`, as they are in the working tree) are copied to a temporary folder, the old text is replaced once,
and the named tests run there (one process, `-x`, a time limit). A mutation is caught when they fail. Text that is
no longer in its file says "mutation site not found" and counts as not caught: a moved function needs its
mutation updated here. The named tests are first run on an unchanged copy: a failure there is a broken test, not a
caught mutation, and stops the script.

One line per mutation, then `MUTATIONS tried=N caught=N`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    """A broken change: `old` replaced by `new` in `path`, which `tests` (pytest node ids or `file -k expr`) catch."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


CIFAR, REFUSALS = "tests/data/test_cifar_files.py", "tests/e2e/test_refusals.py"
PREDICTION, SWEEP_RUNS = "tests/test_prediction_for_one.py", "tests/e2e/test_sweep.py"
MUTATIONS = [
    Mutation("cifar: any global of numpy/builtins/_codecs admitted", "data/cifar_files.py",
             "if (module, name) not in ADMITTED:",
             'if module.split(".")[0] not in {"numpy", "builtins", "__builtin__", "_codecs"}:',
             (CIFAR, "-k", "admitted")),
    Mutation("cifar: label-range check disabled", "data/cifar_files.py",
             "elif problem is None and len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:",
             "elif False:", (CIFAR, "-k", "labels")),
    Mutation("cifar: memory-budget check disabled", "data/cifar_files.py",
             "    if needed > memory_budget_mb:\n", "    if False:\n", (CIFAR, "-k", "budget")),
    Mutation("cifar: nesting unbounded", "data/pickle_limits.py", "if deepest > MAX_NESTING:", "if False:",
             (REFUSALS, "-k", "one_short_sentence and deep")),
    Mutation("cifar: bytearray unguarded", "data/cifar_files.py", '"bytearray": pickle_limits.from_text, ', "",
             (f"{REFUSALS}::test_crafted_cifar_files_are_refused_within_1_gb",)),
    Mutation("cifar: ndarray callable", "data/cifar_files.py", '"ndarray": lambda _: pickle_limits.NdarrayName(), ',
             "", (f"{REFUSALS}::test_crafted_cifar_files_are_refused_within_1_gb",)),
    Mutation("sweep: trial context asks for the test loader", "sweep/search.py",
             "trial_context(self.context, self.dataset, config, test=False)",
             "trial_context(self.context, self.dataset, config, test=True)",
             (f"{SWEEP_RUNS}::test_the_objective_never_reads_the_test_split",)),
    Mutation("settings: --eval-test-every-epoch with --sweep allowed", "config/settings.py",
             "(config.sweep is None or not config.eval_test_every_epoch,", "(True,",
             ("tests/config/test_settings.py::test_the_test_split_with_a_sweep_is_refused",)),
    Mutation("sweep: _scrubbed returns its text unchanged", "sweep/study_storage.py",
             '    return re.sub(r"\\s*\\(Background on this error at: \\S+\\)", "", secrets.scrubbed(text, url))',
             "    return text", ("tests/sweep/test_study_storage.py", "-k", "error_quoting")),
    Mutation("secrets: keys judged undecoded", "core/secrets.py",
             "return bool(SECRET_KEY.search(urllib.parse.unquote_plus(key)))", "return bool(SECRET_KEY.search(key))",
             ("tests/config/test_settings.py", "-k", "spelled")),
    Mutation("sweep: 'belongs to another sweep' disabled", "sweep/search.py",
             'if saved is not None and saved != {"spec": plan.spec, "metric": plan.metric}:', "if False:",
             (SWEEP_RUNS, "-k", "refused_study")),
    Mutation("sweep: 'settings differ' (joins_run) disabled", "sweep/search.py",
             "    if differ:\n        raise SettingsError(", "    if False:\n        raise SettingsError(",
             (SWEEP_RUNS, "-k", "other_settings")),
    Mutation("sweep: 'trials in another run directory' disabled", "sweep/search.py",
             "if run_id is not None and (not id_file.is_file() or id_file.read_text() != run_id):", "if False:",
             (SWEEP_RUNS, "-k", "refused_study")),
    Mutation("sweep: '..' passes the study-name check", "sweep/search.py", 'r"\\w[\\w.-]*"', 'r"[\\w.-]+"',
             (REFUSALS, "-k", "plain_name")),
    Mutation("checkpoints: std checked for 0 not in value", "training/checkpoints.py",
             "_are_numbers(value, 3) and min(value) >= SMALLEST_STD", "_are_numbers(value, 3) and 0 not in value",
             (PREDICTION, "-k", "unusable_names_std_or_size")),
    Mutation("checkpoints: image-size lower bound dropped", "training/checkpoints.py",
             "_is_integer(value) and SMALLEST_IMAGE <= value <= LARGEST_IMAGE",
             "_is_integer(value) and value <= LARGEST_IMAGE", (PREDICTION, "-k", "unusable_names_std_or_size")),
    Mutation("checkpoints: repeated class names accepted", "data/folders.py",
             "len(set(map(repr, value))) == len(value)", "True", (PREDICTION, "-k", "unusable_names_std_or_size")),
    Mutation("prediction: class names printed raw", "prediction_for_one.py",
             "{utils.printable(entry['class']):<20}", "{entry['class']:<20}", (PREDICTION, "-k", "console")),
    Mutation("prediction: formula cells written as they are", "utils.py",
             """return "'" + text if text.startswith(FORMULA_STARTS) else text""", "return text",
             (PREDICTION, "-k", "spreadsheet")),
    Mutation("report: raw class names in classification_report", "utils.py",
             "target_names=[printable(name) for name in class_names],", "target_names=list(class_names),",
             ("tests/test_utils.py", "-k", "classification_report")),
    Mutation("significance: max -> min for zero-spread verdicts", "results/significance.py",
             "largest = max(mcnemar.values())", "largest = min(mcnemar.values())",
             ("tests/results/test_significance.py", "-k", "zero_spread")),
    Mutation("ledger: a torn row appended to", "results/ledger.py", " and _ends_whole(path)", "",
             ("tests/results/test_ledger.py", "-k", "cut_mid_row")),
    Mutation("resume: a torn summary.json counts as finished", "config/command_line.py",
             'if utils.holds_json(path / "summary.json"):', 'if (path / "summary.json").is_file():',
             ("tests/e2e/test_resume.py", "-k", "torn")),
    Mutation("ledger: a rebuilt run's second row appended", "results/ledger.py", " and not _holds_run(path, row)", "",
             ("tests/e2e/test_resume.py", "-k", "torn")),
    Mutation("resume: orphaned temporary files kept", "experiment.py",
             "orphans = utils.remove_orphans(run_dir) if resume and not joining else []", "orphans = []",
             ("tests/e2e/test_interrupted_writes.py",)),
    Mutation("resume: a restart from epoch 1 unsaid", "training/model_run.py",
             "if state_path.parent.is_dir() and compute.is_main_process():", "if False:",
             ("tests/e2e/test_interrupted_writes.py",)),
    Mutation("signals: SIGTERM handled though inherited as ignored", "training/checkpoints.py",
             "and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:", ":",
             ("tests/e2e/test_resume.py", "-k", "inherited")),
]


def copy_repo(target: Path) -> None:
    """The tracked files, as they are in the working tree, copied under `target`."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def run_tests(repo: Path, tests: tuple[str, ...], timeout: float) -> tuple[bool, str]:
    """Whether the tests passed in `repo`, and the last line pytest printed (or why it stopped)."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:xdist", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:g} s"
    if done.returncode < 0:  # a crash (an unbounded pickle overflows the C stack) fails as surely
        return False, f"crashed (signal {-done.returncode})"
    lines = (done.stdout + done.stderr).strip().splitlines() or [f"exit {done.returncode}"]
    return done.returncode == 0, lines[-1][:150]


def try_mutation(mutation: Mutation, timeout: float) -> tuple[bool, str]:
    """Whether the mutation is caught, and what showed it."""
    with tempfile.TemporaryDirectory(prefix="mutation-") as folder:
        repo = Path(folder)
        copy_repo(repo)
        path = repo / mutation.path
        text = path.read_text() if path.is_file() else ""
        if mutation.old not in text:
            return False, f"mutation site not found in {mutation.path}"
        path.write_text(text.replace(mutation.old, mutation.new, 1))
        passed, last = run_tests(repo, mutation.tests, timeout)
        return not passed, last


def check_unchanged(mutations: list[Mutation], timeout: float) -> None:
    """Every named test passes on the unchanged code (else a caught mutation would prove nothing)."""
    with tempfile.TemporaryDirectory(prefix="mutation-") as folder:
        copy_repo(Path(folder))
        for tests in dict.fromkeys(mutation.tests for mutation in mutations):
            passed, last = run_tests(Path(folder), tests, timeout)
            if not passed:
                sys.exit(f"The unchanged code fails {' '.join(tests)} ({last}): fix that first.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="try only the mutations whose name holds this text")
    parser.add_argument("--timeout", type=float, default=400, help="seconds for one run of the tests")
    args = parser.parse_args()
    chosen = [mutation for mutation in MUTATIONS if args.only in mutation.name]
    check_unchanged(chosen, args.timeout)
    caught = 0
    for mutation in chosen:
        was_caught, last = try_mutation(mutation, args.timeout)
        caught += was_caught
        print(f"{'caught' if was_caught else 'NOT CAUGHT'}: {mutation.name} ({mutation.path}) | {last}", flush=True)
    print(f"MUTATIONS tried={len(chosen)} caught={caught}")


if __name__ == "__main__":
    main()
