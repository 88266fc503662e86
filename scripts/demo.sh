#!/usr/bin/env bash
# The whole system on this machine, on 127.0.0.1: a real kube-apiserver and etcd, two SLIM nodes,
# the channel manager, slim-operator, two member apps; see the README ("Try it").
#
#   scripts/demo.sh          # runs until Ctrl-C, then stops everything it started
#   scripts/demo.sh --once   # exits after the summary line (what scripts/test.sh checks)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${SLIM_DEMO_SKIP_SETUP:-}" ]; then
  # Only what the demo uses (not the test suite's tools).
  SLIM_SETUP=demo
  # shellcheck source=scripts/setup.sh
  . scripts/setup.sh
else
  log() { printf '\n==> %s\n' "$*"; }
fi
log "building slim-operator and the demo"
cargo build --quiet -p slim-operator -p slim-e2e --bins
exec target/debug/slim-demo "$@"
