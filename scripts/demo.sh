#!/usr/bin/env bash
# The cloudbk recovery drill, step by step, on a throwaway PostgreSQL 15 cluster and a file:// repository:
#
#   archive WAL -> take a base backup -> write more -> note the time -> make a "mistake" (delete rows)
#   -> lose the data directory -> restore to the noted time -> start the server -> the rows are back
#   -> and a `cloudbk drill` of the backup proves, on a scratch copy, that it restores to that time
#
# Every command is printed before it runs, so the output doubles as a walk-through of the workflow.
# Run it as root (PostgreSQL and cloudbk then run as the `postgres` user) or as any non-root user.
# It installs cloudbk first (scripts/install.sh) if /opt/cloudbk-venv has no cloudbk yet.
# KEEP=1 keeps the work directory (cluster, repository, logs) for a look afterwards.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${CLOUDBK_VENV:-/opt/cloudbk-venv}"
PG_BIN="${CLOUDBK_PG_BIN:-/usr/lib/postgresql/15/bin}"

bold() { if [ -t 1 ]; then printf '\033[1m%s\033[0m\n' "$*"; else printf '%s\n' "$*"; fi; }
step() { echo; bold "== $*"; }
note() { printf '   %s\n' "$*"; }

if [ ! -x "$VENV/bin/cloudbk" ]; then
  step "cloudbk is not installed yet: running scripts/install.sh"
  bash "$HERE/install.sh"
fi

# Who runs PostgreSQL: it refuses to run as root, so root hands the work to the postgres user.
if [ "$(id -u)" -eq 0 ]; then
  PG_USER=postgres
  id "$PG_USER" >/dev/null 2>&1 || { echo "the postgres OS user is missing (scripts/install.sh creates it)" >&2; exit 1; }
else
  PG_USER="$(id -un)"
fi
as_pg() {
  local env_path="$VENV/bin:$PG_BIN:/usr/local/bin:/usr/bin:/bin"
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u "$PG_USER" -- env PATH="$env_path" HOME="$WORK" "$@"
  else
    env PATH="$env_path" "$@"
  fi
}
# Print a command the way a user would type it (quoting what needs it), then run it as the PostgreSQL user.
show() {
  local out="   \$" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=%+@,-]+$ ]]; then out+=" $arg"; else out+=" '$arg'"; fi
  done
  printf '%s\n' "$out"
}
run() { show "$@"; as_pg "$@"; }
quiet() { show "$@"; as_pg "$@" >/dev/null; }

WORK="$(mktemp -d /tmp/cloudbk-demo.XXXXXX)"
chmod 755 "$WORK"
[ "$(id -u)" -eq 0 ] && chown "$PG_USER" "$WORK"
cd "$WORK"
PGDATA="$WORK/pgdata"
REPO="file://$WORK/repository"
SERVER=demo
PORT="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
CONN="host=127.0.0.1 port=$PORT user=postgres dbname=postgres"
export CLOUDBK_REPO="$REPO" CLOUDBK_SERVER="$SERVER"

