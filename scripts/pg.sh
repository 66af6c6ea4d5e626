#!/usr/bin/env bash
# A throwaway local PostgreSQL for development, tests and the benchmark.
#
#   scripts/pg.sh start DIR PORT [postgres -c options...]   init DIR if needed, start, wait
#                                                            (PG_PORT_HINT: what to say when PORT is taken)
#   scripts/pg.sh stop DIR                                   fast shutdown, wait
#   scripts/pg.sh drop DIR                                   stop, then delete the cluster
#   scripts/pg.sh bin                                        print the server's bin directory
#   scripts/pg.sh user                                       print the user the server runs as
#                                                            (empty: ourselves, when not root)
#   scripts/pg.sh basebackup PORT DIR                        a streaming standby of the server on
#                                                            PORT in DIR (pg_basebackup -R); start
#                                                            it with "start DIR PORT2"
#   scripts/pg.sh promote DIR                                promote the standby in DIR, wait
#
# Installs Debian's postgresql package when its binaries are missing and we are root.
# PostgreSQL refuses to run as root, so as root the server runs as the "postgres" user
# (created by the package) or, failing that, a "pgsidecar" system user created here.
set -euo pipefail

pg_bindir() {
  local d
  # The newest installed server (a newer client-only version may sit beside it).
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | while read -r b; do [ -x "$b/pg_ctl" ] && [ -x "$b/initdb" ] && echo "$b"; done | tail -n 1 || true)
  if [ -z "$d" ] && command -v pg_ctl >/dev/null 2>&1; then
    d=$(dirname "$(readlink -f "$(command -v pg_ctl)")")
  fi
  if [ -z "$d" ] || [ ! -x "$d/pg_ctl" ]; then
    if [ "$(id -u)" -eq 0 ]; then
      echo "pg.sh: installing PostgreSQL from Debian packages" >&2
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >&2
      apt-get install -y -qq postgresql postgresql-contrib >&2
      d=$(ls -d /usr/lib/postgresql/*/bin | sort -V | while read -r b; do [ -x "$b/pg_ctl" ] && echo "$b"; done | tail -n 1)
    else
      echo "pg.sh: PostgreSQL server binaries not found; install the 'postgresql' package (or run as root to let this script do it)" >&2
      exit 1
    fi
  fi
  echo "$d"
}

run_user() {
  if [ "$(id -u)" -ne 0 ]; then
    echo ""
  elif id postgres >/dev/null 2>&1; then
    echo postgres
  else
    id pgsidecar >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin pgsidecar
    echo pgsidecar
  fi
}

# as_db_user CMD...: runs CMD as the server's user (ourselves when not root).
as_db_user() {
  local u
  u=$(run_user)
  if [ -z "$u" ]; then "$@"; else runuser -u "$u" -- "$@"; fi
}

# data_dir DIR: where the cluster for DIR really lives. PostgreSQL's user must be able to reach
# it; when the checkout sits under a directory only root can enter (e.g. /root), the data goes
# to a fixed place under /tmp instead, derived from DIR so start and stop agree.
data_dir() {
  local dir=$1 u
  u=$(run_user)
  mkdir -p "$(dirname "$dir")"
  local parent
  parent=$(cd "$(dirname "$dir")" && pwd)
  if [ -n "$u" ] && ! runuser -u "$u" -- test -x "$parent" 2>/dev/null; then
    echo "/tmp/pgsidecar-pgdata/$(printf '%s' "$parent/$(basename "$dir")" | md5sum | cut -c1-16)"
  else
    echo "$parent/$(basename "$dir")"
  fi
}

cmd=${1:-}
case "$cmd" in
  bin)
    pg_bindir
    ;;
  user)
    # For files the server must own, e.g. a TLS key (PostgreSQL refuses one others can read).
    run_user
    ;;
  start)
    dir=${2:?usage: pg.sh start DIR PORT [options]}
    port=${3:?usage: pg.sh start DIR PORT [options]}
    shift 3
    bin=$(pg_bindir)
    dir=$(data_dir "$dir")
    mkdir -p "$dir"
    u=$(run_user)
    [ -n "$u" ] && chown "$u" "$dir"
    chmod 700 "$dir"
    if [ ! -f "$dir/PG_VERSION" ]; then
      as_db_user "$bin/initdb" -D "$dir" -U postgres -A trust -E UTF8 --locale=C.UTF-8 --no-sync >"$dir.initdb.log" 2>&1 \
        || { cat "$dir.initdb.log" >&2; exit 1; }
    fi
    if as_db_user "$bin/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
      exit 0
    fi
    # Someone else on the port would make PostgreSQL fail with a bare "Address already in use".
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "pg.sh: port $port on 127.0.0.1 is already in use; ${PG_PORT_HINT:-choose another port}" >&2
      exit 1
    fi
    # Sockets in /tmp: a data directory path can exceed the 107-byte unix socket path limit.
    opts="-p $port -k /tmp -c listen_addresses=127.0.0.1"
    for o in "$@"; do opts="$opts $o"; done
    as_db_user "$bin/pg_ctl" -D "$dir" -o "$opts" -l "$dir/server.log" -w -t 60 start >/dev/null \
      || { tail -n 30 "$dir/server.log" >&2; exit 1; }
    ;;
  drop)
    # Stops the cluster in DIR, if any, and deletes it.
    dir=${2:?usage: pg.sh drop DIR}
    "$0" stop "$dir"
    dir=$(data_dir "$dir")
    rm -rf "$dir" "$dir.initdb.log"
    ;;
  stop)
    dir=${2:?usage: pg.sh stop DIR}
    bin=$(pg_bindir)
    dir=$(data_dir "$dir")
    [ -f "$dir/PG_VERSION" ] || exit 0
    as_db_user "$bin/pg_ctl" -D "$dir" -m fast -w -t 60 stop >/dev/null 2>&1 || true
    ;;
  basebackup)
    from=${2:?usage: pg.sh basebackup PORT DIR}
    dir=${3:?usage: pg.sh basebackup PORT DIR}
    bin=$(pg_bindir)
    dir=$(data_dir "$dir")
    mkdir -p "$dir"
    u=$(run_user)
    [ -n "$u" ] && chown "$u" "$dir"
    chmod 700 "$dir"
    as_db_user "$bin/pg_basebackup" -h 127.0.0.1 -p "$from" -U postgres -D "$dir" -R -X stream -c fast \
      || exit 1
    ;;
  promote)
    dir=${2:?usage: pg.sh promote DIR}
    bin=$(pg_bindir)
    dir=$(data_dir "$dir")
    as_db_user "$bin/pg_ctl" -D "$dir" -w -t 60 promote >/dev/null
    ;;
  *)
    echo "usage: pg.sh start DIR PORT [options] | stop DIR | drop DIR | bin | user | basebackup PORT DIR | promote DIR" >&2
    exit 2
    ;;
esac
