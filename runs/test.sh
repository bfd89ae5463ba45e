#!/usr/bin/env bash
# The test command (README.md's, and what .ci/run runs): the environment the run scripts install (a
# no-op after them), the system package the browser test drives (Chromium), then pytest in the locked
# environment. Arguments go to pytest; "no tests ran" (pytest's exit 5) fails like any failure.
#
#   bash runs/test.sh                          # every test (CPU only)
#   bash runs/test.sh -m "not slow"            # the quick lane
#   bash runs/test.sh tests/test_gpt.py -x     # one module
#   SKIP_ENV_SETUP=1 bash runs/test.sh         # the python on PATH as it is, as for the run scripts

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=runs/lib.sh
source runs/lib.sh

# tests/test_ui_browser.py drives Debian's headless chromium (tests/cdp_pipe.py finds either name)
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "[FAIL] the browser test needs Chromium on PATH (as 'chromium' or 'chromium-browser'), and this machine" \
             "has no apt-get to install it: install it with your package manager and run this again" >&2
        exit 1
    elif [ "$(id -u)" = 0 ]; then
        apt_get=(apt-get)
    elif command -v sudo >/dev/null 2>&1; then
        apt_get=(sudo apt-get)
    else
        echo "[FAIL] the browser test needs Chromium: run 'apt-get install -y chromium' as root, then this again" >&2
        exit 1
    fi
    echo "installing chromium (the browser test drives it headless): ${apt_get[*]} install -y chromium"
    if ! "${apt_get[@]}" update -qq || ! DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -qq chromium >/dev/null; then
        echo "[FAIL] '${apt_get[*]} install -y chromium' failed (above): the browser test needs a Chromium it can" \
             "start headless on PATH as 'chromium' or 'chromium-browser'; install one, then run this again" >&2
        exit 1
    fi
fi

status=0
if [ "${SKIP_ENV_SETUP:-0}" = 1 ]; then
    echo "SKIP_ENV_SETUP=1: testing with $(command -v python) as it is"
    python -m pytest -q "$@" || status=$?
else
    install_environment  # uv, Rust for rustbpe, .venv from uv.lock with every extra the run scripts use
    "${UV_CMD[@]}" run --frozen pytest -q "$@" || status=$?
fi
if [ "$status" = 5 ]; then
    echo "[FAIL] pytest ran no tests (exit 5): the arguments '$*' selected none" >&2
fi
exit "$status"
