"""The guide cannot rot: every command in README.md and docs/*.md parses, and every relative link resolves.

Each `python experiment.py ...`, `torchrun ... experiment.py ...` and `python prediction_for_one.py ...` in a
fenced code block (continued lines joined, the block's shell variables filled in) or in inline code is parsed
by the program's own parser and, for experiment.py, put through the checks a run makes before any work
(`experiment.checked_settings`: `settings.validate` and the teacher-checkpoint rules; a sweep's spec and
ranges through `search.prepare`). Nothing is trained. What a run learns only by opening a file is stood in
for, so flag names, choices, value types, ranges and combinations are still checked:

- a --teacher-checkpoint file: a description that agrees with the command's settings (the file is not read);
- a --config file: the repository's own (configs/...), a settings file the docs spell out in a block opening
  with `# NAME.yaml`, or else an empty one (a run's config.json that exists only after that run);
- a sweep's --study-storage is not opened; --resume and --report-only RUN folders are not read;
- data folders and weights files are not opened (no check before the run's data loading reads them)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

import experiment
import model_builder
import prediction_for_one
from config import command_line, settings
from sweep import search, study_storage
from training import checkpoints


def test_the_guide_speaks_of_data_a_user_has():
    guide = "\n".join(page.read_text(encoding="utf-8") for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    assert "shared/datasets" not in guide and "/tmp/cifar150" not in guide
    assert "CIFAR-10 as an ImageFolder tree" in guide and "torchvision.datasets import CIFAR10" in guide


ROOT = Path(__file__).resolve().parent.parent


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


SCRIPTS = ("experiment.py", "prediction_for_one.py")


README_MAX_LINES = 250


# Values for shell variables a block uses without defining them (loop variables, the shell's own).
SHELL_VALUES = {"gpu": "0", "PWD": "/tmp", "class": "cat"}


FENCE = re.compile(r"^\s*(```|~~~)")


ASSIGNMENT = re.compile(r"^\s*([A-Za-z_]\w*)=(\"[^\"]*\"|'[^']*'|\S*)\s*$")


VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


PLACEHOLDER = re.compile(r"<([A-Za-z_][\w-]*)>")


INLINE_CODE = re.compile(r"`([^`\n]+)`")


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Command:
    """One documented command: where it is written, which script it runs, and its arguments."""

    where: str
    script: str
    argv: tuple[str, ...]


def split_page(path: Path) -> tuple[list[tuple[int, str]], list[str]]:
    """A page's fenced code blocks (first line number, text) and its prose lines (code blocks blanked)."""
    blocks: list[tuple[int, str]] = []
    prose: list[str] = []
    inside, start, lines = False, 0, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line):
            if inside:
                blocks.append((start, "\n".join(lines)))
            inside, start, lines = not inside, number + 1, []
            prose.append("")
        elif inside:
            lines.append(line)
            prose.append("")
        else:
            prose.append(line)
    return blocks, prose


def fill_in(line: str, variables: dict[str, str]) -> str:
    """The line with its shell variables and <PLACEHOLDER> words replaced by plausible values."""
    line = VARIABLE.sub(lambda m: variables.get(m[1] or m[2], SHELL_VALUES.get(m[1] or m[2], "value")), line)
    return PLACEHOLDER.sub(lambda m: m[1].lower(), line)


def commands_in(text: str, where: str) -> list[Command]:
    """The commands of one shell text: backslash-continued lines joined, variables it assigns filled in."""
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()
    variables = {m[1]: shlex.split(m[2])[0] if m[2] else "" for m in map(ASSIGNMENT.match, lines) if m}
    found = []
    for line in lines:
        line = "" if ASSIGNMENT.match(line) else fill_in(line, variables)
        if not any(script in line for script in SCRIPTS):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        words = list(lexer)
        for index, word in enumerate(words):
            launcher = words[index - 1] if index else ""
            if word in SCRIPTS and (launcher.startswith("python") or "torchrun" in words[:index]):
                argv = []
                for argument in words[index + 1:]:
                    if set(argument) <= set("();<>|&"):
                        break  # the shell's redirections, pipes and separators end the command
                    argv.append(argument)
                found.append(Command(where, word, tuple(argv)))
    return found


def documented_commands() -> list[Command]:
    """Every command in the README and the guide: code blocks, and inline code that starts with one."""
    found = []
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        blocks, prose = split_page(page)
        for start, text in blocks:
            found += commands_in(text, f"{name}:{start}")
        for number, line in enumerate(prose, start=1):
            for code in INLINE_CODE.findall(line):
                if re.match(r"(python3? |torchrun )", code):
                    found += commands_in(code, f"{name}:{number}")
    return found


def documented_files() -> dict[str, str]:
    """Settings files the guide spells out: a code block whose first line is `# NAME.yaml` (or .json)."""
    files = {}
    for page in PAGES:
        for _, text in split_page(page)[0]:
            first, _, body = text.partition("\n")
            named = re.fullmatch(r"#\s*(\S+\.(?:ya?ml|json))\s*", first)
            if named:
                files[named[1]] = body
    return files


COMMANDS = documented_commands()


def stand_in_config(argv: list[str], folder: Path) -> list[str]:
    """argv with its --config FILE pointing at the repository's file, a documented one, or an empty one."""
    argv = list(argv)
    for index, word in enumerate(argv[:-1]):
        if word == "--config":
            name = argv[index + 1]
            path = folder / Path(name).name
            if (ROOT / name).is_file():
                path = ROOT / name
            else:
                path.write_text(documented_files().get(Path(name).name, "{}\n"), encoding="utf-8")
            argv[index + 1] = str(path)
    return argv


