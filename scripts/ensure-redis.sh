#!/usr/bin/env bash
# Makes sure a redis-server >= 6.2 is on PATH: installs Debian/Ubuntu's package with apt
# when it is missing, or prints the exact command to run when it can't.
# Used by scripts/demo.sh, scripts/test.sh and .ci/run, so that all three agree.
set -euo pipefail

if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
      if command -v sudo >/dev/null 2>&1; then
        sudo="sudo"
      else
        echo "redis-server is missing; install it with: apt-get install -y redis-server (as root)" >&2
        exit 1
      fi
    fi
    echo "redis-server is missing; installing it: $sudo apt-get install -y redis-server" >&2
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is missing and apt-get is not available." >&2
    echo "Install Redis 6.2 or newer (macOS: 'brew install redis'; Fedora: 'sudo dnf install redis') and run this again." >&2
    exit 1
  fi
fi

version=$(redis-server --version | sed -n 's/.*v=\([0-9][0-9.]*\).*/\1/p')
major=${version%%.*}
minor=$(echo "$version" | cut -d. -f2)
if [ -z "$version" ] || [ "$major" -lt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -lt 2 ]; }; then
  echo "redis-server $version is too old: ForgeMQ needs Redis 6.2 or newer (LPOP with a count, BLPOP with sub-second timeouts)." >&2
  exit 1
fi
