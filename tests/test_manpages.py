"""The man pages netd(8) and netd.yaml(5), generated from README.md by
scripts/manpages.py: they render without a warning, and hold every command, option and
config key the README documents (so neither can drift from the other).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

from netd import cli

sys.path.insert(0, str(REPO / "scripts"))
import manpages  # noqa: E402  (a script, not a package)

pytestmark = pytest.mark.skipif(shutil.which("man") is None,
                                reason="man-db is not installed (scripts/setup.sh --test does)")


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each generated page's name -> its text as `man` shows it at 80 columns, with
    whitespace collapsed; a warning from groff fails here."""
    out = tmp_path_factory.mktemp("man")
    made = subprocess.run([sys.executable, str(REPO / "scripts" / "manpages.py"),
                           "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert sorted(made.stdout.split()) == [str(out / "netd.8"), str(out / "netd.yaml.5")]
    shown = {}
    for page in sorted(out.iterdir()):
        result = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True,
                                text=True, timeout=60, env=dict(os.environ, MANWIDTH="80"))
        assert result.returncode == 0 and result.stderr == "", f"{page.name}:\n{result.stderr}"
        shown[page.name] = " ".join(result.stdout.split())
    return shown


def readme_tables(titles: tuple[str, ...]) -> list[str]:
    """The first cell of every table row in the README sections `titles`."""
    _, sections = manpages.split_sections((REPO / "README.md").read_text())
    cells = []
    for title in titles:
        for line in sections[title]:
            if line.startswith("|") and not set(line) <= set("|-: "):
                cells.append(manpages.table_cells(line)[0])
    return [c for c in cells
            if c not in ("command", "key", "key (per service, or in `defaults:`)", "metric")]


def plain(cell: str) -> str:
    return " ".join(cell.replace("`", "").replace("**", "").split())


def test_netd_8_has_every_command_of_the_readme(pages: dict[str, str]) -> None:
    commands = readme_tables(("Commands",))
    assert len(commands) >= 7, commands
    for command in commands:
        assert plain(command) in pages["netd.8"], f"{command} missing from netd(8)"
    for title in ("SYNOPSIS", "DESCRIPTION", "COMMANDS", "RUNNING NETD AS A SYSTEM SERVICE",
                  "WHAT A CHILD GETS", "LOGS", "SEE ALSO"):
        assert f" {title} " in pages["netd.8"], title


def test_netd_8_has_every_subcommand_and_option_of_the_cli(pages: dict[str, str]) -> None:
    """Every sub-command and option argparse knows is in the page (through the README's
    command table), so a new option cannot go undocumented."""
    parser = cli._parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in subparsers.choices.items():
        assert f"netd {name}" in pages["netd.8"], name
        for action in sub._actions:
            for option in action.option_strings:
                if option.startswith("--") and option not in ("--help", "--config"):
                    assert option in pages["netd.8"], f"netd {name} {option} undocumented"
    assert "--version" in pages["netd.8"] and "-c FILE" in pages["netd.8"]


def test_netd_yaml_5_has_every_config_key_of_the_readme(pages: dict[str, str]) -> None:
    keys = readme_tables(("Configuration reference",
                          "Access control, limits and the PROXY protocol"))
    assert {"to", "pidfile", "listen", "exec", "rlimits", "access: {allow: [...], deny: [...]}"
            } <= {plain(k) for k in keys}, keys
    for key in keys:
        assert re.search(rf"(^| ){re.escape(plain(key))} ", pages["netd.yaml.5"]), \
            f"{key} missing from netd.yaml(5)"
    for section in ("log:", "daemon:", "include:", "defaults:", "services:", "Workers mode"):
        assert f" {section} " in pages["netd.yaml.5"], section
    assert "python: netd.examples.hello:handle" in pages["netd.yaml.5"]  # the example


def test_a_missing_readme_section_is_an_error() -> None:
    page = manpages.Page("x", 5, "x", "x", ("No such section",))
    with pytest.raises(SystemExit, match="no section"):
        manpages.render(page, "# t\n\nintro\n\n## Other\n\ntext\n", "1", "2000-01-01")


def test_markdown_is_turned_into_roff_not_copied() -> None:
    """Inline marks become font changes; option dashes and a leading dot are escaped."""
    roff = manpages.markdown_to_roff([
        "Run `netd check --names` **now**, see [the log](docs/logging.md).",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
        "| `to` | `syslog` | where lines go |",
        "",
        "    .hidden -x",
        "",
        "- one",
        "  more",
    ])
    text = "\n".join(roff)
    assert r"\fBnetd check \-\-names\fR \fBnow\fR, see the log (docs/logging.md)." in text
    assert ".TP\n\\fBto\\fR\nwhere lines go\n.br\nDefault: \\fBsyslog\\fR." in text
    assert "\\&.hidden \\-x" in text
    assert ".IP \\(bu 2\none more" in text
