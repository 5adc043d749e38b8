"""The Debian packaging files (debian/), checked without building (the build, lintian
and the installed package are in tests/e2e/test_debian_e2e.py)."""

from __future__ import annotations

import re

from conftest import REPO, output, run_netd

from netd import __version__


def control_fields() -> dict[str, str]:
    """The binary package's fields of debian/control (continuation lines joined)."""
    paragraph = (REPO / "debian" / "control").read_text().split("\n\n")[1]
    fields: dict[str, str] = {}
    for match in re.finditer(r"^([\w-]+):(.*(?:\n[ \t].*)*)", paragraph, re.M):
        fields[match[1]] = " ".join(match[2].split())
    return fields


def test_changelog_version_is_netds() -> None:
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"netd ({__version__}) "), first


def test_the_package_is_an_inet_superserver_on_debians_libraries() -> None:
    fields = control_fields()
    assert fields["Provides"].rstrip(",") == "inet-superserver"
    # Two superservers on one inetd.conf would fight over its ports.
    assert fields["Conflicts"].rstrip(",") == "inet-superserver"
    # python3-yaml, python3-systemd, python3-daemon, ... come from setup.cfg through
    # dh_python3; tcpd runs the inetd.conf lines Debian packages write.
    assert "${python3:Depends}" in fields["Depends"] and "tcpd" in fields["Depends"]


def test_the_system_config_is_valid_and_serves_no_demo() -> None:
    result = run_netd("check", "-c", str(REPO / "debian" / "netd.yaml"))
    assert result.returncode == 0, output(result)
    # Only what the machine's own files name (here, none of the demo's ports).
    for port in ("7007", "1313", "7008", "7009", "1919"):
        assert f":{port} " not in result.stdout, output(result)
