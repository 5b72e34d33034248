"""man/p2pfs.1 stays true to the command line: every option each command
takes is named in that command's own entry (or, for the shared peer
options, in the PEER OPTIONS line its entry points to)."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from p2pfs.cli import COMMANDS, build_parser

MAN = Path(__file__).resolve().parent.parent / "man" / "p2pfs.1"


def _plain(roff: str) -> str:
    """The man page's words without font escapes: `\\fB\\-q\\fR` is `-q`."""
    return re.sub(r"\\f[BIRP]", "", roff).replace("\\-", "-").replace("\\~", " ")


def _entries(text: str, names: set[str]) -> dict[str, str]:
    """Each command's entry: from its `.TP` heading to the next command's."""
    heading = re.compile(r"^\.TP\n(?:\.B[IR]? )?\"?(" + "|".join(map(re.escape, names)) + r")\b",
                         re.M)
    starts = [(m.start(), m.group(1)) for m in heading.finditer(text)]
    out: dict[str, str] = {}
    for i, (at, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
        out[name] = out.get(name, "") + text[at:end]
    return out


def _names(text: str, flag: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", text) is not None


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")]


@dataclass
class Page:
    text: str                               # the man page, plain
    parser: argparse.ArgumentParser         # `p2pfs` itself
    commands: dict[str, argparse.ArgumentParser]
    entries: dict[str, str]                 # command name -> its man entry


@pytest.fixture(scope="module")
def page() -> Page:
    text = _plain(MAN.read_text())
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return Page(text, parser, dict(sub.choices), _entries(text, {name for name, _setup in COMMANDS}))


def test_every_option_is_in_its_commands_man_entry(page: Page):
    text, entries = page.text, page.entries
    shared = text[text.index(".TP\nPEER OPTIONS:"):]
    shared = shared[:shared.index("\n.TP\n", 1)]
    takers = shared[shared.index("Options of"):shared.index("See PEERS")]
    takers = set(re.findall(r"^\.BR (.*)$", takers, re.M)[0].replace('"', " ").replace(",", " ")
                 .split()) - {"and"}
    missing = []
    for name, _setup in COMMANDS:
        assert name in entries, f"man p2pfs(1) has no entry for {name}"
        entry = entries[name]
        for flag in _options(page.commands[name]):
            if _names(entry, flag):
                continue
            if name in takers and _names(shared, flag):
                continue
            missing.append(f"{name} {flag}")
    for flag in _options(page.parser):
        if not _names(text[:text.index(".SH COMMANDS")], flag):
            missing.append(f"p2pfs {flag}")
    assert not missing, "not in man p2pfs(1): " + ", ".join(missing)


def test_every_option_a_man_entry_shows_is_taken(page: Page):
    """The other way: a synopsis line names no option its command lacks."""
    wrong = []
    for name, entry in page.entries.items():
        synopsis = entry.split("\n")[1]
        taken = set(_options(page.commands[name]))
        for flag in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", synopsis):
            if flag not in taken:
                wrong.append(f"{name} {flag}")
    assert not wrong, "man p2pfs(1) shows options the command does not take: " + ", ".join(wrong)
