#!/usr/bin/env bash
# Installs what contracts/ (crate rba-contracts) needs to build and test on a Debian/Ubuntu host.
# Idempotent: safe to run on every CI run or machine start.
#
#  - node + npm (apt packages nodejs, npm) when either is missing: they run solc-js.
#  - contracts/node_modules: the solc npm package pinned in contracts/package-lock.json (npm ci).
#  - the tnt-core-bindings crate source in the cargo registry: the tests compare the contract's
#    hook selectors with the ABI that crate ships (it is downloaded, not compiled).
#
# Usage: bash .ci/setup.d/contracts.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CONTRACTS="$ROOT/contracts"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_install=()
command -v node >/dev/null 2>&1 || need_install+=(nodejs)
command -v npm >/dev/null 2>&1 || need_install+=(npm)
if ((${#need_install[@]})); then
    echo "setup-contracts: installing ${need_install[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need_install[@]}" >/dev/null
fi

node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 16 ]; then
    echo "setup-contracts: node $(node --version) is too old; contracts/build.mjs needs node >= 16" >&2
    exit 1
fi

echo "setup-contracts: npm ci in contracts/ (node $(node --version), npm $(npm --version))"
(cd "$CONTRACTS" && npm ci --no-audit --no-fund --loglevel=error)
(cd "$CONTRACTS" && node -e 'const s = require("solc"); console.log("setup-contracts: solc-js " + s.version())')

# The version the tests read, from the crate itself so there is one place to bump it.
TNT_VERSION="$(sed -n 's/^pub const TNT_CORE_BINDINGS_VERSION: &str = "\(.*\)";$/\1/p' "$CONTRACTS/src/lib.rs")"
if [ -z "$TNT_VERSION" ]; then
    echo "setup-contracts: cannot read TNT_CORE_BINDINGS_VERSION from contracts/src/lib.rs" >&2
    exit 1
fi
# `cargo info NAME@VERSION` downloads and unpacks that crate into the cargo registry. Run it
# outside the workspace so it does not look at (or lock) the workspace.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
(cd "$scratch" && cargo info "tnt-core-bindings@$TNT_VERSION" >/dev/null)
echo "setup-contracts: tnt-core-bindings $TNT_VERSION is in the cargo registry"
