#!/usr/bin/env bash
# Installs what the executor's sandbox (rba-executor, hakoniwa) needs on a Debian/Ubuntu host.
# Idempotent: safe to run on every CI run or machine start.
#
#  - uidmap:         newuidmap/newgidmap, used by hakoniwa to map the unprivileged sandbox user
#                    (inside uid 1000) to a non-root host uid (default 65534, "nobody").
#  - libseccomp-dev: links hakoniwa's `seccomp` feature (the sandbox's syscall deny list).
#  - bubblewrap:     `bwrap`, the second isolation provider (`[sandbox] isolation =
#                    "bubblewrap"`); the sandbox test suites run against it too.
#  - /etc/subuid, /etc/subgid: allow the user running the executor (usually root) to map the
#                    sandbox host uid/gid; newuidmap refuses mappings not listed there.
#
# Usage: .ci/setup.d/sandbox.sh [SANDBOX_HOST_UID] (default 65534; gid is the same number)
set -euo pipefail

SANDBOX_UID="${1:-${RBA_SANDBOX_UID:-65534}}"
RUNNER="$(id -un)"

need_install=()
command -v newuidmap >/dev/null 2>&1 || need_install+=(uidmap)
command -v newgidmap >/dev/null 2>&1 || need_install+=(uidmap)
if ! dpkg -s libseccomp-dev >/dev/null 2>&1; then
    need_install+=(libseccomp-dev)
fi
command -v bwrap >/dev/null 2>&1 || need_install+=(bubblewrap)

if ((${#need_install[@]})); then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    # Install from the current lists first; refresh them only when that fails.
    if ! $SUDO apt-get install -y --no-install-recommends "${need_install[@]}" >/dev/null 2>&1; then
        $SUDO apt-get update -qq
        $SUDO apt-get install -y --no-install-recommends "${need_install[@]}"
    fi
fi

add_subid() {
    local file="$1" line="$RUNNER:$SANDBOX_UID:1"
    if [ -f "$file" ] && grep -qxF "$line" "$file"; then
        return
    fi
    if [ "$(id -u)" = 0 ]; then
        echo "$line" >>"$file"
    else
        echo "$line" | sudo tee -a "$file" >/dev/null
    fi
}
add_subid /etc/subuid
add_subid /etc/subgid

echo "sandbox prerequisites ready: newuidmap=$(command -v newuidmap), libseccomp-dev, $RUNNER:$SANDBOX_UID:1 in /etc/sub[ug]id"
