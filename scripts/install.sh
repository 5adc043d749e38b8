#!/usr/bin/env bash
# Install netd system-wide from this checkout. Run as root: sudo bash scripts/install.sh
#
#   - the Debian packages systemd-python builds against (only those missing)
#   - a virtualenv at /opt/netd with netd installed into it (not editable: the checkout
#     can be deleted afterwards), and the command /usr/local/bin/netd
#   - /etc/netd/netd.yaml and /etc/netd/services.d/ from etc/netd, only on a first
#     install: an existing /etc/netd/netd.yaml means the whole config is kept as it is
#   - /etc/systemd/system/netd.service and netd.socket, then `systemctl daemon-reload`
#   - /etc/rsyslog.d/30-netd.conf (netd's lines to /var/log/netd.log) and
#     /etc/logrotate.d/netd, restarting rsyslog when the snippet changed
#   - the man pages netd(8) and netd.yaml(5) (made from README.md) under
#     /usr/local/share/man, and bash completion under /usr/local/share/bash-completion
#
# On Debian and Ubuntu the Debian package is the better way (README.md, "Install").
#
# Running it again upgrades netd from the checkout and changes nothing else that is
# already in place. It never starts, stops or restarts netd itself.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(pwd)

prefix=${NETD_PREFIX:-/opt/netd}
confdir=/etc/netd
unitdir=/etc/systemd/system

say() { echo "install: $*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "install: must run as root: sudo bash scripts/install.sh" >&2
    exit 77
fi
if [ ! -f setup.cfg ] || [ ! -d netd ] || [ ! -f systemd/netd.service ]; then
    echo "install: $src is not a netd checkout" >&2
    exit 66
fi

systemd_booted=no
[ -d /run/systemd/system ] && systemd_booted=yes   # sd_booted(3): systemd is PID 1

# 1. Debian packages: systemd-python has no wheels and compiles against libsystemd.
packages=(libsystemd-dev pkg-config gcc python3-dev python3-venv)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
else
    say "Debian packages already installed: ${packages[*]}"
fi

# 2. The package, in its own virtualenv. It is built from a copy of the checkout, so
#    root leaves no build/ or *.egg-info behind in the (maybe user-owned) checkout.
if [ ! -x "$prefix/bin/python" ]; then
    say "creating virtualenv $prefix"
    python3 -m venv "$prefix"
else
    say "virtualenv $prefix exists"
fi
# With wheel, pip builds systemd-python (no wheels on PyPI) as a wheel rather than by
# the deprecated `setup.py install`.
"$prefix/bin/python" -m pip install -q --disable-pip-version-check wheel
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
tar -C "$src" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=./tests --exclude=./bench -cf - . | tar -C "$build" -xf -
"$prefix/bin/python" -m pip install -q --disable-pip-version-check --no-warn-script-location \
    "$build"
say "installed $("$prefix/bin/netd" --version) into $prefix"
ln -sfn "$prefix/bin/netd" /usr/local/bin/netd
say "linked /usr/local/bin/netd -> $prefix/bin/netd"

# 3. The config: the example on a first install only, never over an administrator's.
if [ -e "$confdir/netd.yaml" ]; then
    say "kept existing $confdir (netd.yaml and services.d untouched)"
else
    install -d -m 0755 "$confdir" "$confdir/services.d"
    install -m 0644 etc/netd/netd.yaml "$confdir/netd.yaml"
    say "installed $confdir/netd.yaml"
    for f in etc/netd/services.d/*; do
        [ -f "$f" ] || continue
        dest="$confdir/services.d/$(basename "$f")"
        if [ -e "$dest" ]; then
            say "kept existing $dest"
        else
            install -m 0644 "$f" "$dest"
            say "installed $dest"
        fi
    done
fi

# Install $1 as $2 (mode 0644) unless it is there already with the same content.
# Returns 0 when the file changed.
put() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        say "$2 is up to date"
        return 1
    fi
    install -D -m 0644 "$1" "$2"
    say "installed $2"
}

# 4. systemd units. Local changes belong in drop-ins (systemctl edit netd), which this
#    script never touches.
put systemd/netd.service "$unitdir/netd.service" || true
put systemd/netd.socket "$unitdir/netd.socket" || true
if [ "$systemd_booted" = yes ]; then
    systemctl daemon-reload
    say "ran systemctl daemon-reload"
    if systemctl -q is-active netd.service; then
        say "netd is running the version it started with: systemctl restart netd to" \
            "switch (or leave it until the next restart)"
    fi
else
    say "systemd is not running (not PID 1): no daemon-reload"
fi

# 5. Logs: rsyslog writes netd's lines to /var/log/netd.log, logrotate rotates it.
if put etc/rsyslog.d/30-netd.conf /etc/rsyslog.d/30-netd.conf; then
    if [ "$systemd_booted" = yes ] && systemctl -q is-active rsyslog.service; then
        systemctl restart rsyslog.service
        say "restarted rsyslog"
    elif [ -f /run/rsyslogd.pid ] && kill -0 "$(cat /run/rsyslogd.pid)" 2>/dev/null; then
        say "rsyslog is running: restart it to route netd's lines to /var/log/netd.log"
    fi
fi
if ! command -v rsyslogd >/dev/null; then
    say "rsyslog is not installed: netd's lines are in the journal only" \
        "(journalctl -t netd); apt-get install rsyslog for /var/log/netd.log"
fi
put etc/logrotate.d/netd /etc/logrotate.d/netd || true

# 6. Man pages, generated from README.md, and bash completion (read from
#    $XDG_DATA_DIRS, which holds /usr/local/share by default).
"$prefix/bin/python" scripts/manpages.py --out "$build/man" >/dev/null
put "$build/man/netd.8" /usr/local/share/man/man8/netd.8 || true
put "$build/man/netd.yaml.5" /usr/local/share/man/man5/netd.yaml.5 || true
put completion/netd.bash /usr/local/share/bash-completion/completions/netd || true

if [ "$systemd_booted" = yes ] && systemctl -q is-enabled netd.service 2>/dev/null; then
    say "done"
else
    say "done. Next: netd check && systemctl enable --now netd"
fi
