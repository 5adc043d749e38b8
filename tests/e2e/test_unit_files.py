"""The shipped systemd units, checked on the host (fast; not an e2e test): systemd's
own parser finds nothing to complain about, and netd.socket hands over an address the
example config really has, under that service's name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
UNITS = ("netd.service", "netd.socket", "netd-inetd.path", "netd-inetd.service")
NETD = "/usr/local/bin/netd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify_is_silent(unit: str, tmp_path: Path) -> None:
    """`systemd-analyze verify` exits 0 on many errors (an unknown Type=, a misspelt
    key), so any line it prints fails the test; the one exception is the installed
    command missing on a machine where scripts/install.sh has not run."""
    for name in UNITS:
        shutil.copy(REPO / "systemd" / name, tmp_path / name)
    # The man pages that Documentation= names, which verify looks up with man.
    made = tmp_path / "made"
    subprocess.run([sys.executable, str(REPO / "scripts" / "manpages.py"), "--out",
                    str(made)], check=True, capture_output=True)
    for page in ("netd.8", "netd.yaml.5"):
        section = tmp_path / "man" / f"man{page[-1]}"
        section.mkdir(parents=True, exist_ok=True)
        (made / page).rename(section / page)
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)],
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, MANPATH=str(tmp_path / "man")))
    missing = f"Command {NETD} is not executable"
    lines = [line for line in (result.stdout + result.stderr).splitlines()
             if line.strip() and not (missing in line and not Path(NETD).exists())]
    assert lines == [], "\n".join(lines)


def unit_settings(name: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (all sections; a key may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in (REPO / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_socket_unit_matches_the_example_config() -> None:
    """netd adopts a passed socket by its FileDescriptorName (a service name) or by
    its address: both must name the same service of etc/netd/netd.yaml."""
    socket_unit = unit_settings("netd.socket")
    (name,) = socket_unit["FileDescriptorName"]
    (address,) = socket_unit["ListenStream"]
    services = yaml.safe_load((REPO / "etc" / "netd" / "netd.yaml").read_text())["services"]
    assert name in services, f"FileDescriptorName={name} is no service of netd.yaml"
    listen = services[name]["listen"]
    listen = [listen] if isinstance(listen, str) else listen
    assert f"tcp://{address}" in listen, f"{address} is not among {name}'s {listen}"


def test_service_unit_runs_the_installed_command_on_the_installed_config() -> None:
    """The paths scripts/install.sh creates are the ones the unit starts and reloads."""
    service = unit_settings("netd.service")
    install = (REPO / "scripts" / "install.sh").read_text()
    assert service["Type"] == ["notify"]
    assert service["ExecStart"] == [f"{NETD} run -c /etc/netd/netd.yaml"]
    assert service["ExecReload"] == [f"{NETD} reload -c /etc/netd/netd.yaml"]
    assert 'ln -sfn "$prefix/bin/netd" /usr/local/bin/netd' in install
    assert "confdir=/etc/netd" in install and "unitdir=/etc/systemd/system" in install
