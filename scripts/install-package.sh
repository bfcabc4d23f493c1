#!/usr/bin/env bash
# install_package COMMAND PACKAGE [HINT]: makes sure COMMAND is on PATH, installing the
# Debian/Ubuntu PACKAGE with apt-get when it is missing (through sudo when not root).
# When that can't be done it prints the exact command to run, plus HINT for other systems,
# and returns 1. Sourced by ensure-redis.sh and ensure-test-tools.sh.
install_package() {
  local cmd=$1 pkg=$2 hint=${3:-}
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "$cmd is missing and apt-get is not available. ${hint}" >&2
    return 1
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "$cmd is missing; install it with: apt-get install -y $pkg (as root)" >&2
      return 1
    fi
    sudo="sudo"
  fi
  echo "$cmd is missing; installing it: $sudo apt-get install -y $pkg" >&2
  $sudo apt-get update -qq &&
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
}
