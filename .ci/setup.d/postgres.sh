#!/usr/bin/env bash
# Installs Debian's PostgreSQL server for the tests of the scale-out backends (cas/tests/postgres.rs,
# the PostgreSQL blob index, action cache and grants): each test starts a private cluster of
# its own in a temporary directory with these binaries (rba_e2e_tests::postgres), as the
# `postgres` system user the package creates; no system-wide cluster is needed or started.
# Idempotent: does nothing when a server binary and the `postgres` user are already there.
#
# Usage: bash .ci/setup.d/postgres.sh
# Then:  cargo test -p rba-cas --test postgres
set -euo pipefail

installed() {
    compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null &&
        compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null &&
        id -u postgres >/dev/null 2>&1 &&
        command -v setpriv >/dev/null 2>&1
}

if ! installed; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    # Install from the current lists first; refresh them only when that fails. The package's
    # own cluster is not wanted (tests start their own): create none.
    $SUDO mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" |
        $SUDO tee /etc/postgresql-common/createcluster.d/rba-no-main-cluster.conf >/dev/null
    if ! $SUDO apt-get install -y --no-install-recommends postgresql util-linux procps >/dev/null 2>&1; then
        if ! $SUDO apt-get update -qq; then
            echo "setup-postgres: 'apt-get update' failed (no access to the Debian mirrors?)" >&2
            exit 1
        fi
        $SUDO apt-get install -y --no-install-recommends postgresql util-linux procps
    fi
fi

if ! installed; then
    echo "setup-postgres: postgresql installed but no server binary under /usr/lib/postgresql/*/bin or no postgres user" >&2
    exit 1
fi
echo "setup-postgres: $(ls -d /usr/lib/postgresql/*/bin/postgres | tail -1) ($(id -un postgres) user)"
