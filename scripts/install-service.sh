#!/usr/bin/env bash
# Install vigild as a systemd service from this checkout (docs/service.md).
#
#   sudo scripts/install-service.sh [--gstreamer]          # venv, unit, user, config
#   scripts/install-service.sh --destdir /tmp/stage --no-venv   # stage the files, unprivileged
#
# Run scripts/install-service.sh --help for every option.
set -euo pipefail

prog=$(basename "$0")
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# the paths the unit file in systemd/ is written for
unit_prefix=/opt/vigild
config_dir=/etc/vigild
config_name=vigild.yaml

prefix=$unit_prefix
unit_dir=/etc/systemd/system
sysusers_dir=/usr/lib/sysusers.d
destdir=
example=$src/configs/test-pattern.yaml
python=python3
make_venv=1
gstreamer=0

usage() {
    cat <<EOF
Usage: $prog [OPTION]...

Install vigild from this checkout ($src) as a systemd service:
  1. create a virtual environment in PREFIX/.venv and pip install the checkout into it
  2. install the unit as UNIT_DIR/vigild.service (ExecStart= pointing into PREFIX/.venv)
  3. install the sysusers.d file as SYSUSERS_DIR/vigild.conf and run systemd-sysusers,
     which creates the system user and group vigild (member of video and render)
  4. copy an example config to $config_dir/$config_name, unless that file already exists
  5. systemctl daemon-reload, then print the command that enables and starts the service

Options:
  --prefix DIR         where the virtual environment goes, as DIR/.venv (default: $unit_prefix)
  --unit-dir DIR       directory for vigild.service (default: $unit_dir)
  --sysusers-dir DIR   directory for vigild.conf (default: $sysusers_dir)
  --example FILE       config copied to $config_dir/$config_name when there is none
                       (default: configs/test-pattern.yaml, two synthetic cameras, no models)
  --gstreamer          install the GStreamer capture back end too (pip extra [gstreamer];
                       PyGObject is built from source: needs libgirepository1.0-dev, libcairo2-dev)
  --python PYTHON      interpreter for the virtual environment (default: python3, 3.11 or newer)
  --no-venv            do not create the virtual environment or run pip; the unit still expects
                       PREFIX/.venv/bin/vigild
  --destdir DIR        stage every file under DIR (DIR/etc/systemd/system/vigild.service, ...)
                       for packaging or a test; runs neither systemd-sysusers nor systemctl, and
                       needs --no-venv (a virtual environment cannot be moved once made)
  -h, --help           show this help and exit

Without --destdir the script must run as root. Re-running it upgrades vigild in the
virtual environment and replaces the unit and sysusers files; an existing config is kept.
EOF
}

die() {
    echo "$prog: error: $*" >&2
    exit 1
}
say() { echo "$prog: $*"; }
warn() { echo "$prog: warning: $*" >&2; }

need_value() {
    [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --prefix) need_value "$@"; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#*=}; shift ;;
        --unit-dir) need_value "$@"; unit_dir=$2; shift 2 ;;
        --unit-dir=*) unit_dir=${1#*=}; shift ;;
        --sysusers-dir) need_value "$@"; sysusers_dir=$2; shift 2 ;;
        --sysusers-dir=*) sysusers_dir=${1#*=}; shift ;;
        --example) need_value "$@"; example=$2; shift 2 ;;
        --example=*) example=${1#*=}; shift ;;
        --python) need_value "$@"; python=$2; shift 2 ;;
        --python=*) python=${1#*=}; shift ;;
        --destdir) need_value "$@"; destdir=$2; shift 2 ;;
        --destdir=*) destdir=${1#*=}; shift ;;
        --gstreamer) gstreamer=1; shift ;;
        --no-venv) make_venv=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

# the prefix ends up in ExecStart= (unquoted) and in a sed replacement: plain path characters only
for dir in "$prefix" "$unit_dir" "$sysusers_dir"; do
    [[ $dir =~ ^/[A-Za-z0-9._/+@-]*$ ]] || die "'$dir' is not an absolute path of letters, digits and ._/+@-"
