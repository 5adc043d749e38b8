"""`netd check -c FILE` on config files written by each test: what is accepted, and
how every kind of mistake is reported (FILE:LINE: dotted.key: message, exit 78).

Line numbers are not counted by hand: `line_of(text, needle)` finds them in the text
the test wrote, so each assertion says "the error is on the line holding X".
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, Netd, connect, free_port, output, recv_all, run_netd

EX_CONFIG = 78
ERROR_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?P<rest>.*)$")
HANDLER_MODULE = "netd_test_config_handler"


@dataclass(frozen=True)
class ConfigErrorLine:
    """One `FILE:LINE: rest` line of `netd check` stderr, with FILE resolved."""

    path: Path
    line: int
    rest: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rest}"


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """The 1-based number of the nth line of `text` that contains `needle`."""
    seen = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            seen += 1
            if seen == nth:
                return number
    raise AssertionError(f"{needle!r} not in the test's own config text")


def write(path: Path, body: str) -> tuple[Path, str]:
    """Write dedented `body` to `path` (making parent dirs); return the path and text."""
    text = textwrap.dedent(body).lstrip("\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path, text


def check(config: Path, cwd: Path, env: dict[str, str] | None = None,
          timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run `netd check -c CONFIG` from `cwd`."""
    return run_netd("check", "-c", str(config), cwd=cwd, env=env, timeout_s=timeout_s)


