"""`netd import`: xinetd service files (or inetd.conf) as netd YAML.

The translation itself is in netd.config.xinetd and netd.config.inetd (the same
inetd.conf reading `inetd:` uses); this module tells the formats apart, puts the
services in order and writes YAML that `netd check` reads back as it is.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from netd.config.inetd import read_inetd, service_bodies
from netd.config.model import SERVICE_NAME
from netd.config.validate import service_problems
from netd.config.xinetd import XinetdError, read_entries, translate
from netd.config.yamlsource import Where

XINETD_LINE = re.compile(r"^\s*(service\s+\S+|defaults\b|includedir?\s+\S+)")
# The order keys are written in: where, what, who, then the rest.
KEY_ORDER = ("disable", "listen", "builtin", "program", "exec", "wait", "user", "group",
             "groups", "umask", "nice", "rlimits", "env", "passenv", "access", "limits",
             "log_connections", "nodelay", "keepalive")


class ImportFailure(Exception):
    """A file that cannot be imported at all (unreadable, or not xinetd nor inetd.conf)."""


def import_files(paths: list[str]) -> tuple[str, list[str]]:
    """The YAML of every service in `paths`, and the warnings (FILE:LINE: ...)."""
    warnings: list[str] = []
    services: list[tuple[str, str, dict[str, Any]]] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            raise ImportFailure(f"cannot read {path}: {e.strerror}") from None
        if any(XINETD_LINE.match(line) for line in text.splitlines()):
            services.extend(_xinetd(path, warnings))
        else:
            services.extend(_inetd(path, text, warnings))
    seen: dict[str, str] = {}
    kept = []
    for name, where, body in services:
        if not SERVICE_NAME.match(name):
            warnings.append(f"{where}: {name}: not usable as a netd service name (letters, "
                            "digits, '.', '_' and '-'); not imported")
        elif name in seen:
            warnings.append(f"{where}: {name}: a service of that name comes first, from "
                            f"{seen[name]}; not imported")
        else:
            seen[name] = where
            kept.append((name, where, _checked(name, where, body, warnings)))
    return render(kept, paths), warnings


def _checked(name: str, where: str, body: dict[str, Any],
             warnings: list[str]) -> dict[str, Any]:
    """`body`, written disabled (with the reasons as warnings) when netd could not serve
    it on this machine: a program or user not installed here."""
    if body.get("disable"):
        return body
    path, _, line = where.rpartition(":")
    problems = service_problems(name, body, Where(path, int(line)))
    if not problems:
        return body
    warnings.extend(f"{problem}; written with disable: true" for problem in problems)
    return {"disable": True, **body}


def _xinetd(path: str, warnings: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    try:
        entries = read_entries(path, warnings)
    except XinetdError as e:
        raise ImportFailure(str(e)) from None
    except OSError as e:
        raise ImportFailure(f"cannot read {e.filename}: {e.strerror}") from None
    found = []
    for service in translate(entries):
        warnings.extend(service.warnings)
        if service.body is not None:
            found.append((service.name, service.where, service.body))
    return found


def _inetd(path: str, text: str, warnings: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    lines = read_inetd(path, text)
    bodies, messages = service_bodies(lines)
    warnings.extend(messages)
    found = [(name, line.where, body) for name, body, line in bodies]
    names = {name for name, _, _ in found}
    for line in lines:
        # A package's #<off># line is kept, disabled, when netd could serve it.
        if line.disabled and line.body is not None and line.name not in names:
            names.add(line.name)
            found.append((line.name, line.where, {"disable": True, **line.body}))
    return found


def render(services: list[tuple[str, str, dict[str, Any]]], paths: list[str]) -> str:
    """The YAML document: one block per service, each with a comment saying its source."""
    out = [f"# netd import {' '.join(paths)}", "services:"]
    if not services:
        out[-1] = "services: {}"
    for name, where, body in services:
        out.append(f"  # from {where}")
        out.append(f"  {_flow(name)}:")
        for key in sorted(body, key=lambda k: KEY_ORDER.index(k) if k in KEY_ORDER
                          else len(KEY_ORDER)):
            value = body[key]
            if key == "listen" and isinstance(value, list) and len(value) == 1:
                value = value[0]
            out.append(f"    {key}: {_flow(value)}")
    return "\n".join(out) + "\n"


def _flow(value: object) -> str:
    """One value in YAML flow style, quoted only where YAML needs it."""
    text: str = yaml.safe_dump(value, default_flow_style=True, width=1 << 30,
                               sort_keys=False).strip()
    return text.removesuffix("\n...").strip()
