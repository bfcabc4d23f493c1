#!/usr/bin/env bash
# Makes sure a redis-server >= 6.2 is on PATH: installs Debian/Ubuntu's package with apt
# when it is missing, or prints the exact command to run when it can't.
# With REDIS_SERVER=/path/to/redis-server (the binary the tests start instead, e.g. from
# scripts/redis62.sh) that binary is checked instead, and nothing is installed.
# Used by scripts/demo.sh, scripts/test.sh and .ci/run, so that all three agree.
set -euo pipefail
source "$(dirname "$0")/install-package.sh"

if [ -n "${REDIS_SERVER:-}" ]; then
  [ -x "$REDIS_SERVER" ] || { echo "REDIS_SERVER=$REDIS_SERVER is not an executable redis-server" >&2; exit 1; }
  server=$REDIS_SERVER
else
  install_package redis-server redis-server \
    "Install Redis 6.2 or newer (macOS: 'brew install redis'; Fedora: 'sudo dnf install redis') and run this again." ||
    exit 1
  server=redis-server
fi

version=$("$server" --version | sed -n 's/.*v=\([0-9][0-9.]*\).*/\1/p')
major=${version%%.*}
minor=$(echo "$version" | cut -d. -f2)
if [ -z "$version" ] || [ "$major" -lt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -lt 2 ]; }; then
  echo "$server $version is too old: ForgeMQ needs Redis 6.2 or newer (LPOP with a count, BLPOP with sub-second timeouts)." >&2
  exit 1
fi
