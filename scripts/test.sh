#!/usr/bin/env bash
# Runs every test of the workspace. Installs the system packages the tests need when it can
# (root with apt-get), otherwise says exactly what to install. Never skips a test silently.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

apt_updated=0
apt_install() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        if [ "$apt_updated" = 0 ]; then
            DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || true
            apt_updated=1
        fi
        say "installing $*"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        die "the tests need these Debian packages: $* (run: sudo apt-get install -y $*)"
    fi
}

command -v cargo >/dev/null 2>&1 || die "cargo not found: install the Rust toolchain (https://rustup.rs)"
command -v git >/dev/null 2>&1 || apt_install git
command -v cc >/dev/null 2>&1 || apt_install gcc libc6-dev

# PostgreSQL server binaries: the tests start throwaway clusters from them.
pg_bin() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && { echo "$d"; return 0; }
    done
    command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ] && { pg_config --bindir; return 0; }
    return 1
}
pg_bin >/dev/null || apt_install postgresql
pg_bin >/dev/null || die "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install -y postgresql"
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root, the PostgreSQL tests need the 'postgres' user (apt-get install -y postgresql creates it)"
    command -v runuser >/dev/null 2>&1 || apt_install util-linux
fi

# S3-compatible server for the S3 artifact store tests.
if ! command -v moto_server >/dev/null 2>&1; then
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-pip
    say "installing moto[server] from PyPI"
    python3 -m pip install --quiet --disable-pip-version-check 'moto[server]' \
        || die "could not install moto[server]: run python3 -m pip install 'moto[server]'"
    hash -r
    if ! command -v moto_server >/dev/null 2>&1; then
        bindir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
        export PATH="$bindir:$PATH"
    fi
    command -v moto_server >/dev/null 2>&1 || die "moto_server not on PATH after installing moto[server]"
fi

# schemathesis fuzzes the server's OpenAPI document; pinned, in a virtualenv beside the build
# output (the test finds it there, or through SHIPINATOR_SCHEMATHESIS).
schemathesis_version=4.32.5
target_dir=${CARGO_TARGET_DIR:-target}
venv="$target_dir/schemathesis-venv"
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -qF "$schemathesis_version"; then
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
    python3 -m venv --help >/dev/null 2>&1 || apt_install python3-venv
    say "installing schemathesis $schemathesis_version from PyPI into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || die "could not create a virtualenv: apt-get install -y python3-venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "schemathesis==$schemathesis_version" \
        || die "could not install schemathesis: run $venv/bin/python -m pip install schemathesis==$schemathesis_version"
fi
SHIPINATOR_SCHEMATHESIS="$(cd "$venv/bin" && pwd)/schemathesis"
export SHIPINATOR_SCHEMATHESIS

say "cargo test --workspace"
exec cargo test --workspace --locked "$@"
