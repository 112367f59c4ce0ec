#!/usr/bin/env bash
# Installs moto 5.2.1 in server mode (`moto_server`, an S3-compatible HTTP server on PyPI), the
# real S3 server the scale-out store's tests run against (tests/src/s3.rs, cas/tests/bucket.rs):
# the project's tests use a real server process, never a mock object, and moto is the one that
# installs from a package registry without a container. It goes into its own venv at
# ~/.cache/rba-tools/moto, where the harness (rba_e2e_tests::s3::TestS3) looks first.
# Idempotent: does nothing when that venv already has moto 5.2.1 with its server extra.
#
# Usage: bash .ci/setup.d/s3.sh
# Then:  cargo test -p rba-cas --test bucket
set -euo pipefail

VERSION=5.2.1
VENV="$HOME/.cache/rba-tools/moto"

installed() {
    [ -x "$VENV/bin/moto_server" ] &&
        "$VENV/bin/python" -c "import importlib.metadata as m, flask, flask_cors; assert m.version('moto') == '$VERSION'" 2>/dev/null
}

if installed; then
    echo "setup-s3: moto $VERSION already installed: $VENV/bin/moto_server"
    exit 0
fi
if [ ! -x "$VENV/bin/pip" ]; then
    mkdir -p "$(dirname "$VENV")"
    if ! python3 -m venv "$VENV"; then
        echo "setup-s3: 'python3 -m venv $VENV' failed (package python3-venv?)" >&2
        exit 1
    fi
fi
if ! "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$VERSION"; then
    echo "setup-s3: pip could not install moto[server]==$VERSION" >&2
    exit 1
fi
installed || { echo "setup-s3: moto $VERSION did not install a working moto_server in $VENV" >&2; exit 1; }
echo "installed: $VENV/bin/moto_server (moto $VERSION)"
