#!/usr/bin/env bash
# A throwaway PostgreSQL server for the test suite, from Debian's packages, on a loopback port.
#   scripts/pg_test_server.sh start   # prints the URL tests read from RLHF_TEST_PG_URL
#   scripts/pg_test_server.sh stop
# initdb refuses to run as root, so the cluster belongs to Debian's `postgres` user.
set -euo pipefail
PORT=${RLHF_TEST_PG_PORT:-55432}
DIR=${RLHF_TEST_PG_DIR:-/tmp/rlhf-test-pg-$PORT}
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -n "$BIN" ] || { echo "PostgreSQL server binaries not found; run: apt-get install postgresql" >&2; exit 1; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

case "${1:-}" in
start)
  if [ -f "$DIR/postmaster.pid" ] && as_pg "$BIN/pg_ctl" -D "$DIR" status >/dev/null 2>&1; then
    as_pg "$BIN/pg_ctl" -D "$DIR" stop -m fast >/dev/null
  fi
  rm -rf "$DIR"; mkdir -p "$DIR"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$DIR"
  as_pg "$BIN/initdb" -D "$DIR" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$DIR.initdb.log" 2>&1 \
    || { cat "$DIR.initdb.log" >&2; exit 1; }
  as_pg "$BIN/pg_ctl" -D "$DIR" -l "$DIR/server.log" -w -t 60 \
    -o "-h 127.0.0.1 -p $PORT -k $DIR -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" start >/dev/null
  echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/postgres"
  ;;
stop)
  if [ -d "$DIR" ]; then
    as_pg "$BIN/pg_ctl" -D "$DIR" stop -m fast >/dev/null 2>&1 || true
    rm -rf "$DIR" "$DIR.initdb.log"
  fi
  ;;
*) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
