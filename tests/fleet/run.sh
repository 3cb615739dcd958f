#!/usr/bin/env bash
# A fleet: three pg-tls-proxy replicas behind HAProxy (Debian's package,
# mode tcp, round robin, send-proxy-v2, health checks on /ready), in front
# of one throwaway PostgreSQL, all on 127.0.0.1.
#
#   bash tests/fleet/run.sh        # as root it installs haproxy when missing
#
# Cases (one line each, then "N passed, M failed"):
#   client-address  a client's own address (its source port) is what the
#                   replica's audit event logs as `peer`; HAProxy's
#                   connection is `via`;
#   round-robin     connections spread over all three replicas;
#   cancel-*        psycopg (libpq 18) cancels whose connection HAProxy
#                   sends to another replica than the session's: sent on
#                   over the fleet's mTLS peer link, 57014 (legacy
#                   plaintext PQcancel, libpq 17+ encrypted cancel, and
#                   both with protocol 3.2's long keys); forged 3.0 and
#                   3.2 keys for a live pid cancel nothing;
#   drain           pgbench -C through HAProxy while one replica is sent
#                   SIGTERM: 0 failed transactions, and the drained replica
#                   logs its drain.
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
log() { printf '== %s\n' "$*"; }
die() { printf 'fleet: %s\n' "$*" >&2; exit 2; }

if ! command -v haproxy >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || die "haproxy is missing; run as root or install it"
  log "apt-get install haproxy"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy >/dev/null; } \
    || die "apt-get install haproxy failed"
fi
bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
proxy=${PG_TLS_PROXY_BIN:-$root/target/debug/pg-tls-proxy}
if [ -z "${PG_TLS_PROXY_BIN:-}" ] && { [ ! -x "$proxy" ] || [ -n "$(find src Cargo.toml -newer "$proxy" -print -quit)" ]; }; then
  cargo build --quiet --bin pg-tls-proxy || die "cargo build failed"
fi

