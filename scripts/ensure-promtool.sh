#!/usr/bin/env bash
# Makes sure promtool (Prometheus's checker for metrics, rules and rule tests) is on PATH:
# installs Debian/Ubuntu's `prometheus` package with apt when it is missing, or prints the
# exact command to run when it can't. Used by scripts/check-metrics.sh and .ci/run.
set -euo pipefail
source "$(dirname "$0")/install-package.sh"

install_package promtool prometheus \
  "Install Prometheus's promtool (macOS: 'brew install prometheus'; or a release from https://prometheus.io/download/) and run this again." ||
  exit 1
