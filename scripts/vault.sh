#!/usr/bin/env bash
# Builds bin/vault from testenv/vaultbin (Vault's Go module, pinned there) once,
# and again only when the pin changes. A cold build takes about ten minutes and
# ~5 GB of memory on 2 cores, so it is cached in bin/ with a stamp of the pin.
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
  echo "vault: reused $cache/vault-$pin"
  exit 0
fi
echo "vault: building bin/vault from testenv/vaultbin (pin $pin); the first build takes ~10 minutes…"
start=$(date +%s)
(
  cd testenv/vaultbin
  GONOSUMDB=github.com/hashicorp/vault-plugin-database-snowflake,github.com/hashicorp/vault-plugin-secrets-openldap \
    go build -mod=readonly -trimpath -ldflags='-s -w' -o ../../bin/vault.tmp .
)
mv bin/vault.tmp bin/vault
echo "$pin" > bin/.vault-pin
if [ "$cache" != off ] && mkdir -p "$cache" 2>/dev/null; then
  cp bin/vault "$cache/vault-$pin.tmp" && mv "$cache/vault-$pin.tmp" "$cache/vault-$pin" || true
fi
echo "vault: built in $(( $(date +%s) - start ))s: $(bin/vault version)"
