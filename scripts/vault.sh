#!/usr/bin/env bash
# Builds bin/vault from testenv/vaultbin (Vault's Go module, pinned there) once,
# and again only when the pin changes. A cold build takes 10 to 20 minutes and
# ~5 GB of memory on 2 cores, so it is cached in bin/ with a stamp of the pin;
# while it runs it shows the time spent and the packages compiled.
# A copy is kept in ${PGWARDEN_CACHE:-~/.cache/pgwarden}/vault-<pin>, so a fresh
# clone on the same machine (CI's, for one) reuses it; PGWARDEN_CACHE=off
# disables that. Set PGWARDEN_VAULT_BIN to use another vault binary and skip
# the build.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PGWARDEN_VAULT_BIN:-}" ]; then
  [ -x "$PGWARDEN_VAULT_BIN" ] || { echo "PGWARDEN_VAULT_BIN=$PGWARDEN_VAULT_BIN is not executable" >&2; exit 1; }
  exit 0
fi
pin=$(cat testenv/vaultbin/go.mod testenv/vaultbin/go.sum testenv/vaultbin/main.go | sha256sum | cut -c1-16)
if [ -x bin/vault ] && [ "$(cat bin/.vault-pin 2>/dev/null)" = "$pin" ]; then
  exit 0
fi
if command -v vault >/dev/null 2>&1; then
  echo "vault: using $(command -v vault) ($(vault version 2>/dev/null | head -1)); remove it from PATH to build the pinned one"
  exit 0
fi
mkdir -p bin
cache=${PGWARDEN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pgwarden}
if [ "$cache" != off ] && [ -x "$cache/vault-$pin" ]; then
  cp "$cache/vault-$pin" bin/vault.tmp && mv bin/vault.tmp bin/vault
  echo "$pin" > bin/.vault-pin
  echo "vault: reused ${cache/#$HOME/\~}/vault-$pin"
  exit 0
fi
echo "vault: building bin/vault from testenv/vaultbin (pin $pin); the first build takes 10 to 20 minutes on 2 cores"
start=$(date +%s)
export GONOSUMDB=github.com/hashicorp/vault-plugin-database-snowflake,github.com/hashicorp/vault-plugin-secrets-openldap
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# watch PID WHAT [COUNT]: while PID runs, show WHAT, the time since the build
# started and, with COUNT, what it prints: on a terminal as one line rewritten
# in place every second, otherwise as a line every 30 s (CI logs).
watch() {
  local pid=$1 what=$2 count=${3:-} n=0 line el
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    n=$((n + 1))
    el=$(( $(date +%s) - start ))
    line="vault: $what, $((el / 60))m$(printf %02d $((el % 60)))s"
    [ -n "$count" ] && line="$line, $($count)"
    if [ -t 1 ]; then
      printf '\r%s ' "$line"
    elif [ $((n % 30)) -eq 0 ]; then
      echo "$line"
    fi
  done
  if [ -t 1 ]; then printf '\n'; fi
}

# The packages the build needs (std included); listing them downloads
# Vault's modules, the first minutes of a cold build.
(cd testenv/vaultbin && go list -mod=readonly -deps . >"$log" 2>&1) &
pid=$!
watch "$pid" "downloading modules and listing packages"
if ! wait "$pid"; then
  cat "$log" >&2
  exit 1
fi
total=$(grep -c . "$log")

# go build -v names each package as it compiles it (cached ones are not
# compiled again, so a warm cache finishes below the total).
compiled() { echo "$(grep -vc '^#' "$log" || true) of $total packages compiled"; }
(cd testenv/vaultbin && go build -v -mod=readonly -trimpath -ldflags='-s -w' -o ../../bin/vault.tmp . >"$log" 2>&1) &
pid=$!
watch "$pid" "compiling" compiled
if ! wait "$pid"; then
  grep -v '^[a-zA-Z0-9._/-]*$' "$log" >&2 || cat "$log" >&2
  exit 1
fi
mv bin/vault.tmp bin/vault
echo "$pin" > bin/.vault-pin
if [ "$cache" != off ] && mkdir -p "$cache" 2>/dev/null; then
  cp bin/vault "$cache/vault-$pin.tmp" && mv "$cache/vault-$pin.tmp" "$cache/vault-$pin" || true
fi
el=$(( $(date +%s) - start ))
echo "vault: built in $((el / 60))m$(printf %02d $((el % 60)))s: $(bin/vault version)"
