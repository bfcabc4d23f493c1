#!/usr/bin/env bash
# Makes sure the tools the tests use besides redis-server are installed:
# `faketime` (libfaketime), which runs a worker process with its clock shifted for the
# clock-skew test, and Chromium with chromedriver for the dashboard's browser test. When it can't be installed this says how and goes on (the clock-skew
# test then fails with the same hint). Used by scripts/test.sh.
set -euo pipefail
source "$(dirname "$0")/install-package.sh"

install_package faketime faketime \
  "Install libfaketime (macOS: 'brew install libfaketime') for the clock-skew test." ||
  echo "could not install faketime; the clock-skew test will fail until it is installed" >&2

install_package chromium chromium "Install Chromium for the dashboard test." ||
  echo "could not install chromium; the dashboard test will fail until it is installed" >&2
install_package chromedriver chromium-driver "Install chromedriver for the dashboard test." ||
  echo "could not install chromedriver; the dashboard test will fail until it is installed" >&2
