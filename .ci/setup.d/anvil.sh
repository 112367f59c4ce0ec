#!/usr/bin/env bash
# Installs Foundry's anvil (a local EVM node) for the Tangle end-to-end test
# (agent/tests/tangle_chain.rs): the npm package @foundry-rs/anvil pinned in
# tests/anvil/package-lock.json (1.7.1, the anvil that dumped the blueprint SDK's saved chain
# state with Tangle core deployed). Foundry itself is not installable here; its npm package
# carries the release binary for the platform as an optional dependency.
# Idempotent: `npm ci` only when the pinned binary is missing or is another version.
#
# Usage: bash .ci/setup.d/anvil.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="$ROOT/tests/anvil"
WANT="$(node -p 'require(process.argv[1]).dependencies["@foundry-rs/anvil"]' "$DIR/package.json")"

installed() {
    local bin
    for bin in "$DIR"/node_modules/@foundry-rs/anvil-*/bin/anvil; do
        [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "Version: $WANT" && return 0
    done
    return 1
}

if ! installed; then
    echo "setup-anvil: npm ci in tests/anvil (anvil $WANT)"
    (cd "$DIR" && npm ci --no-audit --no-fund --loglevel=error)
fi
installed || { echo "setup-anvil: anvil $WANT did not install under $DIR/node_modules" >&2; exit 1; }
echo "setup-anvil: $(ls "$DIR"/node_modules/@foundry-rs/anvil-*/bin/anvil | head -1) is anvil $WANT"

# The saved chain state (Tangle core deployed) the test starts anvil from ships in the crate
# blueprint-chain-setup-anvil, locked in Cargo.lock as an optional dependency we never build.
# `cargo info NAME@VERSION` unpacks it into the cargo registry; run outside the workspace.
CRATE=blueprint-chain-setup-anvil
VERSION="$(awk -v n="name = \"$CRATE\"" '$0==n{getline; gsub(/version = |"/,""); print; exit}' "$ROOT/Cargo.lock")"
if [ -z "$VERSION" ]; then
    echo "setup-anvil: $CRATE is not in Cargo.lock" >&2
    exit 1
fi
if ! compgen -G "${CARGO_HOME:-$HOME/.cargo}/registry/src/*/$CRATE-$VERSION/snapshots/localtestnet-state.json" >/dev/null; then
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    (cd "$scratch" && cargo info "$CRATE@$VERSION" >/dev/null)
fi
echo "setup-anvil: $CRATE $VERSION (the saved Tangle chain state) is in the cargo registry"