cleanup() {
  if [ -f "$PGDATA/postmaster.pid" ]; then as_pg pg_ctl -D "$PGDATA" -m immediate -w stop >/dev/null 2>&1 || true; fi
  if [ "${KEEP:-0}" = "1" ]; then echo; note "kept $WORK (KEEP=1)"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

psql_() { as_pg psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d postgres "$@"; }
sql() { printf '   sql> %s\n' "$1"; psql_ -c "$1"; }
value() { psql_ -At -c "$1"; }
wait_archived() {
  for _ in $(seq 1 300); do
    if ! ls "$PGDATA/pg_wal/archive_status/" 2>/dev/null | grep -q '\.ready$'; then return 0; fi
    sleep 0.2
  done
  echo "WAL was not archived within 60s; see $WORK/postgres.log" >&2
  exit 1
}

bold "cloudbk recovery drill: work directory $WORK, repository $REPO, server name '$SERVER'"

step "1. Create a PostgreSQL 15 cluster"
quiet initdb -D "$PGDATA" -U postgres --auth=trust -E UTF8 --locale=C
note "and point archive_command at cloudbk (PostgreSQL calls it once for every finished 16 MiB WAL segment):"
as_pg tee -a "$PGDATA/postgresql.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$WORK'
wal_level = replica
archive_mode = on
archive_command = '$VENV/bin/cloudbk-wal-push --repo $REPO --server $SERVER %p'
EOF
note "archive_mode = on"
note "archive_command = 'cloudbk-wal-push --repo $REPO --server $SERVER %p'"
quiet pg_ctl -D "$PGDATA" -l "$WORK/postgres.log" -w start

step "2. Write some data"
sql "CREATE TABLE orders (id int PRIMARY KEY, customer text, amount numeric)"
sql "INSERT INTO orders SELECT g, 'customer ' || g % 100, g * 1.5 FROM generate_series(1, 10000) g"

step "3. Take a base backup (it streams PGDATA to the repository and waits until its WAL is archived)"
show cloudbk backup-push --dbname "$CONN" --pgdata "$PGDATA"
BACKUP_ID="$(as_pg cloudbk backup-push --dbname "$CONN" --pgdata "$PGDATA" | tail -n 1)"
note "backup id: $BACKUP_ID"
run cloudbk backup-list

step "4. Keep working after the backup"
sql "INSERT INTO orders SELECT g, 'late customer', 42 FROM generate_series(10001, 10500) g"
NOTED="$(value "SELECT now()")"
note "everything is fine at $NOTED: we note this time ($(value "SELECT count(*) FROM orders") orders)"
sleep 1

step "5. The mistake: a DELETE without the right WHERE clause"
sql "DELETE FROM orders WHERE amount > 10"
note "orders left: $(value "SELECT count(*) FROM orders")"
note "make sure the WAL holding the mistake is archived too (PostgreSQL would do it on its own, later):"
sql "SELECT pg_switch_wal()" >/dev/null
wait_archived

step "6. Disaster: the server stops and the data directory is lost"
quiet pg_ctl -D "$PGDATA" -m fast -w stop
run rm -rf "$PGDATA"

step "7. Restore to the noted time: the plan is printed and checked before anything is written"
run cloudbk restore "$PGDATA" --target-time "$NOTED"

step "8. Start the server: it fetches WAL with cloudbk-wal-fetch, replays to the noted time and promotes"
quiet pg_ctl -D "$PGDATA" -l "$WORK/postgres.log" -w start
for _ in $(seq 1 300); do
  [ "$(value "SELECT pg_is_in_recovery()" 2>/dev/null || echo t)" = "f" ] && break
  sleep 0.2
done
sql "SELECT count(*) AS orders, count(*) FILTER (WHERE amount > 10) AS \"rows the mistake deleted\" FROM orders"
COUNT="$(value "SELECT count(*) FROM orders")"
if [ "$COUNT" != "10500" ]; then
  echo "expected 10500 orders after the restore, found $COUNT; see $WORK/postgres.log" >&2
  KEEP=1
  exit 1
fi
note "all 10500 orders are back; the server now writes a new timeline ($(value "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")), which it archives as well"

step "9. Prove the backup restores: a drill on a scratch copy, beside the running server"
note "cloudbk drill restores the backup into a scratch directory, starts it on a private socket and a free"
note "port with archiving off, replays to the target, runs the checks, stops it and removes the scratch:"
run cloudbk drill --backup "$BACKUP_ID" --target-time "$NOTED" --check-sql "SELECT count(*) FROM orders" \
  --workdir "$WORK"
note "the drill left a proof in the repository: backup-list shows when each backup was last verified and drilled"
run cloudbk backup-list
note "commands used: cloudbk-wal-push (archive_command), cloudbk backup-push, backup-list, restore, cloudbk-wal-fetch"
note "(restore_command), drill. Schedule the drill weekly: see the README."