def check_ok(config: Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    """`netd check` must accept the config; returns its stdout."""
    result = check(config, cwd, env)
    assert result.returncode == 0, output(result)
    assert "Traceback" not in result.stdout + result.stderr, output(result)
    return result.stdout


def check_fails(config: Path, cwd: Path, env: dict[str, str] | None = None,
                timeout_s: float = 30.0) -> list[ConfigErrorLine]:
    """`netd check` must reject the config with exit 78 and no traceback; returns its errors."""
    result = check(config, cwd, env, timeout_s)
    assert result.returncode == EX_CONFIG, output(result)
    assert "Traceback" not in result.stdout + result.stderr, output(result)
    errors = []
    for raw in result.stderr.splitlines():
        match = ERROR_LINE.match(raw)
        if match:
            errors.append(ConfigErrorLine((cwd / match["file"]).resolve(), int(match["line"]),
                                          match["rest"]))
    assert errors, f"no FILE:LINE: error on stderr\n{output(result)}"
    return errors


def find_error(errors: list[ConfigErrorLine], path: Path, line: int, key: str | None = None,
               ) -> str:
    """The message of the error at path:line for `key` (None: any); fails listing them all."""
    for error in errors:
        if error.path != path.resolve() or error.line != line:
            continue
        if key is None:
            return error.rest
        if error.rest.startswith(f"{key}: "):
            return error.rest[len(key) + 2:]
    shown = "\n".join(str(e) for e in errors)
    raise AssertionError(f"no error at {path}:{line} for key {key!r}; got:\n{shown}")


def env_with_module_path(directory: Path) -> dict[str, str]:
    """An environment whose PYTHONPATH has the repo (for netd) and `directory` (handlers)."""
    return {"PYTHONPATH": os.pathsep.join([str(REPO), str(directory)])}


def write_handler_module(directory: Path) -> None:
    (directory / f"{HANDLER_MODULE}.py").write_text(
        '"""A python handler for config tests."""\n\n\n'
        "def handle(conn, peer):\n"
        "    conn.sendall(b'hello\\n')\n")


# --- accepted configs -------------------------------------------------------------


def test_valid_config_with_every_key_lists_services_and_addresses(tmp_path: Path) -> None:
    """Every documented key at once: exit 0, each service and its addresses on stdout."""
    write_handler_module(tmp_path)
    config, _ = write(tmp_path / "netd.yaml", f"""
        log:
          to: stderr
          syslog_address: /dev/log
          facility: local3
          level: debug
        include:
          - services.d/*.yaml
        defaults:
          env:
            LANG: C
          stderr: log
          timeout: 5m
          backlog: 64
        services:
          echo:
            listen: tcp://127.0.0.1:7101
            builtin: echo
          cat:
            listen:
              - tcp://127.0.0.1:7102
              - unix:{tmp_path}/cat.sock
            exec: [/bin/cat, "-u"]
            wait: false
            env:
              FOO: bar
            stderr: log
            timeout: 10s
            backlog: 16
          hello:
            listen: tcp://127.0.0.1:7103
            python: {HANDLER_MODULE}:handle
            timeout: 500ms
          dgram:
            listen: unix-dgram:{tmp_path}/dgram.sock
            exec: [/bin/cat]
            wait: true
        """)
    write(tmp_path / "services.d" / "10-chargen.yaml", """
        services:
          chargen:
            listen: udp://127.0.0.1:7104
            builtin: chargen
        """)
    stdout = check_ok(config, tmp_path, env_with_module_path(tmp_path))
    for name in ("echo", "cat", "hello", "dgram", "chargen"):
        assert name in stdout, stdout
    for address in ("127.0.0.1:7101", "127.0.0.1:7102", f"{tmp_path}/cat.sock",
                    "127.0.0.1:7103", f"{tmp_path}/dgram.sock", "127.0.0.1:7104"):
        assert address in stdout, stdout


def test_stderr_null_is_accepted(tmp_path: Path) -> None:
    """`stderr: null` as the docs write it (YAML null) and as a string both mean discard."""
    config, _ = write(tmp_path / "netd.yaml", """
        defaults:
          stderr: null
        services:
          plain:
            listen: tcp://127.0.0.1:7105
            exec: [/bin/cat]
            stderr: null
          quoted:
            listen: tcp://127.0.0.1:7106
            exec: [/bin/cat]
            stderr: "null"
        """)
    stdout = check_ok(config, tmp_path)
    assert "plain" in stdout and "quoted" in stdout, stdout


def test_empty_config_is_valid(tmp_path: Path) -> None:
    """A file with no services is a valid (if idle) config."""
    config, _ = write(tmp_path / "netd.yaml", "# nothing yet\n")
    check_ok(config, tmp_path)


def test_sections_left_empty_are_accepted(tmp_path: Path) -> None:
    """A section with everything under it commented out (YAML null) means empty."""
    config, _ = write(tmp_path / "netd.yaml", """
        defaults:
        #  timeout: 5m
        include: [services.d/*.yaml]
        services:
        #  echo:
        #    listen: tcp://127.0.0.1:7107
        #    builtin: echo
        """)
    write(tmp_path / "services.d" / "disabled.yaml", """
        services:
        #  cat:
        #    listen: tcp://127.0.0.1:7108
        #    exec: [/bin/cat]
        """)
    check_ok(config, tmp_path)


# --- unknown keys -----------------------------------------------------------------


@pytest.mark.parametrize(("body", "needle", "key", "hint"), [
    ("""
     servics: {}
     services:
       echo:
         listen: tcp://127.0.0.1:7110
         builtin: echo
     """, "servics", "servics", "services"),
    ("""
     log:
       to: stderr
       levle: debug
     """, "levle", "log.levle", "level"),
    ("""
     services:
       echo:
         lisen: tcp://127.0.0.1:7110
         listen: tcp://127.0.0.1:7111
         builtin: echo
     """, "lisen", "services.echo.lisen", "listen"),
    ("""
     defaults:
       tmeout: 5m
     """, "tmeout", "defaults.tmeout", "timeout"),
], ids=["top", "log", "service", "defaults"])
def test_unknown_key_names_line_key_and_hint(tmp_path: Path, body: str, needle: str, key: str,
                                             hint: str) -> None:
    """An unknown key is reported at its own line, dotted, with a 'did you mean' hint."""
    config, text = write(tmp_path / "netd.yaml", body)
    errors = check_fails(config, tmp_path)
    message = find_error(errors, config, line_of(text, needle), key)
    assert f"did you mean '{hint}'" in message, message


def test_every_error_reported_at_once_including_included_files(tmp_path: Path) -> None:
    """Errors in the main file and an included file all come out in one run."""
    config, text = write(tmp_path / "netd.yaml", """
        include: [services.d/*.yaml]
        services:
          echo:
            listen: tcp://127.0.0.1:0
            builtin: echo
          cat:
            listen: tcp://127.0.0.1:7120
            exec: [/bin/cat]
            timeout: forever
          other:
            listen: tcp://127.0.0.1:7121
            builtin: echo
            bakclog: 10
        """)
    included, included_text = write(tmp_path / "services.d" / "extra.yaml", """
        services:
          extra:
            listen: tcp://127.0.0.1:7122
            builtin: nosuchbuiltin
        """)
    errors = check_fails(config, tmp_path)
    expected = [
        (config, line_of(text, ":0"), "services.echo.listen"),
        (config, line_of(text, "forever"), "services.cat.timeout"),
        (config, line_of(text, "bakclog"), "services.other.bakclog"),
        (included, line_of(included_text, "nosuchbuiltin"), "services.extra.builtin"),
    ]
    for path, line, key in expected:
        find_error(errors, path, line, key)
    assert len(errors) == len(expected), "\n".join(str(e) for e in errors)


# --- durations --------------------------------------------------------------------


@pytest.mark.parametrize("value", ["10s", "500ms", "2m", "1h", "30", "0.5"])
def test_durations_accepted(tmp_path: Path, value: str) -> None:
    """10s, 500ms, 2m, 1h and bare numbers of seconds are durations."""
    config, _ = write(tmp_path / "netd.yaml", f"""
        defaults:
          timeout: {value}
        services:
          echo:
            listen: tcp://127.0.0.1:7130
            builtin: echo
            timeout: {value}
        """)
    check_ok(config, tmp_path)


@pytest.mark.parametrize("value", ["10 parsecs", "-5", "soon", "5 m s"])
def test_bad_duration_names_the_key(tmp_path: Path, value: str) -> None:
    """A duration that is not one is an error at its line naming the key."""
    config, text = write(tmp_path / "netd.yaml", f"""
        services:
          echo:
            listen: tcp://127.0.0.1:7131
            builtin: echo
            timeout: {value}
        """)
    errors = check_fails(config, tmp_path)
    find_error(errors, config, line_of(text, "timeout"), "services.echo.timeout")


def test_bad_duration_in_defaults_names_defaults_key(tmp_path: Path) -> None:
    """A bad defaults.timeout is reported against defaults.timeout, on its line."""
    config, text = write(tmp_path / "netd.yaml", """
        defaults:
          timeout: 10 parsecs
        services:
          echo:
            listen: tcp://127.0.0.1:7132
            builtin: echo
        """)
    errors = check_fails(config, tmp_path)
    find_error(errors, config, line_of(text, "parsecs"), "defaults.timeout")


# --- listen -----------------------------------------------------------------------


def test_bad_scheme_names_the_valid_schemes(tmp_path: Path) -> None:
    """tpc:// is reported with the schemes that would work."""
    config, text = write(tmp_path / "netd.yaml", """
        services:
          echo:
            listen: tpc://127.0.0.1:7140
            builtin: echo
        """)
    errors = check_fails(config, tmp_path)
    message = find_error(errors, config, line_of(text, "tpc://"), "services.echo.listen")
    assert "tpc" in message, message
    for scheme in ("tcp", "udp", "unix", "unix-dgram"):
        assert re.search(rf"(?<![\w-]){re.escape(scheme)}(?![\w-])", message), message


@pytest.mark.parametrize("port", ["0", "70000", "65536"])
def test_port_out_of_range(tmp_path: Path, port: str) -> None:
    """Ports outside 1-65535 are errors naming the key and the range."""
    config, text = write(tmp_path / "netd.yaml", f"""
        services:
          echo:
            listen: tcp://127.0.0.1:{port}
            builtin: echo
        """)
    errors = check_fails(config, tmp_path)
    message = find_error(errors, config, line_of(text, "listen"), "services.echo.listen")
    assert "range" in message or "65535" in message, message


def test_port_by_service_name_resolves(tmp_path: Path) -> None:
    """tcp://127.0.0.1:echo is port 7 (/etc/services) in the check output."""
    config, _ = write(tmp_path / "netd.yaml", """
        services:
          named:
            listen: tcp://127.0.0.1:echo
            builtin: echo
        """)
    stdout = check_ok(config, tmp_path)
    assert re.search(r"127\.0\.0\.1:7(?!\d)", stdout), stdout


def test_unknown_port_name_is_an_error(tmp_path: Path) -> None:
    """A port name not in /etc/services is an error on its line."""
    config, text = write(tmp_path / "netd.yaml", """
        services:
          named:
            listen: tcp://127.0.0.1:nosuchservicename
            builtin: echo
        """)
    errors = check_fails(config, tmp_path)
    message = find_error(errors, config, line_of(text, "nosuch"), "services.named.listen")
    assert "nosuchservicename" in message, message


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_in_brackets(tmp_path: Path) -> None:
    """tcp://[::1]:PORT is accepted and listed as ::1."""
    config, _ = write(tmp_path / "netd.yaml", """
        services:
          six:
            listen: tcp://[::1]:7141
            builtin: echo
        """)
    stdout = check_ok(config, tmp_path)
    assert "::1" in stdout and "7141" in stdout, stdout


def test_ipv6_without_brackets_is_an_error(tmp_path: Path) -> None:
    """tcp://::1:7 is ambiguous and rejected at its line."""
    config, text = write(tmp_path / "netd.yaml", """
        services:
          six:
            listen: tcp://::1:7142
            builtin: echo
        """)
    errors = check_fails(config, tmp_path)
    find_error(errors, config, line_of(text, "::1"), "services.six.listen")


def test_list_of_addresses_and_names_resolved(tmp_path: Path) -> None:
    """A list of addresses is accepted; a host name is resolved to its address."""
    config, _ = write(tmp_path / "netd.yaml", """
        services:
          multi:
            listen:
              - tcp://127.0.0.1:7143
              - udp://127.0.0.1:7144
              - tcp://localhost:7145
            builtin: echo
        """)
    stdout = check_ok(config, tmp_path)
    for address in ("127.0.0.1:7143", "127.0.0.1:7144", "127.0.0.1:7145"):
        assert address in stdout, stdout


def test_bad_item_in_address_list_reported_at_its_line(tmp_path: Path) -> None:
    """In a list of addresses, the bad one is reported at its own line."""
    config, text = write(tmp_path / "netd.yaml", """
        services:
          multi:
            listen:
              - tcp://127.0.0.1:7146
              - tcp://127.0.0.1:99999
            builtin: echo
        """)
    errors = check_fails(config, tmp_path)
    find_error(errors, config, line_of(text, "99999"), "services.multi.listen")


def test_unresolvable_host_is_an_error(tmp_path: Path) -> None:
    """A host name that does not resolve (.invalid never does) is a config error."""
    config, text = write(tmp_path / "netd.yaml", """
        services:
          far:
            listen: tcp://no-such-host.invalid:7147
            builtin: echo
        """)
    errors = check_fails(config, tmp_path)
    message = find_error(errors, config, line_of(text, "invalid"), "services.far.listen")
    assert "no-such-host.invalid" in message, message


# --- handlers ---------------------------------------------------------------------


def test_no_handler_is_an_error(tmp_path: Path) -> None:
    """A service with none of builtin/exec/python is reported at the service."""
    config, text = write(tmp_path / "netd.yaml", """
        services:
          idle:
            listen: tcp://127.0.0.1:7150
        """)
    errors = check_fails(config, tmp_path)
    matching = [e for e in errors if e.path == config and e.rest.startswith("services.idle")]
    assert matching, "\n".join(str(e) for e in errors)
    assert matching[0].line == line_of(text, "idle:"), matching
    for word in ("builtin", "exec", "python"):
        assert word in matching[0].rest, matching[0]


def test_two_handlers_is_an_error(tmp_path: Path) -> None:
    """builtin and exec together is an error naming both."""
    config, text = write(tmp_path / "netd.yaml", """
        services:
          greedy:
            listen: tcp://127.0.0.1:7151
            builtin: echo
            exec: [/bin/cat]
        """)
    errors = check_fails(config, tmp_path)
    matching = [e for e in errors if e.path == config and e.rest.startswith("services.greedy")]
    assert matching, "\n".join(str(e) for e in errors)
    places = {line_of(text, "greedy:"), line_of(text, "builtin:"), line_of(text, "exec:")}
    assert matching[0].line in places, matching
    assert "builtin" in matching[0].rest and "exec" in matching[0].rest, matching[0]


def test_unknown_builtin_lists_valid_ones(tmp_path: Path) -> None:
    """An unknown builtin name is reported with the builtins that exist."""
    config, text = write(tmp_path / "netd.yaml", """
        services:
          bad:
            listen: tcp://127.0.0.1:7152
            builtin: ecko
        """)
    errors = check_fails(config, tmp_path)
    message = find_error(errors, config, line_of(text, "ecko"), "services.bad.builtin")
    for name in ("echo", "discard", "chargen", "daytime", "time"):
        assert name in message, message


@pytest.mark.parametrize("program", ["/nonexistent/prog", "no-such-program-netd-test"])
def test_exec_missing_binary_named(tmp_path: Path, program: str) -> None:
    """exec of a program that does not exist is a config error naming the program."""
    config, text = write(tmp_path / "netd.yaml", f"""
        services:
          gone:
            listen: tcp://127.0.0.1:7153
            exec: [{program}, --flag]
        """)
    errors = check_fails(config, tmp_path)
    message = find_error(errors, config, line_of(text, "exec:"), "services.gone.exec")
    assert program in message, message


def test_exec_not_executable_is_an_error(tmp_path: Path) -> None:
    """exec of a file without execute permission is a config error."""
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    config, text = write(tmp_path / "netd.yaml", f"""
        services:
          noexec:
            listen: tcp://127.0.0.1:7154
            exec: [{script}]
        """)
    errors = check_fails(config, tmp_path)
    message = find_error(errors, config, line_of(text, "exec: ["), "services.noexec.exec")
    assert str(script) in message, message


def test_exec_not_a_list_is_a_type_error(tmp_path: Path) -> None:
    """exec: /bin/cat (a string, not an argv list) is a type error at its line."""
    config, text = write(tmp_path / "netd.yaml", """
        services:
          cat:
            listen: tcp://127.0.0.1:7155
            exec: /bin/cat
        """)
    errors = check_fails(config, tmp_path)
    message = find_error(errors, config, line_of(text, "exec:"), "services.cat.exec")
    assert "list" in message, message


@pytest.mark.parametrize(("spec", "word"), [
    ("nosuchmodule:handle", "nosuchmodule"),
    ("os:nosuchfunction", "nosuchfunction"),
    ("no_colon_here", "no_colon_here"),
])
def test_python_handler_checked_at_load(tmp_path: Path, spec: str, word: str) -> None:
    """A python handler that cannot be imported or found is a config error in check."""
    config, text = write(tmp_path / "netd.yaml", f"""
        services:
          py:
            listen: tcp://127.0.0.1:7156
            python: {spec}
        """)
    errors = check_fails(config, tmp_path)
    message = find_error(errors, config, line_of(text, "python:"), "services.py.python")
    assert word in message, message


def test_python_handler_raising_at_import_is_a_config_error(tmp_path: Path) -> None:
    """A handler module that raises while imported is a config error, not a traceback."""
    (tmp_path / "netd_test_broken_handler.py").write_text("raise RuntimeError('boom')\n")
    config, text = write(tmp_path / "netd.yaml", """
        services:
          py:
            listen: tcp://127.0.0.1:7157
            python: netd_test_broken_handler:handle
        """)
    errors = check_fails(config, tmp_path, env=env_with_module_path(tmp_path))
    find_error(errors, config, line_of(text, "python:"), "services.py.python")


# --- includes ---------------------------------------------------------------------


def test_include_relative_to_config_file_in_sorted_order(tmp_path: Path) -> None:
    """Globs are relative to the including file (not the cwd); files come in sorted order."""
    conf = tmp_path / "conf"
    config, _ = write(conf / "netd.yaml", """
        include: [services.d/*.yaml]
        services:
          main-first:
            listen: tcp://127.0.0.1:7160
            builtin: echo
        """)
    # Written out of order so neither creation order nor its reverse is sorted order.
    for number, name in ((20, "inc-second"), (10, "inc-first"), (30, "inc-third")):
        write(conf / "services.d" / f"{number}-{name}.yaml", f"""
            services:
              {name}:
                listen: tcp://127.0.0.1:{7150 + number}
                builtin: echo
            """)
    # A decoy next to the cwd: resolving the glob against the cwd would pick it up.
    write(tmp_path / "services.d" / "decoy.yaml", "services: [this is: not valid\n")
    stdout = check_ok(config, tmp_path)
    names = ("main-first", "inc-first", "inc-second", "inc-third")
    positions = [stdout.find(name) for name in names]
    assert all(p >= 0 for p in positions), stdout
    assert positions == sorted(positions), stdout
    for port in (7160, 7170, 7180):
        assert f"127.0.0.1:{port}" in stdout, stdout


def test_service_defined_twice_names_both_places(tmp_path: Path) -> None:
    """The same service in two files is one error naming both FILE:LINE places."""
    config, text = write(tmp_path / "netd.yaml", """
        include: [services.d/*.yaml]
        services:
          echo:
            listen: tcp://127.0.0.1:7163
            builtin: echo
        """)
    included, included_text = write(tmp_path / "services.d" / "dup.yaml", """
        # the same name again
        services:
          echo:
            listen: tcp://127.0.0.1:7164
            builtin: echo
        """)
    result = check(config, tmp_path)
    assert result.returncode == EX_CONFIG, output(result)
    first = f"{config}:{line_of(text, 'echo:')}"
    second = f"{included}:{line_of(included_text, 'echo:')}"
    lines = [raw for raw in result.stderr.splitlines() if first in raw and second in raw]
    assert lines, f"no one error naming both {first} and {second}\n{output(result)}"
    assert "services.echo" in lines[0], lines[0]


def test_empty_globs_are_not_errors(tmp_path: Path) -> None:
    """An include matching nothing (empty dir, missing dir) is fine."""
    (tmp_path / "empty.d").mkdir()
    config, _ = write(tmp_path / "netd.yaml", """
        include:
          - empty.d/*.yaml
          - missing.d/*.yaml
        services:
          echo:
            listen: tcp://127.0.0.1:7165
            builtin: echo
        """)
    stdout = check_ok(config, tmp_path)
    assert "echo" in stdout, stdout


def test_include_as_single_string(tmp_path: Path) -> None:
    """include: may be one glob string as well as a list."""
    config, _ = write(tmp_path / "netd.yaml", "include: services.d/*.yaml\n")
    write(tmp_path / "services.d" / "a.yaml", """
        services:
          only-included:
            listen: tcp://127.0.0.1:7166
            builtin: echo
        """)
    stdout = check_ok(config, tmp_path)
    assert "only-included" in stdout, stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file anyway")
def test_unreadable_include_names_the_file(tmp_path: Path) -> None:
    """An included file that cannot be read is reported by name, cleanly."""
    config, _ = write(tmp_path / "netd.yaml", "include: [services.d/*.yaml]\n")
    secret, _ = write(tmp_path / "services.d" / "secret.yaml", "services: {}\n")
    secret.chmod(0)
    try:
        result = check(config, tmp_path)
    finally:
        secret.chmod(0o644)
    assert result.returncode == EX_CONFIG, output(result)
    assert "Traceback" not in result.stderr, output(result)
    assert "secret.yaml" in result.stderr, output(result)


def test_dangling_symlink_include_names_the_file(tmp_path: Path) -> None:
    """An included entry that cannot be opened (a dangling symlink) is an error naming it."""
    config, _ = write(tmp_path / "netd.yaml", "include: [services.d/*.yaml]\n")
    (tmp_path / "services.d").mkdir()
    (tmp_path / "services.d" / "gone.yaml").symlink_to(tmp_path / "removed.yaml")
    result = check(config, tmp_path)
    assert result.returncode == EX_CONFIG, output(result)
    assert "Traceback" not in result.stderr, output(result)
    assert "gone.yaml" in result.stderr, output(result)


def test_relative_config_path_includes_from_its_directory(tmp_path: Path) -> None:
    """-c conf/netd.yaml from another cwd still finds conf/services.d."""
    write(tmp_path / "conf" / "netd.yaml", "include: [services.d/*.yaml]\n")
    write(tmp_path / "conf" / "services.d" / "a.yaml", """
        services:
          relative:
            listen: tcp://127.0.0.1:7190
            builtin: echo
        """)
    result = run_netd("check", "-c", "conf/netd.yaml", cwd=tmp_path)
    assert result.returncode == 0, output(result)
    assert "relative" in result.stdout, output(result)


def test_syntax_error_in_included_file_names_that_file(tmp_path: Path) -> None:
    """Broken YAML in an included file is reported at that file's line."""
    config, _ = write(tmp_path / "netd.yaml", """
        include: [services.d/*.yaml]
        services:
          echo:
            listen: tcp://127.0.0.1:7167
            builtin: echo
        """)
    broken, text = write(tmp_path / "services.d" / "broken.yaml", """
        services:
          cat:
            listen: tcp://127.0.0.1:7168
            exec: [/bin/cat]: oops
        """)
    errors = check_fails(config, tmp_path)
    find_error(errors, broken, line_of(text, "oops"))


def test_included_file_with_unknown_top_key(tmp_path: Path) -> None:
    """An included file holds only `services:`; other keys are errors there."""
    config, _ = write(tmp_path / "netd.yaml", "include: [services.d/*.yaml]\n")
    included, text = write(tmp_path / "services.d" / "a.yaml", """
        servces:
          echo:
            listen: tcp://127.0.0.1:7169
            builtin: echo
        """)
    errors = check_fails(config, tmp_path)
    message = find_error(errors, included, line_of(text, "servces"), "servces")
    assert "did you mean 'services'" in message, message


# --- YAML and types ---------------------------------------------------------------


def test_unparsable_yaml(tmp_path: Path) -> None:
    """Broken YAML is exit 78 at FILE:LINE, never a traceback."""
    config, text = write(tmp_path / "netd.yaml", """
        services:
          echo:
            listen: tcp://127.0.0.1:7170
            builtin: echo: oops
        """)
    errors = check_fails(config, tmp_path)
    find_error(errors, config, line_of(text, "oops"))


@pytest.mark.parametrize("body", ["- just\n- a list\n", "plain words\n", "42\n"],
                         ids=["list", "string", "number"])
def test_top_level_not_a_mapping(tmp_path: Path, body: str) -> None:
    """A document that is not a mapping is a config error at line 1."""
    config, _ = write(tmp_path / "netd.yaml", body)
    errors = check_fails(config, tmp_path)
    find_error(errors, config, 1)


def test_wrong_types_each_reported(tmp_path: Path) -> None:
    """listen: 5, env: [1, 2], wait: "maybe", backlog: lots: one error each, at its line."""
    config, text = write(tmp_path / "netd.yaml", """
        services:
          a:
            listen: 5
            builtin: echo
          b:
            listen: tcp://127.0.0.1:7171
            exec: [/bin/cat]
            env: [1, 2]
          c:
            listen: tcp://127.0.0.1:7172
            builtin: echo
            wait: "maybe"
          d:
            listen: tcp://127.0.0.1:7173
            builtin: echo
            backlog: lots
        """)
    errors = check_fails(config, tmp_path)
    find_error(errors, config, line_of(text, "listen: 5"), "services.a.listen")
    find_error(errors, config, line_of(text, "env:"), "services.b.env")
    find_error(errors, config, line_of(text, "maybe"), "services.c.wait")
    find_error(errors, config, line_of(text, "lots"), "services.d.backlog")


def test_services_not_a_mapping(tmp_path: Path) -> None:
    """services: as a list is a type error at its line."""
    config, text = write(tmp_path / "netd.yaml", """
        services:
          - echo
        """)
    errors = check_fails(config, tmp_path)
    find_error(errors, config, line_of(text, "services:"), "services")


def test_duplicate_key_in_one_mapping(tmp_path: Path) -> None:
    """A key given twice in one mapping is an error, not a silent override."""
    config, text = write(tmp_path / "netd.yaml", """
        services:
          echo:
            listen: tcp://127.0.0.1:7174
            builtin: echo
            listen: tcp://127.0.0.1:7175
        """)
    errors = check_fails(config, tmp_path)
    assert any(e.path == config and e.line == line_of(text, "listen", nth=2) for e in errors), (
        "\n".join(str(e) for e in errors))


def test_alias_bomb_is_a_clean_error(tmp_path: Path) -> None:
    """A billion-laughs document is rejected quickly, not expanded (bounded by a timeout)."""
    levels = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    config = tmp_path / "netd.yaml"
    config.write_text("\n".join(levels) + "\nservices: *i\n")
    try:
        errors = check_fails(config, tmp_path, timeout_s=20)
    except subprocess.TimeoutExpired:
        pytest.fail("netd check did not finish within 20s on an alias bomb")
    assert all(e.path == config for e in errors), errors


def test_non_utf8_bytes_are_a_clean_error(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 give a FILE:LINE error, not a traceback."""
    config = tmp_path / "netd.yaml"
    config.write_bytes(b"services:\n  echo:\n    listen: tcp://127.0.0.1:7176\n"
                       b"    builtin: ech\xff\xfe\n")
    errors = check_fails(config, tmp_path)
    find_error(errors, config, 4)


def test_missing_config_file(tmp_path: Path) -> None:
    """A config path that does not exist is exit 78 naming the file, no traceback."""
    missing = tmp_path / "nope.yaml"
    result = check(missing, tmp_path)
    assert result.returncode == EX_CONFIG, output(result)
    assert "Traceback" not in result.stderr, output(result)
    assert "nope.yaml" in result.stderr, output(result)


# --- defaults ---------------------------------------------------------------------


def test_bad_value_in_defaults_reported_once_at_defaults(tmp_path: Path) -> None:
    """A bad defaults.backlog is reported at its line, under defaults."""
    config, text = write(tmp_path / "netd.yaml", """
        defaults:
          backlog: many
        services:
          a:
            listen: tcp://127.0.0.1:7180
            builtin: echo
        """)
    errors = check_fails(config, tmp_path)
    message = find_error(errors, config, line_of(text, "many"), "defaults.backlog")
    assert message


def test_defaults_env_merged_under_service_env(start_netd: Callable[..., Netd]) -> None:
    """An exec child sees defaults.env overlaid by the service's env (service wins)."""
    port = free_port()
    netd = start_netd(f"""
        defaults:
          env:
            FROM_DEFAULTS: d
            OVERRIDDEN: d
        services:
          env:
            listen: tcp://127.0.0.1:{port}
            exec: [/usr/bin/env]
            env:
              OVERRIDDEN: s
              FROM_SERVICE: s
        """)
    with connect(port) as conn:
        data = recv_all(conn).decode()
    env = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
    assert env.get("FROM_DEFAULTS") == "d", data
    assert env.get("OVERRIDDEN") == "s", data
    assert env.get("FROM_SERVICE") == "s", data
    assert env.get("NETD_SERVICE") == "env", data
    assert netd.stop() == 0



# --- datagrams and wait: false (issue 10, item 3) ------------------------------------


@pytest.mark.parametrize("handler", ["exec: [/bin/cat]", f"python: {HANDLER_MODULE}:handle"])
@pytest.mark.parametrize("address", ["udp://127.0.0.1:7190", "unix-dgram:{dir}/d.sock"])
def test_datagram_service_with_wait_false_is_a_config_error(tmp_path: Path, handler: str,
                                                             address: str) -> None:
    """inetd's `dgram nowait` is not supported: `wait: false` on a datagram address would
    have netd accept() on a socket that has no connections (a spin). check and run both
    refuse it at the wait line, saying what to write instead."""
    write_handler_module(tmp_path)
    config, text = write(tmp_path / "netd.yaml", f"""
        services:
          tftp:
            listen: {address.format(dir=tmp_path)}
            {handler}
            wait: false
        """)
    env = env_with_module_path(tmp_path)
    errors = check_fails(config, tmp_path, env)
    message = find_error(errors, config, line_of(text, "wait: false"), "services.tftp.wait")
    assert "wait: true" in message and "drop the key" in message, message
    assert "dgram nowait" in message, message
    result = run_netd("run", "-c", str(config), cwd=tmp_path, env=env, timeout_s=30)
    assert result.returncode == EX_CONFIG, output(result)
    assert f"{config}:{line_of(text, 'wait: false')}:" in result.stderr, output(result)


def test_wait_false_from_defaults_names_the_datagram_service(tmp_path: Path) -> None:
    """`defaults.wait: false` suits stream services; a datagram service under it is
    reported at the defaults line, naming that service."""
    config, text = write(tmp_path / "netd.yaml", """
        defaults:
          wait: false
        services:
          cat:
            listen: tcp://127.0.0.1:7191
            exec: [/bin/cat]
          tftp:
            listen: udp://127.0.0.1:7192
            exec: [/bin/cat]
        """)
    errors = check_fails(config, tmp_path)
    assert len(errors) == 1, errors
    message = find_error(errors, config, line_of(text, "wait: false"), "defaults.wait")
    assert "services.tftp" in message and "wait: true" in message, message


def test_datagram_service_with_wait_true_or_no_wait_key_is_accepted(tmp_path: Path) -> None:
    """Without the key a datagram address is served in wait mode, as inetd's dgram wait."""
    config, _ = write(tmp_path / "netd.yaml", """
        services:
          plain:
            listen: [tcp://127.0.0.1:7193, udp://127.0.0.1:7193]
            exec: [/bin/cat]
          explicit:
            listen: udp://127.0.0.1:7194
            exec: [/bin/cat]
            wait: true
        """)
    stdout = check_ok(config, tmp_path)
    assert "udp://127.0.0.1:7193 (wait)" in stdout and "tcp://127.0.0.1:7193 (nowait)" in stdout, \
        stdout


# --- default limits and `unlimited` (issue 10, item 2) -------------------------------


def test_default_limits_and_unlimited(tmp_path: Path) -> None:
    """A service that sets no limits gets the default instances and per_source, and the
    daemon the default max_children; `unlimited` lifts each (None: unbounded), and a
    limits section that sets one key keeps the defaults for the others."""
    from netd.config import load_config

    config, _ = write(tmp_path / "netd.yaml", """
        daemon:
          max_children: unlimited
        services:
          plain:
            listen: tcp://127.0.0.1:7195
            exec: [/bin/cat]
          open:
            listen: tcp://127.0.0.1:7196
            exec: [/bin/cat]
            limits: {instances: unlimited, per_source: unlimited}
          some:
            listen: tcp://127.0.0.1:7197
            exec: [/bin/cat]
            limits: {per_source: 4}
        """)
    loaded = load_config(str(config))
    limits = {s.name: s.limits for s in loaded.services}
    assert (limits["plain"].instances, limits["plain"].per_source) == (512, 256)
    assert (limits["open"].instances, limits["open"].per_source) == (None, None)
    assert (limits["some"].instances, limits["some"].per_source) == (512, 4)
    assert loaded.daemon.max_children is None
    config.write_text(config.read_text().replace("  max_children: unlimited\n", ""))
    assert load_config(str(config)).daemon.max_children == 1024


@pytest.mark.parametrize("setting, key", [
    ("daemon:\n  max_children: lots\n", "daemon.max_children"),
    ("defaults:\n  limits: {instances: 0}\n", "defaults.limits.instances"),
    ("defaults:\n  limits: {per_source: Unlimited}\n", "defaults.limits.per_source"),
])
def test_bad_limit_says_number_or_unlimited(tmp_path: Path, setting: str, key: str) -> None:
    config, text = write(tmp_path / "netd.yaml", setting + textwrap.dedent("""
        services:
          a:
            listen: tcp://127.0.0.1:7198
            builtin: echo
        """))
    errors = check_fails(config, tmp_path)
    message = find_error(errors, config, 2, key)
    assert "unlimited" in message, message
