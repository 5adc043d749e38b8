"""Bash completion for netd (completion/netd.bash), run in a real bash with
bash-completion loaded: the candidates for the command, each command's options (the
same as argparse's, so neither can drift), config files after -c, and the service
names of the config after `netd status`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from netd import cli

BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")
pytestmark = pytest.mark.skipif(not BASH_COMPLETION.exists(),
                                reason="bash-completion is not installed "
                                       "(scripts/setup.sh --test installs it)")


def complete(line: str, cwd: Path | None = None) -> list[str]:
    """The candidates bash offers for `line` (the cursor at its end), as the shell
    computes them: COMP_WORDS split at spaces, then the function `complete -p`
    names for netd."""
    words = line.split(" ")
    script = f"""
        source {BASH_COMPLETION}
        source {REPO / 'completion' / 'netd.bash'}
        spec=$(complete -p netd) || exit 3
        [[ $spec == *"-F _netd netd" ]] || {{ echo "bad spec: $spec" >&2; exit 4; }}
        COMP_LINE=$1; COMP_POINT=${{#COMP_LINE}}
        COMP_WORDS=("${{@:2}}"); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
        _netd netd "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("NETD_CONFIG", None)
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", script, "bash", line,
                             *words], capture_output=True, text=True, timeout=60, env=env,
                            cwd=cwd)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    return sorted(c for c in result.stdout.split("\n") if c)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def long_options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(o for a in parser._actions for o in a.option_strings if o.startswith("--"))


def test_commands_and_global_options() -> None:
    assert complete("netd ") == sorted(subcommands())
    assert complete("netd st") == ["start", "status", "stop"]
    assert complete("netd -") == long_options(cli._parser())


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_each_commands_options_are_argparses(command: str) -> None:
    assert complete(f"netd {command} --") == long_options(subcommands()[command])
    assert complete(f"netd -c x.yaml {command} --") == long_options(subcommands()[command])


def test_config_files_after_c(tmp_path: Path) -> None:
    for name in ("netd.yaml", "other.yml", "notes.txt"):
        (tmp_path / name).write_text("")
    (tmp_path / "services.d").mkdir()
    assert complete("netd check -c ", cwd=tmp_path) == ["netd.yaml", "other.yml", "services.d"]
    assert complete("netd check --config n", cwd=tmp_path) == ["netd.yaml"]


def test_import_completes_any_file(tmp_path: Path) -> None:
    for name in ("finger", "inetd.conf"):
        (tmp_path / name).write_text("")
    assert complete("netd import ", cwd=tmp_path) == ["finger", "inetd.conf"]
    assert complete("netd import finger i", cwd=tmp_path) == ["inetd.conf"]


def test_status_completes_the_configs_service_names(tmp_path: Path) -> None:
    config = tmp_path / "netd.yaml"
    config.write_text("services:\n"
                      "  echo: {listen: 'tcp://127.0.0.1:7', builtin: echo}\n"
                      "  daytime: {listen: 'tcp://127.0.0.1:13', builtin: daytime}\n"
                      "  discard: {listen: 'tcp://127.0.0.1:9', builtin: discard}\n"
                      "  unused: {listen: 'tcp://127.0.0.1:19', builtin: chargen, disable: true}\n")
    # A disabled service too: `netd status` lists it.
    assert complete(f"netd status -c {config} ") == ["daytime", "discard", "echo", "unused"]
    assert complete(f"netd status -c {config} d") == ["daytime", "discard"]
    assert complete(f"netd status -c {config} echo ") == ["daytime", "discard", "echo", "unused"]
    assert complete(f"netd status -c {config} --j") == ["--json"]
    # A config with an error offers nothing rather than the error text.
    config.write_text("services:\n  echo: {listen: 'tpc://x', builtin: echo}\n")
    assert complete(f"netd status -c {config} ") == []
