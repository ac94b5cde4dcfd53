#!/usr/bin/env bash
# Runs a command with HELIX_TEST_POSTGRES_URL pointing at a reachable PostgreSQL server: the one
# given (or 127.0.0.1:5432), else a throwaway cluster made with initdb + pg_ctl in a temp directory.
# With neither, the command still runs and the PostgreSQL tests skip loudly (or fail under CI=true).
set -euo pipefail

url="${HELIX_TEST_POSTGRES_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/test}"
reachable() {
  "${PYTHON:-.venv/bin/python}" - "$1" <<'PY' >/dev/null 2>&1
import sys, psycopg
psycopg.connect(sys.argv[1].replace("postgresql+psycopg://", "postgresql://"), connect_timeout=3).close()
PY
}

if reachable "$url"; then
  export HELIX_TEST_POSTGRES_URL="$url"
  exec "$@"
fi

bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
  echo "!!! No PostgreSQL at $url and no initdb on this machine: the PostgreSQL tests will be SKIPPED." >&2
  exec "$@"
fi

dir=$(mktemp -d /tmp/helix-pg.XXXXXX)
port=$("${PYTHON:-.venv/bin/python}" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_owner=()
if [ "$(id -u)" = 0 ]; then
  # initdb refuses to run as root.
  chown nobody "$dir"
  as_owner=(runuser -u nobody --)
fi
echo ">>> No PostgreSQL at $url: starting a throwaway cluster in $dir on port $port" >&2
"${as_owner[@]}" "$bindir/initdb" -D "$dir/data" -U postgres -A trust >/dev/null
"${as_owner[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
  -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c max_connections=300" start >/dev/null
cleanup() { "${as_owner[@]}" "$bindir/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap cleanup EXIT
"${as_owner[@]}" "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres test
export HELIX_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$port/test"
"$@"