done
prefix=${prefix%/}
[[ -n $prefix ]] || die "--prefix cannot be /"
if [[ -n $destdir ]]; then
    [[ $destdir == /* ]] || destdir=$PWD/$destdir
    destdir=${destdir%/}
    [[ -n $destdir ]] || die "--destdir / is the live system: leave --destdir out"
    ((make_venv == 0)) || die "--destdir stages files only and a virtual environment cannot be moved: add --no-venv and create PREFIX/.venv at its final place"
elif ((EUID != 0)); then
    die "run as root (or stage the files with --destdir DIR --no-venv)"
fi

unit_src=$src/systemd/vigild.service
sysusers_src=$src/systemd/vigild.sysusers
for file in "$unit_src" "$sysusers_src" "$example"; do
    [[ -f $file ]] || die "$file not found"
done
[[ -f $src/pyproject.toml ]] || die "$src does not look like a vigild checkout (no pyproject.toml)"

venv=$prefix/.venv
unit_dest=$destdir$unit_dir/vigild.service
sysusers_dest=$destdir$sysusers_dir/vigild.conf
config_dest=$destdir$config_dir/$config_name

# 1. the virtual environment
if ((make_venv)); then
    command -v "$python" >/dev/null || die "'$python' not found (choose one with --python)"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$python is older than Python 3.11"
    if [[ -x $venv/bin/python ]]; then
        say "using the existing virtual environment $venv"
    else
        say "creating the virtual environment $venv"
        mkdir -p "$prefix"
        "$python" -m venv "$venv"
    fi
    # A regular (not editable) install: the service must not depend on the checkout, which
    # ProtectHome= hides anyway when it lives under /home. pip builds a local directory in place
    # (build/, *.egg-info), so it builds from a copy, leaving no root-owned files in the checkout.
    build=$(mktemp -d "${TMPDIR:-/tmp}/vigild-install.XXXXXX")
    trap 'rm -rf "$build"' EXIT
    tar -C "$src" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude='.*_cache' -cf - . | tar -C "$build" -xf -
    requirement=$build
    if ((gstreamer)); then
        requirement="${build}[gstreamer]"
    fi
    say "pip install $src${requirement#"$build"}"
    "$venv/bin/python" -m pip install --disable-pip-version-check "$requirement"
    rm -rf "$build"
    trap - EXIT
    [[ -x $venv/bin/vigild ]] || die "pip did not install $venv/bin/vigild"
else
    say "not creating a virtual environment (--no-venv)"
    [[ -n $destdir || -x $venv/bin/vigild ]] || warn "$venv/bin/vigild does not exist yet: the service cannot start until it does"
fi

# 2. the unit, with ExecStart= pointing into PREFIX
mkdir -p "$(dirname "$unit_dest")"
tmp=$(mktemp "$(dirname "$unit_dest")/.vigild.service.XXXXXX")
trap 'rm -f "$tmp"' EXIT
sed "s|$unit_prefix/.venv/|$venv/|g" "$unit_src" >"$tmp"
grep -q "^ExecStart=$venv/bin/vigild " "$tmp" || die "could not point ExecStart= at $venv/bin/vigild in $unit_src"
chmod 0644 "$tmp"
mv -f "$tmp" "$unit_dest"
trap - EXIT
say "installed $unit_dest"

# 3. the system user and group
install -D -m 0644 "$sysusers_src" "$sysusers_dest"
say "installed $sysusers_dest"
if [[ -z $destdir ]]; then
    command -v systemd-sysusers >/dev/null || die "systemd-sysusers not found: create the user and group vigild by hand (docs/service.md)"
    systemd-sysusers "$sysusers_dest"
    say "system user $(id vigild)"
fi

# 4. the config, never overwritten
if [[ -e $config_dest || -L $config_dest ]]; then
    say "keeping the existing $config_dest"
else
    mkdir -p "$(dirname "$config_dest")"
    chmod 0755 "$(dirname "$config_dest")"
    tmp=$(mktemp "$(dirname "$config_dest")/.$config_name.XXXXXX")
    trap 'rm -f "$tmp"' EXIT
    {
        echo "# Installed by $prog from ${example#"$src"/}; edit it, then \`systemctl reload vigild\`."
        echo "# More examples: configs/ in the vigild checkout; every setting: docs/config.md."
        cat "$example"
    } >"$tmp"
    # it may hold camera credentials: readable by root and the group vigild only
    chmod 0640 "$tmp"
    if [[ -z $destdir ]]; then
        chgrp vigild "$tmp"
    fi
    mv -f "$tmp" "$config_dest"
    trap - EXIT
    say "installed $config_dest (from $example)"
    if grep -q 'test://' "$config_dest" && ((make_venv && !gstreamer)); then
        warn "$config_dest uses test:// cameras, which need GStreamer: re-run with --gstreamer or replace the cameras"
    fi
fi
if [[ -n $destdir ]]; then
    say "staged under $destdir; on the target run systemd-sysusers $sysusers_dir/vigild.conf, chgrp vigild $config_dir/$config_name (if new) and systemctl daemon-reload"
fi

# 5. systemd
if [[ -z $destdir ]]; then
    if [[ -d /run/systemd/system ]]; then
        systemctl daemon-reload
        say "systemd reloaded its units"
    else
        warn "systemd is not running here (no /run/systemd/system): skipped systemctl daemon-reload"
    fi
    cat <<EOF

Installed. Check the config, then enable and start the service:
  sudo -u vigild $venv/bin/vigild check --config $config_dir/$config_name
  systemctl enable --now vigild
  systemctl status vigild; journalctl -u vigild -f
EOF
fi
