"""Parsing a service's identity settings: user, group, groups, umask, nice, rlimits.

Each function takes a YAML value and returns what the child needs, or raises
ValueError with a message fit for `FILE:LINE: key: message`.
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import re
import resource

RLIMITS = {"nofile": resource.RLIMIT_NOFILE, "nproc": resource.RLIMIT_NPROC,
           "as": resource.RLIMIT_AS, "cpu": resource.RLIMIT_CPU,
           "core": resource.RLIMIT_CORE, "fsize": resource.RLIMIT_FSIZE}
SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
CAP_SYS_RESOURCE = 24
# Who children run as when netd runs as root and a service names no user.
DEFAULT_USER = "nobody"


def resolve_user(value: object) -> tuple[str, int, int]:
    """(name, uid, primary gid) of a user given by name or number."""
    return _user(value if isinstance(value, int) else str(value))


def resolve_group(value: object) -> int:
    """The gid of a group given by name or number."""
    return _group(value if isinstance(value, int) else str(value))


# A config names the same few users and groups many times: each is looked up once per
# load (forget_accounts() starts a load afresh, so a reload sees the account database
# as it is then).
@functools.lru_cache(maxsize=4096)
def _user(value: int | str) -> tuple[str, int, int]:
    try:
        entry = pwd.getpwuid(value) if isinstance(value, int) else pwd.getpwnam(value)
    except (KeyError, OverflowError):
        raise ValueError(f"no such user '{value}'") from None
    return entry.pw_name, entry.pw_uid, entry.pw_gid


@functools.lru_cache(maxsize=4096)
def _group(value: int | str) -> int:
    try:
        entry = grp.getgrgid(value) if isinstance(value, int) else grp.getgrnam(value)
    except (KeyError, OverflowError):
        raise ValueError(f"no such group '{value}'") from None
    return entry.gr_gid


@functools.lru_cache(maxsize=4096)
def member_of(user: str, gid: int) -> tuple[int, ...]:
    """The user's supplementary groups from /etc/group, as initgroups(3) would set them."""
    return tuple(sorted({gid, *os.getgrouplist(user, gid)}))


def forget_accounts() -> None:
    """Look users and groups up anew from now on (at the start of each load)."""
    for cached in (_user, _group, member_of):
        cached.cache_clear()


def parse_umask(value: object) -> int:
    """A umask or file mode written in octal: "022", "0660", or a YAML number."""
    text = str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value) if 0 <= value <= 777 and set(str(value)) <= set("01234567") \
            else oct(value)[2:]
    if not re.fullmatch(r"0?[0-7]{1,3}", text.removeprefix("0o")):
        raise ValueError(f"'{value}' is not an octal mode like 022 or 0660")
    return int(text.removeprefix("0o"), 8)


def parse_nice(value: object) -> int:
    """A nice value, -20 (most favoured) to 19."""
    if not isinstance(value, int) or isinstance(value, bool) or not -20 <= value <= 19:
        raise ValueError(f"'{value}' is not a nice value from -20 to 19")
    return value


def parse_limit(name: str, value: object) -> tuple[str, int, int]:
    """One rlimit as (name, soft, hard): a number, a size (512M) or `unlimited`."""
    if name not in RLIMITS:
        raise ValueError(f"unknown limit (expected one of: {', '.join(RLIMITS)})")
    if value == "unlimited":
        # Linux has no unlimited number of open files: the most is fs.nr_open.
        return _grantable(name, _nr_open() if name == "nofile" else resource.RLIM_INFINITY)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        size = value
    else:
        match = SIZE.match(str(value)) if isinstance(value, str) else None
        if match is None:
            raise ValueError(f"'{value}' is not a number, a size like 512M, or unlimited")
        size = int(match.group(1)) * SIZE_UNITS[match.group(2).upper()]
    if name == "nofile" and size > _nr_open():
        raise ValueError(f"{size} is above the kernel's maximum (fs.nr_open = {_nr_open()})")
    return _grantable(name, size)


def _grantable(name: str, size: int) -> tuple[str, int, int]:
    """(name, size, size), or ValueError when netd could not raise the hard limit that far:
    better said at load time than found out by every connection."""
    hard = resource.getrlimit(RLIMITS[name])[1]
    raising = hard != resource.RLIM_INFINITY and (size == resource.RLIM_INFINITY or size > hard)
    if raising and not _has_sys_resource():
        shown = "unlimited" if hard == resource.RLIM_INFINITY else hard
        raise ValueError(f"{size if size != resource.RLIM_INFINITY else 'unlimited'} is above "
                         f"netd's own hard limit ({shown}), which it may not raise "
                         "(no CAP_SYS_RESOURCE)")
    return name, size, size


def _has_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


def _nr_open() -> int:
    with open("/proc/sys/fs/nr_open") as f:
        return int(f.read())
