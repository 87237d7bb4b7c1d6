#!/usr/bin/env bash
# Make .venv with sessionkeeper installed (editable) with the extras given, e.g. "cli,dev".
# Sourced by scripts/try and scripts/test; installs python3-venv on Debian if it is missing.
set -euo pipefail
extras="${1:-cli}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"

if ! command -v "$python" >/dev/null 2>&1; then
    echo "error: $python not found; install Python 3.11 or newer" >&2
    exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: sessionkeeper needs Python 3.11 or newer; $python is $("$python" -V)" >&2
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -m venv "$venv" 2>/dev/null; then
        if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
            echo "installing python3-venv (Debian package) ..." >&2
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
            rm -rf "$venv"
            "$python" -m venv "$venv"
        else
            echo "error: '$python -m venv' failed; install your system's python3-venv" >&2
            exit 1
        fi
    fi
fi
stamp="$venv/.installed-$extras"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    echo "installing sessionkeeper[$extras] into .venv ..." >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[$extras]" >&2
    touch "$stamp"
fi
