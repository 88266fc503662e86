#!/usr/bin/env bash
# Runs every check of the project on a fresh machine: installs what the tests need (cached under
# $SLIM_CACHE, default ~/.cache/slim-k8s), then fmt, clippy and the whole test suite.
#
#   scripts/test.sh            # everything
#   scripts/test.sh --no-lint  # tests only
set -euo pipefail
cd "$(dirname "$0")/.."

lint=1
[ "${1:-}" = "--no-lint" ] && lint=0

# shellcheck source=scripts/setup.sh
. scripts/setup.sh

if [ "$lint" = 1 ]; then
  log "cargo fmt --check"
  cargo fmt --all -- --check
  log "cargo clippy -D warnings"
  cargo clippy --workspace --all-targets --quiet -- -D warnings
  # The sidecar image's build: the agent without its dev mode (and fake Workload API).
  cargo clippy -p slim-identity-agent --lib --bins --no-default-features --quiet -- -D warnings
  # Known-vulnerable dependencies: the RustSec advisory database snapshot beside the repository,
  # offline; explained, dated ignores in .cargo/audit.toml.
  advisory_db=$(cd .. && pwd)/shared/advisory-db
  if [ -d "$advisory_db" ]; then
    log "cargo audit ($(sed -n 2p "$advisory_db/SNAPSHOT"))"
    "$CACHE/audit/bin/cargo-audit" audit --db "$advisory_db" --no-fetch --deny warnings
  else
    echo "no RustSec advisory database at $advisory_db: cargo audit skipped" >&2
  fi
fi

# The release binaries the node tier packs into images (the agent without its dev mode, as the
# Dockerfile builds it).
log "cargo build --release (the node tier's images)"
# One invocation: one dependency graph for both (the operator has no default features).
cargo build --release --locked --quiet -p slim-operator -p slim-identity-agent --no-default-features --bins

# Unit, integration and doc tests (benchmarks compile under clippy; run them with cargo bench).
log "cargo test"
cargo test --workspace --no-fail-fast

# The local demo, non-interactively: the whole system on this machine, judged by its summary line.
log "scripts/demo.sh --once"
demo_log=$(mktemp)
if ! SLIM_DEMO_SKIP_SETUP=1 scripts/demo.sh --once | tee "$demo_log" || ! grep -q '^demo: OK ' "$demo_log"; then
  echo "the demo did not end with its 'demo: OK' summary line" >&2
  exit 1
fi
rm -f "$demo_log"
