#!/usr/bin/env bash
# Installs what pgwarden's tests and dev stack need and the machine lacks:
# Debian's PostgreSQL server (initdb, postgres) and client (psql).
# As root it installs them with apt-get; otherwise it says what to install.
set -euo pipefail

have_server() {
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then return 0; fi
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

need=()
have_server || need+=(postgresql)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "pgwarden needs: ${need[*]}" >&2
  echo "install with:   sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "deps: installing ${need[*]} (Debian packages)…"
# testenv makes its own throwaway clusters: do not let the package create and
# start a system-wide one.
mkdir -p /etc/postgresql-common
[ -f /etc/postgresql-common/createcluster.conf ] || echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
have_server || { echo "deps: PostgreSQL server still not found after install" >&2; exit 1; }
