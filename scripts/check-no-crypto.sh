#!/usr/bin/env bash
# The library without its `tls` feature must not build any crypto: no rustls, no ring, no
# aws-lc (issue 13: TLS is opt-out, and one crypto provider in the whole workspace).
set -euo pipefail
cd "$(dirname "$0")/.."
crypto=$(cargo tree -p forgemq --no-default-features -e normal --prefix none \
    | grep -E '^(rustls|ring|aws-lc-rs|aws-lc-sys|openssl|native-tls) ' || true)
if [ -n "$crypto" ]; then
    echo "forgemq --no-default-features builds crypto crates:" >&2
    echo "$crypto" >&2
    exit 1
fi
# And the whole workspace has one crypto provider: ring, never aws-lc.
if cargo tree --workspace -e normal,dev --prefix none | grep -qE '^aws-lc-(rs|sys) '; then
    echo "the workspace builds aws-lc besides ring" >&2
    exit 1
fi
echo "forgemq without tls builds no crypto; the workspace's one crypto provider is ring"
