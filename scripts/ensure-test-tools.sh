#!/usr/bin/env bash
# Makes sure the tools the fault tests use besides redis-server are installed:
# `faketime` (libfaketime), which runs a worker process with its clock shifted for the
# clock-skew test. Installs Debian/Ubuntu's package with apt when it is missing; when it
# can't, says how and goes on (the clock-skew test then fails with the same hint).
# Used by scripts/test.sh.
set -euo pipefail

if ! command -v faketime >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
      if command -v sudo >/dev/null 2>&1; then
        sudo="sudo"
      else
        echo "faketime is missing; install it with: apt-get install -y faketime (as root)" >&2
        exit 0
      fi
    fi
    echo "faketime is missing; installing it: $sudo apt-get install -y faketime" >&2
    if ! { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null; }; then
      echo "could not install faketime; the clock-skew test will fail until it is installed" >&2
    fi
  else
    echo "faketime is missing and apt-get is not available; install libfaketime (macOS: 'brew install libfaketime') for the clock-skew test." >&2
  fi
fi
