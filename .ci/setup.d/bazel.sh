#!/usr/bin/env bash
# Installs a real REAPI client for the cache-server's end-to-end test: Debian's
# `bazel-bootstrap` (Bazel 4.2.3), which builds `genrule`s offline.
# Idempotent: does nothing when `bazel` already runs.
#
# Usage: .ci/setup.d/bazel.sh
# Then:  cargo test -p rba-cache-server --test bazel_e2e
# (Set RBA_SKIP_BAZEL=1 to skip that test on machines without Bazel.)
set -euo pipefail

if command -v bazel >/dev/null 2>&1 && dpkg -s bazel-bootstrap >/dev/null 2>&1; then
    echo "bazel-bootstrap already installed: $(command -v bazel)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

if ! $SUDO apt-get update; then
    echo "setup-bazel: 'apt-get update' failed (no access to the Debian mirrors?)" >&2
    exit 1
fi
if ! $SUDO apt-get install -y bazel-bootstrap; then
    echo "setup-bazel: 'apt-get install -y bazel-bootstrap' failed." >&2
    echo "  The package is large (it pulls a JDK); check disk space and mirror access." >&2
    exit 1
fi

if ! command -v bazel >/dev/null 2>&1; then
    echo "setup-bazel: bazel-bootstrap installed but no 'bazel' on PATH" >&2
    exit 1
fi
echo "installed: $(command -v bazel) ($(dpkg-query -W -f='${Version}' bazel-bootstrap))"
