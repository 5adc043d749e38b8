#!/usr/bin/env bash
# Set up everything netd needs on a fresh Debian/Ubuntu machine: the Debian packages
# that systemd-python builds against (and, with --test, the real programs the tests
# drive), then a virtualenv in .venv with netd installed in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=no
[ "${1:-}" = "--test" ] && want_tests=yes

packages=(libsystemd-dev pkg-config gcc python3-dev python3-venv)
# The real programs the tests drive: inetd-style servers and their clients, HAProxy
# for the PROXY protocol, systemd's socket-activate and analyze tools, tcpd and
# in.fingerd (the inetd.conf world), man and bash-completion for the man page and
# completion tests.
[ "$want_tests" = yes ] && packages+=(rsync tftpd-hpa tftp-hpa git socat haproxy systemd busybox-static
                                     tcpd fingerd finger libtirpc3 man-db bash-completion)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    $sudo apt-get update -q >&2
    # A policy-rc.d that says no keeps the packaged daemons (tftpd-hpa, haproxy) from
    # being started by their install: the tests run their own, on their own ports.
    made_policy=no
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        $sudo sh -c 'printf "#!/bin/sh\nexit 101\n" >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
        made_policy=yes
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}" >&2
    if [ "$made_policy" = yes ]; then $sudo rm -f /usr/sbin/policy-rc.d; fi
fi

# Programs the tests run that cannot be installed as packages here: xinetd conflicts
# with openbsd-inetd, and talkd depends on one of them (whose package would start a
# super-server). Their .debs are unpacked into .cache/debs/NAME instead: no package
# script runs, nothing is started; their libraries are ordinary packages.
if [ "$want_tests" = yes ]; then
    for deb in xinetd talkd; do
        [ -d ".cache/debs/$deb/usr/sbin" ] && continue
        mkdir -p .cache/debs
        ( cd .cache/debs && apt-get download -q "$deb" >&2 2>/dev/null ) ||
            { apt-get update -q >&2 && ( cd .cache/debs && apt-get download -q "$deb" >&2 ); }
        dpkg-deb -x .cache/debs/"$deb"_*.deb ".cache/debs/$deb"
    done
fi

# netd refuses config files others than their owner may write: a umask of 002 (the
# default for users on Debian and Ubuntu) checks them out group-writable.
chmod -R go-w etc

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
extra=""
[ "$want_tests" = yes ] && extra="[test]"
# wheel first: systemd-python has no pyproject.toml, and without wheel pip falls
# back to the deprecated `setup.py install`.
.venv/bin/python -m pip install -q --disable-pip-version-check wheel >&2
# compat: the checkout on sys.path through a plain .pth; the default editable mode
# imports a finder (and pathlib with it) at every start of the venv's Python, about
# 18 ms on each netd command and each test's netd.
.venv/bin/python -m pip install -q --disable-pip-version-check \
    --config-settings editable_mode=compat -e ".${extra}" >&2
