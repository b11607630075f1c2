#!/usr/bin/env bash
# Installs what pgwarden's tests, dev stack and benchmarks need and the
# machine lacks: Debian's PostgreSQL server (initdb, postgres), its client
# (psql, pgbench), PgBouncer (benchmarks only), the PostgreSQL JDBC driver
# (pgjdbc, for the driver tests; Java itself when missing) and Compose
# (Debian's docker-compose, unless the docker CLI has its compose plugin: the
# deploy tests have it read docker-compose.yml; no Docker engine is needed).
# As root it installs them with apt-get; otherwise it says what to install.
set -euo pipefail

have_server() {
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then return 0; fi
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}
have_pgbouncer() { command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; }
have_compose() { command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1; }

need=()
have_server || need+=(postgresql)
command -v psql >/dev/null 2>&1 && command -v pgbench >/dev/null 2>&1 || need+=(postgresql-client)
have_pgbouncer || need+=(pgbouncer)
[ -f /usr/share/java/postgresql.jar ] || need+=(libpostgresql-jdbc-java)
command -v java >/dev/null 2>&1 || need+=(default-jre-headless)
have_compose || need+=(docker-compose)
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "pgwarden needs: ${need[*]}" >&2
  echo "install with:   sudo make deps   (it keeps the packages from starting system-wide servers)" >&2
  exit 1
fi
echo "deps: installing ${need[*]} (Debian packages)…"
# testenv and bench make their own throwaway clusters and poolers: the
# packages must not create and start system-wide ones (a PgBouncer service
# would also take port 6432, make dev's).
mkdir -p /etc/postgresql-common
[ -f /etc/postgresql-common/createcluster.conf ] || echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# written by pgwarden scripts/deps.sh for the duration of an install\nexit 101\n' > "$policy"
  chmod 755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian enables the PgBouncer service on install; it would start on port 6432
# at the next boot.
if printf '%s\n' "${need[@]}" | grep -qx pgbouncer; then
  systemctl disable pgbouncer.service >/dev/null 2>&1 || true
  update-rc.d pgbouncer disable >/dev/null 2>&1 || true
fi
have_server || { echo "deps: PostgreSQL server still not found after install" >&2; exit 1; }
have_pgbouncer || { echo "deps: pgbouncer still not found after install" >&2; exit 1; }
have_compose || { echo "deps: docker-compose still not found after install" >&2; exit 1; }
