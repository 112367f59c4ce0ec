#!/usr/bin/env bash
# Installs a real browser for the dashboard's browser test (agent/tests/dashboard.rs): Debian's
# `chromium`, run headless and driven over the DevTools protocol.
# Idempotent: does nothing when `chromium` already runs.
#
# Usage: .ci/setup.d/chromium.sh
# Then:  cargo test -p rba-agent --test dashboard
# (Without chromium on PATH the browser test fails and says to run this script; set
# RBA_CHROMIUM=/path/to/chrome to use another Chromium build.)
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && chromium --version >/dev/null 2>&1; then
    echo "chromium already installed: $(command -v chromium) ($(chromium --version 2>/dev/null))"
    exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
# Install from the current lists first; refresh them only when that fails.
if ! $SUDO apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; then
    if ! $SUDO apt-get update -qq; then
        echo "setup-chromium: 'apt-get update' failed (no access to the Debian mirrors?)" >&2
        exit 1
    fi
    $SUDO apt-get install -y --no-install-recommends chromium
fi

if ! command -v chromium >/dev/null 2>&1; then
    echo "setup-chromium: chromium installed but no 'chromium' on PATH" >&2
    exit 1
fi
echo "installed: $(command -v chromium) ($(chromium --version 2>/dev/null))"
