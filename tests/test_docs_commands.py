"""Every `mixres ...` command shown in README.md and docs/*.md still parses with the real
command-line parsers (argparse, nothing runs): a renamed or dropped flag breaks this test,
not the reader who copies the line."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mixres.bench.cli import benchmark_parser
from mixres.cli import SUBCOMMANDS, subcommand_parser

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^\s*(```|~~~)")


# a line the program printed ("mixres embed: 9 images ..."), shown beside the commands
OUTPUT = re.compile(r"mixres [\w-]+: ")


def shown_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) of each line of a fenced block that starts with `mixres `;
    a trailing backslash continues the command on the next line."""
    out, inside, pending = [], False, None
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside, pending = not inside, None
            continue
        if not inside:
            continue
        stripped = line.strip()
        if pending is not None:
            pending = (pending[0], pending[1] + " " + stripped.removesuffix("\\"))
        elif stripped.startswith("mixres ") and not OUTPUT.match(stripped):
            pending = (number, stripped.removesuffix("\\"))
        if pending is not None and not stripped.endswith("\\"):
            out.append(pending)
            pending = None
    return out


def parse(command: str) -> None:
    """Parse one shown command as `mixres` would; an error raises SystemExit(2)."""
    argv = shlex.split(command, comments=True)[1:]
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        raise SystemExit(f"unknown command {name!r}")
    if "-h" in rest or "--help" in rest:
        return  # help is printed and exits 0; the subcommand's name is what can break
    _, parser = subcommand_parser(name)
    args = parser.parse_args(rest)
    if name == "bench":
        _, inner = benchmark_parser(args.benchmark)
        if inner is not None:
            inner.parse_args(args.args)


def _pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "CONTRIBUTING.md"]


CASES = [(f"{page.relative_to(REPO)}:{n}", cmd) for page in _pages() if page.is_file()
         for n, cmd in shown_commands(page.read_text())]


def test_the_pages_show_commands():
    assert len(CASES) >= 10, CASES


@pytest.mark.parametrize("where,command", CASES, ids=[w for w, _ in CASES])
def test_shown_command_parses(where, command):
    try:
        parse(command)
    except SystemExit as e:
        pytest.fail(f"{where}: {command!r} does not parse ({e.code})")


def test_a_broken_command_is_caught():
    with pytest.raises(SystemExit):
        parse("mixres train --no-such-flag")
    with pytest.raises(SystemExit):
        parse("mixres bench words --no-such-flag")
    assert shown_commands("```\nmixres embed a \\\n  --out b   # note\n```\nmixres x\n") == [
        (2, "mixres embed a  --out b   # note")]
