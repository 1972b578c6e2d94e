#!/usr/bin/env bash
# Install the PostgreSQL server packages when no initdb is available (Debian/Ubuntu).
# Never asks: CI runs this as root with no standard input.
set -euo pipefail
# the wal2json output plugin (cdc stream --plugin wal2json; its tests skip without it)
ensure_wal2json() {
  local lib
  for lib in /usr/lib/postgresql/*/lib; do
    [ -d "$lib" ] || continue
    local version; version=$(basename "$(dirname "$lib")")
    if [ ! -e "$lib/wal2json.so" ]; then
      echo "wal2json not found for PostgreSQL $version; installing it with apt-get" >&2
      local sudo=""
      if [ "$(id -u)" -ne 0 ]; then sudo="sudo -n"; fi
      export DEBIAN_FRONTEND=noninteractive
      { $sudo apt-get install -y -qq "postgresql-$version-wal2json" >/dev/null 2>&1 ||
        { $sudo apt-get update -qq && $sudo apt-get install -y -qq \
            "postgresql-$version-wal2json" >/dev/null; }; } ||
        echo "could not install postgresql-$version-wal2json; its tests will skip" >&2
    fi
  done
}
if command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  ensure_wal2json
  exit 0
fi
echo "PostgreSQL server not found; installing it with apt-get" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq postgresql postgresql-contrib >/dev/null
ensure_wal2json
