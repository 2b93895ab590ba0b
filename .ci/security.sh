#!/usr/bin/env bash
# Supply-chain checks with cargo-deny (installed from crates.io into the CI cache):
# licenses, bans, sources, and RustSec advisories.
#
# Advisories need the RustSec database, fetched from GitHub. Where GitHub is not
# reachable, set PIXFARM_ADVISORY_DB to a local git mirror of
# https://github.com/rustsec/advisory-db (a bare repo works); the script then
# checks against that snapshot and prints its date. Without either, advisories are
# skipped with a loud message and the exit status says so (2), so CI cannot mistake
# "not checked" for "clean".
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${PIXFARM_CI_CACHE:-/var/cache/pixfarm}
if ! { mkdir -p "$CACHE" 2>/dev/null && [ -w "$CACHE" ]; }; then CACHE=$ROOT/target/ci-cache; mkdir -p "$CACHE"; fi
DENY_VERSION=${PIXFARM_CARGO_DENY_VERSION:-0.20.2}

log() { printf '\n==> %s\n' "$*"; }

DENY=$(command -v cargo-deny || true)
if [ -z "$DENY" ] && [ -x "$CACHE/bin/cargo-deny" ]; then DENY=$CACHE/bin/cargo-deny; fi
if [ -z "$DENY" ]; then
  log "cargo install cargo-deny@$DENY_VERSION"
  # cargo-deny's own release profile is fat LTO with one codegen unit (~10 min on 2 cores); a
  # checker run once per CI job does not need that, so build it plainly optimised instead.
  CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=false \
    cargo install "cargo-deny@$DENY_VERSION" --locked --root "$CACHE"
  DENY=$CACHE/bin/cargo-deny
fi
log "$("$DENY" --version)"

log "cargo deny check licenses bans sources"
"$DENY" --manifest-path "$ROOT/Cargo.toml" check licenses bans sources

if [ -n "${PIXFARM_ADVISORY_DB:-}" ]; then
  db=$PIXFARM_ADVISORY_DB
  log "advisories against the local mirror $db ($(git --git-dir="$db" log -1 --format='%H, %ci' 2>/dev/null || git -C "$db" log -1 --format='%H, %ci'))"
  # cargo-deny fetches with the git CLI; redirect its GitHub URL to the mirror for this run only
  # (the database directory it keeps is then named exactly as for the real URL).
  GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0="url.file://$db.insteadOf" \
    GIT_CONFIG_VALUE_0=https://github.com/rustsec/advisory-db \
    "$DENY" --manifest-path "$ROOT/Cargo.toml" check advisories
elif timeout 10 git ls-remote https://github.com/rustsec/advisory-db HEAD >/dev/null 2>&1; then
  log "cargo deny check advisories"
  "$DENY" --manifest-path "$ROOT/Cargo.toml" check advisories
else
  log "ADVISORIES NOT CHECKED: github.com is unreachable and PIXFARM_ADVISORY_DB is not set"
  exit 2
fi