work=$(mktemp -d /tmp/pgtls-fleet.XXXXXX); chmod 755 "$work"
as_pg=(); [ "$(id -u)" = 0 ] && as_pg=(runuser -u postgres --)
pids=()
haproxy_pid=""
cleanup() {
  # SIGINT closes a proxy at once; background jobs of a script ignore
  # SIGINT unless they handle it (HAProxy does not), so HAProxy gets TERM.
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null; done
  [ -n "$haproxy_pid" ] && kill -TERM "$haproxy_pid" 2>/dev/null
  wait 2>/dev/null
  "${as_pg[@]}" "$bindir/pg_ctl" -D "$work/pg/data" -m immediate stop >/dev/null 2>&1
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "work dir kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# PostgreSQL with a trust role (the proxy's own behaviour is what is tested).
pg_port=$(port)
mkdir -p "$work/pg"; [ "$(id -u)" = 0 ] && chown postgres:postgres "$work/pg"
"${as_pg[@]}" "$bindir/initdb" -D "$work/pg/data" -U postgres -A trust --no-sync >/dev/null || die "initdb failed"
cat >> "$work/pg/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = '$work/pg'
fsync = off
max_connections = 100
CONF
"${as_pg[@]}" "$bindir/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w start >/dev/null || die "PostgreSQL did not start"
psql -X -q -h "$work/pg" -p "$pg_port" -U postgres -c "CREATE ROLE bob LOGIN" || die "setup SQL failed"
"$proxy" dev-certs --out "$work/pki" --peer pg-tls-proxy-peer >/dev/null || die "dev-certs failed"
head -c 48 /dev/urandom | base64 > "$work/cancel-key"; chmod 600 "$work/cancel-key"

# psycopg 3 with its bundled libpq 18: the client matrix's venv, or one of our own.
vpy=$root/target/clients-env/venv/bin/python
if ! "$vpy" -c 'import psycopg' 2>/dev/null; then
  vpy=$root/target/fleet-env/bin/python
  if ! "$vpy" -c 'import psycopg' 2>/dev/null; then
    log "python venv: psycopg"
    python3 -m venv "$root/target/fleet-env" || die "python3 -m venv failed (apt-get install python3-venv)"
    "$vpy" -m pip install -q --disable-pip-version-check "$(grep -i '^psycopg' tests/clients/requirements.txt)" \
      || die "pip install psycopg failed"
  fi
fi

# Three replicas, PROXY v2 required from 127.0.0.1 (HAProxy); a fleet
# whose ids come from the host name's ordinal, as in a StatefulSet.
declare -a dport aport fport
for i in 0 1 2; do dport[$i]=$(port); aport[$i]=$(port); fport[$i]=$(port); done
for i in 0 1 2; do
  cat > "$work/r$i.toml" <<CONF
[listen]
address = "127.0.0.1:${dport[$i]}"
proxy_protocol = "required"
proxy_trusted = ["127.0.0.1/32"]
[tls]
cert = "$work/pki/server.crt"
key = "$work/pki/server.key"
[backend]
address = "127.0.0.1:$pg_port"
[admin]
address = "127.0.0.1:${aport[$i]}"
[shutdown]
grace_period = "5s"
[fleet]
replica_id = "ordinal"
listen = "127.0.0.1:${fport[$i]}"
peers = ["127.0.0.1:${fport[0]}", "127.0.0.1:${fport[1]}", "127.0.0.1:${fport[2]}"]
cert = "$work/pki/peer-pg-tls-proxy-peer.crt"
key = "$work/pki/peer-pg-tls-proxy-peer.key"
ca = "$work/pki/fleet-ca.crt"
server_name = "pg-tls-proxy-peer"
cancel_key = { password_file = "$work/cancel-key" }
CONF
  HOSTNAME=pg-tls-proxy-$i RUST_LOG=info "$proxy" --config "$work/r$i.toml" >"$work/r$i.log" 2>&1 &
  pids+=($!); rpid[$i]=$!
done
lb_port=$(port); stats_port=$(port)
cat > "$work/haproxy.cfg" <<CONF
global
  maxconn 2000
defaults
  mode tcp
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  timeout check 5s
  retries 3
  option redispatch
listen stats
  mode http
  bind 127.0.0.1:$stats_port
  stats enable
  stats uri /stats
frontend pg
  bind 127.0.0.1:$lb_port
  default_backend replicas
backend replicas
  balance roundrobin
  option httpchk GET /ready
  http-check expect status 200
  default-server send-proxy-v2 check inter 300ms fall 1 rise 2
  server r0 127.0.0.1:${dport[0]} port ${aport[0]}
  server r1 127.0.0.1:${dport[1]} port ${aport[1]}
  server r2 127.0.0.1:${dport[2]} port ${aport[2]}
CONF
haproxy -c -f "$work/haproxy.cfg" >/dev/null || die "haproxy config check failed"
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
haproxy_pid=$!
# Until HAProxy's own health checks (`rise 2`) have all three replicas UP.
up=0
for _ in $(seq 150); do
  up=$(curl -sf "http://127.0.0.1:$stats_port/stats;csv" | awk -F, '$1 == "replicas" && $2 ~ /^r[0-9]$/ && $18 == "UP"' | wc -l)
  [ "$up" = 3 ] && break
  sleep 0.2
done
[ "$up" = 3 ] || die "HAProxy did not see the three replicas UP within 30 s ($up UP)"
log "HAProxy $(haproxy -v | head -n 1 | awk '{print $3}') on 127.0.0.1:$lb_port -> replicas ${dport[*]} -> PostgreSQL 127.0.0.1:$pg_port"

passed=0; failed=0
ok()   { echo "$1: ok${2:+ ($2)}"; passed=$((passed + 1)); }
fail() { echo "$1: FAIL $2"; failed=$((failed + 1)); }
conn="host=localhost port=$lb_port user=bob dbname=postgres sslmode=verify-full sslrootcert=$work/pki/ca.crt"

# client-address: a client with a known source port.
cport=$(python3 - "$lb_port" "$work/pki/ca.crt" <<'PY'
import socket, ssl, struct, sys
port, ca = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.1", port))
me = s.getsockname()[1]
s.sendall(struct.pack("!ii", 8, 80877103))
assert s.recv(1) == b"S"
ctx = ssl.create_default_context(cafile=ca)
t = ctx.wrap_socket(s, server_hostname="localhost")
body = struct.pack("!i", 196608) + b"user\0bob\0database\0postgres\0\0"
t.sendall(struct.pack("!i", len(body) + 4) + body)
buf = b""
while not buf.endswith(b"Z\0\0\0\x05I"):
    chunk = t.recv(4096)
    if not chunk:
        sys.exit("closed before ReadyForQuery")
    buf += chunk
t.sendall(b"X\0\0\0\x04")
t.close()
print(me)
PY
) || cport=""
# until_found N PATTERN FILE...: the replica writes its audit line a moment
# after the client has gone (up to 10 s).
until_found() {
  local n=$1 pattern=$2; shift 2
  for _ in $(seq 100); do
    [ "$(cat "$@" | grep -c -- "$pattern")" -ge "$n" ] && return 0
    sleep 0.1
  done
  return 1
}
until_found 1 "session ended.*peer=127.0.0.1:$cport " "$work"/r?.log
line=$(grep -h "session ended" "$work"/r?.log | grep "peer=127.0.0.1:$cport " | head -n 1)
via=$(printf '%s' "$line" | sed -n 's/.* via=\(127\.0\.0\.1:[0-9]*\).*/\1/p')
if [ -n "$cport" ] && [ -n "$line" ] && [ -n "$via" ] && [ "$via" != "127.0.0.1:$cport" ]; then
  ok client-address "audit peer=127.0.0.1:$cport, via=$via"
else
  fail client-address "no audit event with peer=127.0.0.1:${cport:-?} and a via of HAProxy's"
fi

# round-robin: 6 sessions, each replica served some.
ended_before=$(cat "$work"/r?.log | grep -c "session ended")
for _ in 1 2 3 4 5 6; do psql -X -q -At "$conn" -c "SELECT 1" >/dev/null 2>&1; done
until_found $((ended_before + 6)) "session ended" "$work"/r?.log
counts=""; spread=1
for i in 0 1 2; do
  n=$(grep -c "session ended" "$work/r$i.log"); counts+="r$i=$n "
  [ "$n" -gt 0 ] || spread=0
done
if [ "$spread" = 1 ]; then ok round-robin "${counts% }"; else fail round-robin "not every replica served: ${counts% }"; fi

# cancel-*: psycopg's cancels through HAProxy land on another replica.
admins=$(IFS=,; echo "${aport[*]}")
for c in legacy encrypted v32 v32-legacy forged; do
  if out=$("$vpy" tests/fleet/cancel_cases.py "$conn" "$admins" "$lb_port" "$c" 2>&1); then
    ok "cancel-$c" "$(printf '%s' "$out" | tail -n 1)"
  else
    fail "cancel-$c" "$(printf '%s' "$out" | tail -n 3 | tr '\n' ' ')"
  fi
done

# cancel-audit: the audit events say what became of each cancel, and which
# protocol the sessions spoke.
until_found 4 'session ended.*cancel="\?peer' "$work"/r?.log
peers=$(grep -h "session ended" "$work"/r?.log | grep -c 'cancel="\?peer')
v32=$(grep -h "session ended" "$work"/r?.log | grep -c 'protocol=3\.2')
if [ "$peers" -ge 4 ] && [ "$v32" -ge 2 ]; then
  ok cancel-audit "$peers cancel=peer events, $v32 protocol=3.2 sessions"
else
  fail cancel-audit "cancel=peer events: $peers (want >= 4), protocol=3.2 sessions: $v32 (want >= 2)"
fi

# drain: pgbench -C through HAProxy, SIGTERM to r0 during it.
echo "SELECT 1;" > "$work/select1.sql"
PGSSLMODE=verify-full PGSSLROOTCERT="$work/pki/ca.crt" "$bindir/pgbench" -n -C -c 4 -j 2 -T 6 -f "$work/select1.sql" \
  -h localhost -p "$lb_port" -U bob postgres >"$work/pgbench.out" 2>&1 &
bench=$!
sleep 2
kill -TERM "${rpid[0]}"
wait "$bench"; brc=$?
done_tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$work/pgbench.out")
failed_tx=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$work/pgbench.out")
if [ "$brc" = 0 ] && [ "${failed_tx:-0}" = 0 ] && [ "${done_tx:-0}" -gt 0 ] \
   && grep -q "draining: stopped accepting" "$work/r0.log" && ! grep -q "aborted" "$work/pgbench.out"; then
  ok drain "$done_tx transactions, ${failed_tx:-0} failed, r0 drained"
else
  fail drain "pgbench exit $brc, ${done_tx:-?} done, ${failed_tx:-?} failed: $(grep -m1 -iE 'error|abort' "$work/pgbench.out")"
fi

echo
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
