#!/usr/bin/env bash
# Make sure the admin page's browser test has a browser: Debian's chromium at
# /usr/bin/chromium. Installs it when absent (as root) and fails, never skips, when it
# still cannot start headless. The test drives it with Playwright (from .venv, the dev
# extra), which never downloads a browser of its own.
set -euo pipefail

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "error: need root to run: $*" >&2; return 1; fi
}

chromium="${SESSIONKEEPER_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
    command -v apt-get >/dev/null || {
        echo "error: $chromium is missing: install Chromium by hand" >&2; exit 1; }
    echo "installing chromium (Debian package) ..." >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
[ -x "$chromium" ] || { echo "error: $chromium is still missing after installing" >&2; exit 1; }
profile="$(mktemp -d)"
trap 'rm -rf "$profile" "$profile.err"' EXIT
# a real start: render a page headless (the flags keep it off the network)
page="$(timeout 60 "$chromium" --headless --no-sandbox --disable-gpu --disable-quic \
    --no-first-run --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --dump-dom 'data:text/html,<p>browser-ok</p>' 2>"$profile.err")" \
    || true
if [[ "$page" != *browser-ok* ]]; then
    echo "error: $chromium does not start headless:" >&2
    tail -n 20 "$profile.err" >&2
    exit 1
fi
echo "browser: $("$chromium" --version 2>/dev/null | tail -n 1)" >&2