def check_experiment(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Parse argv as experiment.py does, then make every check a run makes before it reads data."""
    parser, args, given = command_line.parse_command_line(argv, experiment.default_config())
    if any(args[action] is not None for action in ("report_only", "resume", "track_sync")):
        return  # a finished or interrupted run's folder holds the settings: only the flags can be checked here
    list_layers = args.pop("list_layers")
    if list_layers is not None:
        experiment.layer_list(list_layers, args["image_size"])
        return
    for action in ("config", "report_only", "resume", "track_sync"):
        args.pop(action)
    config = settings.Config(**args)

    def teacher_description(path: str) -> dict[str, object]:
        return {"arch": model_builder.architecture_name(config.teacher_model), "image_size": config.image_size,
                "resize": config.resize, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}

    monkeypatch.setattr(checkpoints, "read_teacher_checkpoint", teacher_description)
    monkeypatch.setattr(study_storage, "connect", lambda storage: None)
    config, _ = experiment.checked_settings(config, given)
    if config.sweep is not None:
        search.prepare(config)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: command.where)
def test_documented_command_parses_and_passes_the_checks(
    command: Command, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    argv = stand_in_config(list(command.argv), tmp_path)
    try:
        if command.script == "prediction_for_one.py":
            assert prediction_for_one.command_line_parser().parse_args(argv).top_k >= 1
        else:
            check_experiment(argv, monkeypatch)
    except SystemExit as stop:
        if stop.code == 0 and {"-h", "--help"} & set(argv):
            return
        pytest.fail(f"{command.where}: {command.script} {' '.join(command.argv)}: the parser refused it "
                    f"(exit {stop.code}; its message is in the captured stderr)")
    except Exception as error:  # a settings check's one sentence names what is wrong
        pytest.fail(f"{command.where}: {command.script} {' '.join(command.argv)}: {error}")


def test_the_guide_documents_every_kind_of_command() -> None:
    """The extraction itself works: README and guide commands of each kind are found."""
    places = {command.where.split(":")[0] for command in COMMANDS}
    assert "README.md" in places and len(places) >= 8
    assert {command.script for command in COMMANDS} == set(SCRIPTS)
    assert any(command.argv[:2] == ("--sweep", "temperature=1:10:log,alpha=0.1:0.9") for command in COMMANDS)
    assert len(COMMANDS) >= 40


def test_help_points_to_every_guide_page_and_its_examples_parse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    named = set(re.findall(r"docs/[\w-]+\.md", command_line.EXAMPLES))
    assert named == {page.relative_to(ROOT).as_posix() for page in PAGES[1:]}
    examples = commands_in(command_line.EXAMPLES, "--help")
    assert len(examples) >= 6
    for command in examples:
        check_experiment(stand_in_config(list(command.argv), tmp_path), monkeypatch)


def test_commands_are_read_as_a_shell_would() -> None:
    text = ('ARGS="--config c.yaml \\\n  --device cuda"\n'
            "python experiment.py $ARGS --seed 1   # a comment\n"
            "CUDA_VISIBLE_DEVICES=$gpu python experiment.py --sweep \"alpha=0.1:0.9\" > log 2>&1 &\n"
            'CMD="python experiment.py --seed 2"\n$CMD > worker1.log 2>&1 &\n'
            "torchrun --nproc_per_node=2 experiment.py --data-dir <DATA>\n"
            "python prediction_for_one.py --model runs/<run>/m.pth a.png | head\n")
    assert [(c.script, c.argv) for c in commands_in(text, "x")] == [
        ("experiment.py", ("--config", "c.yaml", "--device", "cuda", "--seed", "1")),
        ("experiment.py", ("--sweep", "alpha=0.1:0.9")),
        ("experiment.py", ("--seed", "2")),
        ("experiment.py", ("--data-dir", "data")),
        ("prediction_for_one.py", ("--model", "runs/run/m.pth", "a.png")),
    ]


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings: lowercase, punctuation but '-' and '_' dropped,
    spaces to '-', a repeated anchor numbered (-1, -2, ...)."""
    anchors: set[str] = set()
    for line in split_page(path)[1]:
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading[1].lower()).replace(" ", "-")
            anchor, count = slug, 0
            while anchor in anchors:
                count += 1
                anchor = f"{slug}-{count}"
            anchors.add(anchor)
    return anchors


def broken_links(page: Path) -> list[str]:
    """The relative links of a page (outside code) whose file or #anchor does not exist."""
    broken = []
    for number, line in enumerate(split_page(page)[1], start=1):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # http:, https:, mailto: ... are not this repository's
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}:{number}: {target} (no such file)")
            elif anchor and (file.suffix != ".md" or anchor not in heading_anchors(file)):
                broken.append(f"{page.name}:{number}: {target} (no such heading)")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_heading_anchors_follow_githubs_rules(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# CIFAR-10 in torchvision's own format\n## `torch.compile`\n## Notes\n## Notes\n"
                    "```\n# not a heading\n```\n[x](#notes-1) [y](page.md#no-such) [z](gone.md)\n", encoding="utf-8")
    assert heading_anchors(page) == {"cifar-10-in-torchvisions-own-format", "torchcompile", "notes", "notes-1"}
    assert broken_links(page) == ["page.md:8: page.md#no-such (no such heading)", "page.md:8: gone.md (no such file)"]


def test_readme_fits_on_a_few_screens() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES
