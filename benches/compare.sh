#!/usr/bin/env bash
# Side-by-side benchmark: direct PostgreSQL (plaintext and TLS), HAProxy (mode
# tcp, plaintext both sides: the cheapest possible hop, figure a only),
# PgBouncer (client TLS, session pooling) and pg-tls-proxy (plaintext and
# verify-full backend link), all on 127.0.0.1 of this machine, with throwaway
# parts. Figure a also gives each single-process front end's CPU per
# transaction (utime + stime from /proc/PID/stat over the run).
#
#   bash benches/compare.sh            # full run (~10 minutes on 2 cores)
#   bash benches/compare.sh --quick    # smoke run (~3 minutes)
#
# Options: --quick, --rounds R (default 2), --sessions N (idle sessions for the
# memory figure; default 1000, 200 with --quick), --only LETTERS (figures to
# run, e.g. --only ad; default abcdef), --keep (keep the temp dir), --no-build
# (use the existing target/release/pg-tls-proxy as it is), --baseline BIN (a
# second pg-tls-proxy binary, e.g. a build of the previous commit, run as one
# more column in figures a and e: before/after in the same run).
# Prints one table and writes it as Markdown to benches/results/latest.md
# (benches/results/quick.md for --quick). See benches/README.md.
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."
repo=$(pwd)
helpers="$repo/benches/compare_helpers.py"

mode=full rounds=2 sessions="" keep=0 only=abcdef build=1 baseline=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) mode=quick ;;
    --rounds) rounds=$2; shift ;;
    --sessions) sessions=$2; shift ;;
    --keep) keep=1 ;;
    --no-build) build=0 ;;
    --only) only=$2; shift ;;
    --baseline) baseline=$(realpath "$2"); shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "compare.sh: unknown option $1 (try --help)" >&2; exit 64 ;;
  esac
  shift
done
if [ "$mode" = quick ]; then
  T_TPS=3 T_STORM=3 T_LAT=2 T_HS=2 BULK_MB=100 N=${sessions:-200} mode_flag=" --quick"
  out_md="$repo/benches/results/quick.md"
else
  T_TPS=10 T_STORM=10 T_LAT=8 T_HS=5 BULK_MB=1000 N=${sessions:-1000} mode_flag=""
  out_md="$repo/benches/results/latest.md"
fi
[ "$rounds" -ge 2 ] 2>/dev/null || { echo "compare.sh: --rounds must be >= 2" >&2; exit 64; }
started=$SECONDS

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# Warnings go to a file too: some are raised inside $(...) subshells.
warn() { printf '\033[33mWARNING: %s\033[0m\n' "$*" >&2; [ -n "${work:-}" ] && echo "$*" >> "$work/warnings"; }

# Whatever the caller's environment says about libpq, these runs set their own.
for v in $(env | grep -o '^PG[A-Z_]*=' | tr -d =); do unset "$v"; done
export PGGSSENCMODE=disable PGCONNECT_TIMEOUT=10

# ------------------------------------------------------------ prerequisites
say "prerequisites"
PGBIN=/usr/lib/postgresql/15/bin
if [ ! -x "$PGBIN/initdb" ] || [ ! -x "$PGBIN/pgbench" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing PostgreSQL 15 (apt-get install postgresql-15)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 postgresql-client-15 >/dev/null
  fi
fi
[ -x "$PGBIN/initdb" ] || { echo "PostgreSQL 15 server binaries not found in $PGBIN" >&2; exit 1; }
if ! command -v pgbouncer >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing PgBouncer (apt-get install pgbouncer)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null; }
  fi
fi
command -v pgbouncer >/dev/null || { echo "pgbouncer not found: apt-get install pgbouncer" >&2; exit 1; }
if ! command -v haproxy >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing HAProxy (apt-get install haproxy)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy >/dev/null; }
  fi
fi
command -v haproxy >/dev/null || { echo "haproxy not found: apt-get install haproxy" >&2; exit 1; }
for tool in python3 curl openssl; do
  command -v "$tool" >/dev/null || { echo "$tool not found" >&2; exit 1; }
done
PSQL="$PGBIN/psql" PGBENCH="$PGBIN/pgbench"
echo "PostgreSQL: $("$PGBIN/postgres" --version); $(pgbouncer --version | head -n 1)"

PROXY="$repo/target/release/pg-tls-proxy"
if [ "$build" = 1 ]; then
  say "building pg-tls-proxy (cargo build --release --bin pg-tls-proxy)"
  cargo build --release --quiet --bin pg-tls-proxy
else
  [ -x "$PROXY" ] || { echo "--no-build: $PROXY does not exist" >&2; exit 1; }
  echo "--no-build: using $PROXY as built $(date -u -r "$PROXY" '+%Y-%m-%d %H:%M UTC')"
fi

# Enough descriptors for N idle sessions (client, proxy and PgBouncer each hold
# one or two per session).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((2 * N + 200)) ]; then
  echo "open-file limit $(ulimit -n) is too low for --sessions $N" >&2; exit 1
fi

# ------------------------------------------------------------ throwaway parts
work=$(mktemp -d /tmp/pg-tls-proxy-bench.XXXXXX)
chmod 755 "$work"
mkdir -p "$work/pg" "$work/pgb" "$work/lat"
as_pg=()
if [ "$(id -u)" = 0 ]; then
  # initdb, postgres and pgbouncer refuse to run as root. setpriv execs, so $!
  # is the server's own pid.
  as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups)
  chown postgres:postgres "$work/pg" "$work/pgb"
fi
run_pg() { (cd "$work" && exec "${as_pg[@]}" "$@"); }

declare -A pid=()
cleanup() {
  local rc=$?
  set +e
  for name in "${!pid[@]}"; do
    kill -INT "${pid[$name]}" 2>/dev/null
  done
  [ -n "${pid[pgbouncer]:-}" ] && kill -TERM "${pid[pgbouncer]}" 2>/dev/null
  for _ in $(seq 50); do
    alive=0
    for name in "${!pid[@]}"; do kill -0 "${pid[$name]}" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for name in "${!pid[@]}"; do kill -KILL "${pid[$name]}" 2>/dev/null; done
  [ -d "$work/pg/data" ] && run_pg "$PGBIN/pg_ctl" -D "$work/pg/data" -m immediate stop >/dev/null 2>&1
  if [ "$keep" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Distinct free loopback ports, all bound at once so that no two are equal.
read -r PG_PORT PGB_PORT PX_PORT PX_ADMIN VF_PORT VF_ADMIN DENY_PORT DENY_ADMIN \
  DEAD_PORT DEAD_ADMIN DEAD_BACKEND HAP_PORT BASE_PORT BASE_ADMIN W1_PORT W1_ADMIN < <(python3 -c '
import socket
socks = []
for _ in range(16):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))')

wait_tcp() { # port seconds
  local i
  for i in $(seq $(($2 * 10))); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

say "certificates: pg-tls-proxy dev-certs --client someone"
"$PROXY" dev-certs --out "$work/certs" --client someone >/dev/null
CA="$work/certs/ca.crt"
cp "$work/certs/server.crt" "$work/certs/server.key" "$work/pg/"
cp "$work/certs/server.crt" "$work/certs/server.key" "$work/pgb/"
if [ "$(id -u)" = 0 ]; then
  chown postgres:postgres "$work/pg/server.crt" "$work/pg/server.key" "$work/pgb/server.crt" "$work/pgb/server.key"
fi
chmod 600 "$work/pg/server.key" "$work/pgb/server.key"

say "PostgreSQL 15 on 127.0.0.1:$PG_PORT (ssl=on, max_connections=$((N + 150)))"
run_pg "$PGBIN/initdb" -D "$work/pg/data" -U postgres -A trust --no-sync -E UTF8 --locale=C >/dev/null
cat >> "$work/pg/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$work/pg'
max_connections = $((N + 150))
shared_buffers = 256MB
ssl = on
ssl_cert_file = '$work/pg/server.crt'
ssl_key_file = '$work/pg/server.key'
fsync = off
synchronous_commit = off
full_page_writes = off
max_wal_size = 8GB
checkpoint_timeout = 30min
autovacuum = off
CONF
# trust on 127.0.0.1 for every path: no password hashing on either side, so
# the figures show transport and TLS costs. "nobody" is rejected (handshake
# figure: a refused login after a full TLS handshake).
cat > "$work/pg/data/pg_hba.conf" <<HBA
local all all trust
hostssl all nobody 127.0.0.1/32 reject
host all all 127.0.0.1/32 trust
HBA
run_pg "$PGBIN/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w -t 60 start >/dev/null
sock() { "$PSQL" -X -q -v ON_ERROR_STOP=1 -h "$work/pg" -p "$PG_PORT" "$@"; }
sock -U postgres -d postgres -c "CREATE ROLE bench LOGIN" -c "CREATE DATABASE bench OWNER bench"
echo "pgbench -i -s 10 (directly)"
"$PGBENCH" -q -i -s 10 -h "$work/pg" -p "$PG_PORT" -U bench bench >/dev/null 2>&1
sock -U bench -d bench -c "CREATE UNLOGGED TABLE t (id int, payload text)"
ROWS=$((BULK_MB * 992))
COPY_QUERY="COPY (SELECT g, repeat('x', 1000) FROM generate_series(1, $ROWS) g) TO STDOUT"
sock -U bench -d bench -c "$COPY_QUERY" > "$work/bulk.tsv"
BULK_BYTES=$(stat -c %s "$work/bulk.tsv")
echo "bulk file: $BULK_BYTES bytes ($ROWS rows)"
echo 'SELECT 1;' > "$work/select1.sql"

say "PgBouncer on 127.0.0.1:$PGB_PORT (session pooling, client_tls_sslmode=require, plaintext to PostgreSQL)"
printf '"bench" ""\n' > "$work/pgb/userlist.txt"
cat > "$work/pgb/pgbouncer.ini" <<INI
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = trust
auth_file = $work/pgb/userlist.txt
pool_mode = session
max_client_conn = $((N + 200))
default_pool_size = $((N + 50))
max_db_connections = 0
client_tls_sslmode = require
client_tls_cert_file = $work/pgb/server.crt
client_tls_key_file = $work/pgb/server.key
server_tls_sslmode = disable
ignore_startup_parameters = extra_float_digits
logfile = $work/pgb/pgbouncer.log
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
INI
[ "$(id -u)" = 0 ] && chown postgres:postgres "$work/pgb/pgbouncer.ini" "$work/pgb/userlist.txt"
start_pgbouncer() {
  (cd "$work" && exec "${as_pg[@]}" pgbouncer "$work/pgb/pgbouncer.ini") 2>>"$work/pgb/stderr" &
  pid[pgbouncer]=$!
  wait_tcp "$PGB_PORT" 10 || { cat "$work/pgb/stderr" "$work/pgb/pgbouncer.log" >&2; echo "PgBouncer did not start" >&2; exit 1; }
}
stop_pid() { # name signal
  local p=${pid[$1]:-}
  [ -n "$p" ] || return 0
  kill "-$2" "$p" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  unset "pid[$1]"
}
start_pgbouncer

say "HAProxy on 127.0.0.1:$HAP_PORT (mode tcp, plaintext both sides, one process)"
cat > "$work/haproxy.cfg" <<CFG
global
  maxconn $((N + 200))
defaults
  mode tcp
  timeout connect 5s
  timeout client 300s
  timeout server 300s
frontend pg
  bind 127.0.0.1:$HAP_PORT
  default_backend pg
backend pg
  server pg 127.0.0.1:$PG_PORT
CFG
haproxy -c -f "$work/haproxy.cfg" >/dev/null || { echo "haproxy config check failed" >&2; exit 1; }
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
pid[haproxy]=$!
wait_tcp "$HAP_PORT" 10 || { cat "$work/haproxy.log" >&2; echo "HAProxy did not start" >&2; exit 1; }

say "pg-tls-proxy instances"
proxy_conf() { # name port admin backend_port sslmode extra-toml
  cat > "$work/$1.toml" <<CONF
[listen]
address = "127.0.0.1:$2"
[tls]
cert = "$work/certs/server.crt"
key = "$work/certs/server.key"
[backend]
address = "127.0.0.1:$4"
sslmode = "$5"
$( [ "$5" = verify-full ] && echo "sslrootcert = \"$CA\"" )
[admin]
address = "127.0.0.1:$3"
[log]
level = "warn"
$6
CONF
  "$PROXY" check --config "$work/$1.toml" >/dev/null || { "$PROXY" check --config "$work/$1.toml"; exit 1; }
}
declare -A proxy_port=([proxy]=$PX_PORT [proxy_vf]=$VF_PORT [proxy_deny]=$DENY_PORT [proxy_dead]=$DEAD_PORT [proxy_base]=$BASE_PORT [proxy_w1]=$W1_PORT)
declare -A admin_port=([proxy]=$PX_ADMIN [proxy_vf]=$VF_ADMIN [proxy_deny]=$DENY_ADMIN [proxy_dead]=$DEAD_ADMIN [proxy_base]=$BASE_ADMIN [proxy_w1]=$W1_ADMIN)
declare -A proxy_bin=()
declare -A proxy_workers=([proxy_w1]=1)
start_proxy() { # name
  local envs=()
  [ -n "${proxy_workers[$1]:-}" ] && envs=("PGTLS_LISTEN__WORKERS=${proxy_workers[$1]}")
  env "${envs[@]}" "${proxy_bin[$1]:-$PROXY}" --config "$work/$1.toml" 2>>"$work/$1.log" &
  pid[$1]=$!
  local ok=0
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:${admin_port[$1]}/live" >/dev/null 2>&1 && { ok=1; break; }
    sleep 0.1
  done
  [ $ok = 1 ] && wait_tcp "${proxy_port[$1]}" 5 || { cat "$work/$1.log" >&2; echo "$1 did not start" >&2; exit 1; }
}
proxy_conf proxy "$PX_PORT" "$PX_ADMIN" "$PG_PORT" disable ""
proxy_conf proxy_vf "$VF_PORT" "$VF_ADMIN" "$PG_PORT" verify-full ""
# Handshake figure: client certificate required and verified, then refused by
# a rule that matches nobody (FATAL 28000 before any backend work).
proxy_conf proxy_deny "$DENY_PORT" "$DENY_ADMIN" "$PG_PORT" disable '[client_auth]
mode = "required"
ca = "'"$CA"'"
[[rules]]
identity = "cn"
exact = "no-such-certificate"
roles = ["nobody"]'
# Handshake figure without client certificates: the backend port is closed, so
# every login ends in FATAL 08006 right after the TLS handshake and startup.
proxy_conf proxy_dead "$DEAD_PORT" "$DEAD_ADMIN" "$DEAD_BACKEND" disable ""
sed -i 's/^level = "warn"/level = "error"/' "$work/proxy_dead.toml"
# The same as "proxy" with one session thread (listen.workers = 1), figure a.
proxy_conf proxy_w1 "$W1_PORT" "$W1_ADMIN" "$PG_PORT" disable ""
for name in proxy proxy_vf proxy_deny proxy_dead proxy_w1; do start_proxy "$name"; done
BASE_TARGETS=()
if [ -n "$baseline" ]; then
  # Same config as "proxy"; only the binary differs.
  proxy_conf proxy_base "$BASE_PORT" "$BASE_ADMIN" "$PG_PORT" disable ""
  proxy_bin[proxy_base]=$baseline
  start_proxy proxy_base
  BASE_TARGETS=(proxy_base)
  echo "baseline $baseline :$BASE_PORT (plaintext backend)"
fi
echo "pg-tls-proxy :$PX_PORT (plaintext backend), :$VF_PORT (verify-full backend), :$DENY_PORT (mTLS deny), :$DEAD_PORT (backend closed)"

# ------------------------------------------------------------ targets
TARGETS=(pg_plain pg_tls pgbouncer proxy proxy_vf)
tport() { case $1 in pg_plain|pg_tls) echo "$PG_PORT" ;; pgbouncer) echo "$PGB_PORT" ;; haproxy) echo "$HAP_PORT" ;; *) echo "${proxy_port[$1]}" ;; esac; }
tssl() { case $1 in pg_plain|haproxy) echo disable ;; *) echo require ;; esac; }
# Figure a also runs through HAProxy: the floor for a hop's CPU.
A_TARGETS=(pg_plain pg_tls haproxy pgbouncer proxy proxy_w1 proxy_vf "${BASE_TARGETS[@]}")
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # pid -> utime + stime of the whole process (all threads), in ticks
  awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0
}
on() { # target command...
  local t=$1; shift
  PGHOST=127.0.0.1 PGPORT=$(tport "$t") PGSSLMODE=$(tssl "$t") PGUSER=bench PGDATABASE=bench "$@"
}

say "sanity: each target answers, and which links are encrypted"
for t in "${TARGETS[@]}"; do
  backend_ssl=$(on "$t" timeout 20 "$PSQL" -X -At -c "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") \
    || { echo "target $t does not answer" >&2; exit 1; }
  client_ssl=$(on "$t" timeout 20 "$PSQL" -X -At -c '\conninfo' | grep -o 'SSL connection ([^,]*' || echo "no TLS")
  printf '  %-10s client link: %-30s PostgreSQL sees ssl=%s\n' "$t" "$client_ssl" "$backend_ssl"
done

results="$work/results.tsv"
: > "$results"
record() { # figure target round value [note]
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >> "$results"
  printf '  %-18s round %s  %-10s %s %s\n' "$1" "$3" "$2" "$4" "${5:-}"
}

m_pgbench() { # target seconds extra-args...
  local t=$1 secs=$2; shift 2
  local out
  if ! out=$(on "$t" timeout $((secs + 60)) "$PGBENCH" -n -c 8 -j 2 -T "$secs" "$@" 2>&1); then
    echo "$out" | tail -n 5 >&2; return 1
  fi
  local failed
  failed=$(echo "$out" | awk '/number of failed transactions/{print $5; exit}')
  [ -n "$failed" ] && [ "$failed" != 0 ] && warn "$t pgbench $*: $failed failed transactions"
  # "tps processed": the rate, and the transactions done.
  echo "$out" | awk '/^tps = /{tps=$3} /number of transactions actually processed/{n=$6} END{print tps, n}'
}
elapsed_rate() { # t0 t1 bytes -> MB/s
  awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN { printf "%.1f", n / 1e6 / (b - a) }'
}
m_copy_out() {
  local t0 t1
  t0=$EPOCHREALTIME
  on "$1" timeout 900 "$PSQL" -X -q -v ON_ERROR_STOP=1 -c "$COPY_QUERY" > /dev/null || return 1
  t1=$EPOCHREALTIME
  elapsed_rate "$t0" "$t1" "$BULK_BYTES"
}
m_copy_in() {
  local t0 t1
  sock -U bench -d bench -c "TRUNCATE t" || return 1
  t0=$EPOCHREALTIME
  on "$1" timeout 900 "$PSQL" -X -q -v ON_ERROR_STOP=1 -c "COPY t FROM STDIN" < "$work/bulk.tsv" || return 1
  t1=$EPOCHREALTIME
  elapsed_rate "$t0" "$t1" "$BULK_BYTES"
}
m_latency() { # target round -> "p50 p99 count"
  local dir="$work/lat/$1.$2"
  mkdir -p "$dir"
  on "$1" timeout $((T_LAT + 60)) "$PGBENCH" -n -c 1 -j 1 -T "$T_LAT" -f "$work/select1.sql" \
    --log --log-prefix="$dir/log" >/dev/null 2>"$dir/stderr" || { tail -n 5 "$dir/stderr" >&2; return 1; }
  python3 "$helpers" pct "$dir"/log.*
}
jget() { python3 -c 'import json, sys; d = json.loads(sys.argv[1]); print(d[sys.argv[2]])' "$1" "$2"; }

# ------------------------------------------------------------ figures
fig_a() {
  say "a. pgbench -S -c 8 -j 2 -T $T_TPS over TLS (plaintext for direct PG plaintext and HAProxy)"
  for r in $(seq "$rounds"); do
    for t in "${A_TARGETS[@]}"; do
      local p=${pid[$t]:-} c0=0 c1 v tps n
      [ -n "$p" ] && c0=$(cpu_ticks "$p")
      if v=$(m_pgbench "$t" "$T_TPS" -S); then
        read -r tps n <<<"$v"
        record tps "$t" "$r" "$tps"
        # The front end's own CPU per transaction (a single process:
        # HAProxy, PgBouncer, the proxy); PostgreSQL forks per session.
        if [ -n "$p" ] && [ "${n:-0}" -gt 0 ]; then
          c1=$(cpu_ticks "$p")
          record cpu_tx "$t" "$r" "$(awk -v d=$((c1 - c0)) -v hz="$CLK_TCK" -v n="$n" 'BEGIN { printf "%.1f", d / hz * 1e6 / n }')"
        fi
      else
        record tps "$t" "$r" FAIL; warn "a. $t round $r failed"
      fi
    done
  done
  return 0
}

fig_b() {
  say "b. connection storm: pgbench -C -S -c 8 -j 2 -T $T_STORM"
  for r in $(seq "$rounds"); do
    for t in "${TARGETS[@]}"; do
      if v=$(m_pgbench "$t" "$T_STORM" -S -C); then record storm "$t" "$r" "${v%% *}"; else record storm "$t" "$r" FAIL; warn "b. $t round $r failed"; fi
    done
  done
  return 0
}

fig_c() {
  say "c. bulk transfer: $BULK_BYTES bytes out (COPY TO STDOUT) and in (COPY FROM STDIN)"
  for r in $(seq "$rounds"); do
    for t in "${TARGETS[@]}"; do
      if v=$(m_copy_out "$t"); then record copy_out "$t" "$r" "$v"; else record copy_out "$t" "$r" FAIL; warn "c. COPY TO $t round $r failed"; fi
      if v=$(m_copy_in "$t"); then record copy_in "$t" "$r" "$v"; else record copy_in "$t" "$r" FAIL; warn "c. COPY FROM $t round $r failed"; fi
    done
  done
  sock -U bench -d bench -c "TRUNCATE t" || true
  return 0
}

fig_d() {
  say "d. latency: SELECT 1 on one connection, pgbench -c 1 -T $T_LAT --log"
  for r in $(seq "$rounds"); do
    for t in "${TARGETS[@]}"; do
      if v=$(m_latency "$t" "$r"); then
        read -r p50 p99 cnt <<<"$v"
        record lat_p50 "$t" "$r" "$p50"
        record lat_p99 "$t" "$r" "$p99"
      else
        record lat_p50 "$t" "$r" FAIL; record lat_p99 "$t" "$r" FAIL; warn "d. $t round $r failed"
      fi
    done
  done
  return 0
}

# ------------------------------------------------------------ f. handshakes
fig_f() {
  say "f. TLS handshakes/s: 8 Python client processes, $T_HS s each, login refused after the handshake"
  hs() { # figure column round port user resume(0/1) [cert key]
    local fig=$1 col=$2 r=$3 port=$4 user=$5 resume=$6 cert=${7:-} key=${8:-}
    local args=(--port "$port" --ca "$CA" --user "$user" --db bench --seconds "$T_HS" --procs 8)
    [ "$resume" = 1 ] && args+=(--resume)
    [ -n "$cert" ] && args+=(--cert "$cert" --key "$key")
    local out
    if out=$(timeout $((T_HS + 120)) python3 "$helpers" handshakes "${args[@]}"); then
      local rate frac errs codes note=""
      rate=$(jget "$out" rate); frac=$(jget "$out" reused_fraction); errs=$(jget "$out" errors)
      codes=$(jget "$out" sqlstates)
      [ "$resume" = 1 ] && note=$(awk -v f="$frac" 'BEGIN { printf "(%.0f%% resumed)", f * 100 }')
      [ "$errs" != 0 ] && { note="$note ($errs errors)"; warn "f. $col $fig round $r: $errs client errors: $(jget "$out" first_error)"; }
      record "$fig" "$col" "$r" "$(printf '%.1f' "$rate")" "$note"
      echo "    refusals by SQLSTATE: $codes"
    else
      record "$fig" "$col" "$r" FAIL; warn "f. $col $fig round $r failed: $out"
    fi
  }
  someone=("$work/certs/client-someone.crt" "$work/certs/client-someone.key")
  for resume in 0 1; do
    fig=hs_full; [ $resume = 1 ] && fig=hs_resumed
    for r in $(seq "$rounds"); do
      hs "$fig" pg_tls "$r" "$PG_PORT" nobody "$resume"
      hs "$fig" pgbouncer "$r" "$PGB_PORT" nobody "$resume"
      hs "$fig" proxy "$r" "$DENY_PORT" bench "$resume" "${someone[@]}"
      hs "${fig}_nocert" proxy "$r" "$DEAD_PORT" bench "$resume"
    done
  done
  return 0
}

# ------------------------------------------------------------ e. memory
fig_e() {
  say "e. memory: VmRSS with $N idle TLS sessions (each server restarted before each round)"
  backend_count() { sock -U postgres -d postgres -At -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"; }
  for r in $(seq "$rounds"); do
    for t in pgbouncer proxy proxy_vf "${BASE_TARGETS[@]}"; do
      if [ "$t" = pgbouncer ]; then stop_pid pgbouncer TERM; start_pgbouncer
      else stop_pid "$t" INT; start_proxy "$t"; fi
      # Let earlier sessions' backends go away, so PostgreSQL has room (bounded).
      for _ in $(seq 150); do [ "$(backend_count)" -lt 20 ] && break; sleep 0.2; done
      sleep 0.5
      if out=$(timeout $((N / 5 + 180)) python3 "$helpers" idle --port "$(tport "$t")" --ca "$CA" \
          --user bench --db bench --n "$N" --pid "${pid[$t]}"); then
        per=$(jget "$out" per_session_kib); open=$(jget "$out" rss_open_kib); idle=$(jget "$out" rss_idle_kib)
        record rss_per_session "$t" "$r" "$(printf '%.1f' "$per")"
        record rss_open "$t" "$r" "$(awk -v k="$open" 'BEGIN { printf "%.1f", k / 1024 }')"
        record rss_idle "$t" "$r" "$(awk -v k="$idle" 'BEGIN { printf "%.1f", k / 1024 }')"
      else
        record rss_per_session "$t" "$r" FAIL; record rss_open "$t" "$r" FAIL; record rss_idle "$t" "$r" FAIL
        warn "e. $t round $r failed: $out"
      fi
      # PgBouncer keeps its N server connections: restart it to release them.
      if [ "$t" = pgbouncer ]; then stop_pid pgbouncer TERM; start_pgbouncer; fi
    done
  done
  return 0
}

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
for f in a b c d f e; do
  case "$only" in *"$f"*) "fig_$f" ;; esac
done

# ------------------------------------------------------------ report
say "report"
for name in proxy proxy_vf proxy_deny; do
  n=$(grep -c . "$work/$name.log" 2>/dev/null || true)
  [ "${n:-0}" -gt 0 ] && echo "  $name logged $n lines at warn level; first: $(head -n 1 "$work/$name.log" | cut -c1-200)"
done
resumed_srv=$(curl -sf "http://127.0.0.1:$DENY_ADMIN/metrics" | awk '/^pgtls_tls_handshakes_total\{resumed="true"\}/{print $2}')
echo "  proxy_deny server side: resumed handshakes counted = ${resumed_srv:-?}"

commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ "$build" = 0 ]; then
  commit="binary built $(date -u -r "$PROXY" '+%Y-%m-%d %H:%M UTC') (--no-build; HEAD is $commit)"
elif [ -n "$(git -C "$repo" status --porcelain -- src Cargo.toml Cargo.lock build.rs 2>/dev/null)" ]; then
  commit="$commit (+ uncommitted changes in src/)"
fi
meta="$work/meta.tsv"
{
  printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
  printf 'mode_flag\t%s\n' "$mode_flag"
  printf 'rounds\t%s\n' "$rounds"
  printf 'nproc\t%s\n' "$(nproc)"
  printf 'cpu\t%s\n' "$(grep -m 1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  printf 'mem\t%s\n' "$(awk '/MemTotal/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo)"
  printf 'kernel\t%s\n' "$(uname -r)"
  printf 'load\t%s\n' "1/5/15-minute load average at the start of the measurements $load_start, at the end $(cut -d' ' -f1-3 /proc/loadavg)"
  printf 'pg_version\t%s\n' "$("$PGBIN/postgres" --version)"
  printf 'pgb_version\t%s\n' "$(pgbouncer --version | head -n 1)"
  printf 'openssl\t%s\n' "$(openssl version | cut -d' ' -f1-2)"
  printf 'proxy_commit\t%s\n' "$commit"
  [ -n "$baseline" ] && printf 'baseline\t%s\n' "$baseline, built $(date -u -r "$baseline" '+%Y-%m-%d %H:%M UTC')"
  printf 'bulk\t%s MB\n' "$(awk -v b="$BULK_BYTES" 'BEGIN { printf "%.0f", b / 1e6 }')"
  printf 'sessions\t%s\n' "$N"
  printf 'settings\t%s\n' "durations: a ${T_TPS} s, b ${T_STORM} s, d ${T_LAT} s, f ${T_HS} s per cell; clients: libpq sslmode=require (TLS 1.3, server certificate not verified), gssencmode=disable; PostgreSQL: trust auth on 127.0.0.1, fsync/synchronous_commit/full_page_writes off, autovacuum off, unlogged COPY table, shared_buffers 256MB; HAProxy $(haproxy -v | head -n 1 | awk '{print $3}'): mode tcp, plaintext both sides, figure a only; PgBouncer: session pooling, client TLS, plaintext server link; pg-tls-proxy: log.level warn, listen.workers = 0 (one session thread per CPU: $(nproc) here) unless the column says 1, plaintext or verify-full backend link"
  printf 'notes\t%s\n' "All clients and servers share the same $(nproc) cores, so client CPU (pgbench, psql, Python) competes with the server measured.|a: CPU per transaction is utime+stime of the front-end process (HAProxy, PgBouncer, pg-tls-proxy: each one process) over the run divided by the transactions pgbench counted, from /proc/PID/stat (resolution 1/CLK_TCK s); HAProxy is plaintext on both sides, the cheapest possible hop.|b: PgBouncer keeps server connections in its pool, so its storm figure skips the PostgreSQL backend start that direct and proxied sessions pay; pg-tls-proxy opens one backend connection per client session.|c: MB = 10^6 bytes; the time includes psql start-up and, for COPY FROM, PostgreSQL's heap inserts.|d: plaintext direct PostgreSQL is the floor; pgbench simple protocol, one connection.|e: VmRSS of the one process (PgBouncer, or the proxy) with N sessions open minus before, divided by N; PgBouncer's figure includes its N server connections, the verify-full proxy's its N backend TLS links; direct PostgreSQL has one process per session, not comparable.|f: Python ssl clients (8 processes) do SSLRequest, TLS 1.3, StartupMessage and read the refusal: PostgreSQL (hba reject of user nobody, one forked process per connection), PgBouncer (unknown user), pg-tls-proxy with a required client certificate that no rule allows (FATAL 28000; the client signs and the proxy verifies a certificate, which PostgreSQL and PgBouncer do not); the no-client-cert row uses a proxy whose backend port is closed (FATAL 08006). The Python clients use much of the CPU, so these rates are lower bounds. PostgreSQL 15 turns off TLS session tickets and its session cache, so its resumption row is full handshakes.$( [ -s "$work/warnings" ] && printf '|Warnings during this run: %s' "$(paste -sd';' "$work/warnings")" )"
} > "$meta"
mkdir -p "$repo/benches/results"
python3 "$helpers" report --results "$results" --meta "$meta" --out "$out_md"
cp "$results" "${out_md%.md}.tsv"
echo "written: $out_md (raw: ${out_md%.md}.tsv); took $((SECONDS - started)) s"
if [ -s "$work/warnings" ]; then
  sed 's/^/WARNING: /' "$work/warnings" >&2
fi
