#!/usr/bin/env bash
# Proxy CPU per password login, SCRAM relayed vs terminated at the proxy,
# measured with pgbench -C (a new connection, TLS handshake and login for
# every transaction) against PostgreSQL over a verify-full backend link.
#
#   bash benches/scram_login_cpu.sh            # SECONDS_PER_RUN=10 by default
#
# CPU per login = the proxy process's utime+stime (from /proc/PID/stat)
# over the run, divided by the logins pgbench completed. Starts its own
# throwaway cluster (as the postgres user when root) and release binary.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
secs=${SECONDS_PER_RUN:-10}
cargo build --quiet --release --bin pg-tls-proxy
proxy=$root/target/release/pg-tls-proxy
bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
work=$(mktemp -d /tmp/pgtls-scram-cpu.XXXXXX); chmod 755 "$work"
as_pg=(); [ "$(id -u)" = 0 ] && as_pg=(runuser -u postgres --)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  "${as_pg[@]}" "$bindir/pg_ctl" -D "$work/pg/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_port=$(port)
"$proxy" dev-certs --out "$work/pki" >/dev/null
mkdir -p "$work/pg"; cp "$work/pki/server.crt" "$work/pki/server.key" "$work/pg/"; chmod 600 "$work/pg/server.key"
[ "$(id -u)" = 0 ] && chown -R postgres:postgres "$work/pg"
"${as_pg[@]}" "$bindir/initdb" -D "$work/pg/data" -U postgres -A trust --no-sync >/dev/null
cat >> "$work/pg/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = '$work/pg'
password_encryption = 'scram-sha-256'
fsync = off
max_connections = 50
ssl = on
ssl_cert_file = '$work/pg/server.crt'
ssl_key_file = '$work/pg/server.key'
CONF
printf 'local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n' > "$work/pg/data/pg_hba.conf"
"${as_pg[@]}" "$bindir/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w start >/dev/null
psql -X -q -h "$work/pg" -p "$pg_port" -U postgres -c "CREATE ROLE app LOGIN PASSWORD 'app-pw'"
psql -X -q -At -h "$work/pg" -p "$pg_port" -U postgres \
  -c "SELECT '\"' || rolname || '\" \"' || rolpassword || '\"' FROM pg_authid WHERE rolname = 'app'" > "$work/userlist.txt"
echo "SELECT 1;" > "$work/select1.sql"

run() { # NAME EXTRA_TOML CHANNEL_BINDING
  local name=$1 extra=$2 cb=$3 p a pid t0 t1 n
  p=$(port); a=$(port)
  cat > "$work/$name.toml" <<CONF
[listen]
address = "127.0.0.1:$p"
[tls]
cert = "$work/pki/server.crt"
key = "$work/pki/server.key"
[backend]
address = "127.0.0.1:$pg_port"
sslmode = "verify-full"
sslrootcert = "$work/pki/ca.crt"
[admin]
address = "127.0.0.1:$a"
$extra
CONF
  "$proxy" --config "$work/$name.toml" 2>"$work/$name.log" &
  pid=$!; pids+=("$pid")
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && break; sleep 0.1; done
  t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  n=$(PGPASSWORD=app-pw "$bindir/pgbench" -n -C -c 4 -j 2 -T "$secs" -f "$work/select1.sql" \
      "host=localhost port=$p user=app dbname=postgres sslmode=verify-full sslrootcert=$work/pki/ca.crt channel_binding=$cb" 2>/dev/null \
      | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p')
  t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  awk -v n="$n" -v t="$((t1 - t0))" -v name="$name" -v cb="$cb" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { printf "%-11s channel_binding=%-8s %6d logins in '"$secs"' s, proxy CPU %6.1f us/login\n", name, cb, n, t / hz * 1e6 / n }'
  kill -INT "$pid"; wait "$pid" 2>/dev/null || true
}
echo "pgbench -C -c 4 -j 2, SELECT 1, client verify-full TLS 1.3 -> proxy -> verify-full TLS -> PostgreSQL $("$bindir/postgres" --version | awk '{print $3}'), $(nproc) cores"
run relayed "" disable
run terminated "[scram]
terminate = true
auth_file = \"$work/userlist.txt\"" disable
run terminated "[scram]
terminate = true
auth_file = \"$work/userlist.txt\"" require
