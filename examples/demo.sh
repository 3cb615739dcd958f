#!/usr/bin/env bash
# End-to-end demo of pg-tls-proxy, on one machine, with throwaway parts:
#   1. builds the proxy,
#   2. starts a throwaway PostgreSQL cluster on a free port (plaintext,
#      loopback only, SCRAM password for role "demo"),
#   3. writes development certificates with `pg-tls-proxy dev-certs`,
#   4. runs the proxy in front of it,
#   5. connects with psql sslmode=verify-full through the proxy and shows
#      the TLS session psql negotiated,
#   6. shows that a plaintext client is refused,
# then stops everything and removes the temporary directory.
# Usage: bash examples/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bindir" ] && command -v pg_config >/dev/null; then bindir=$(pg_config --bindir); fi
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing PostgreSQL (apt-get install postgresql)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  else
    echo "PostgreSQL server binaries not found: install the postgresql package" >&2
    exit 1
  fi
fi

say "building pg-tls-proxy"
cargo build --quiet --bin pg-tls-proxy
proxy=./target/debug/pg-tls-proxy

work=$(mktemp -d /tmp/pg-tls-proxy-demo.XXXXXX)
chmod 755 "$work"
as_pg=()
if [ "$(id -u)" = 0 ]; then
  # initdb and postgres refuse to run as root.
  as_pg=(runuser -u postgres --)
  mkdir -p "$work/pg"; chown postgres:postgres "$work/pg"
else
  mkdir -p "$work/pg"
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_port=$(free_port)
proxy_port=$(free_port)
admin_port=$(free_port)
proxy_pid=""
cleanup() {
  [ -n "$proxy_pid" ] && kill "$proxy_pid" 2>/dev/null || true
  "${as_pg[@]}" "$bindir/pg_ctl" -D "$work/pg/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

say "starting a throwaway PostgreSQL on 127.0.0.1:$pg_port ($bindir)"
"${as_pg[@]}" "$bindir/initdb" -D "$work/pg/data" -U postgres -A trust --no-sync -E UTF8 --locale=C >/dev/null
cat >> "$work/pg/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = '$work/pg'
password_encryption = 'scram-sha-256'
CONF
printf 'local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n' > "$work/pg/data/pg_hba.conf"
"${as_pg[@]}" "$bindir/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w start >/dev/null
psql -h "$work/pg" -p "$pg_port" -U postgres -qc "CREATE ROLE demo LOGIN PASSWORD 'demo-password'"

say "writing development certificates: $proxy dev-certs --out $work/certs"
"$proxy" dev-certs --out "$work/certs"

cat > "$work/proxy.toml" <<CONF
[listen]
address = "127.0.0.1:$proxy_port"
[tls]
cert = "$work/certs/server.crt"
key = "$work/certs/server.key"
[backend]
address = "127.0.0.1:$pg_port"
sslmode = "disable"
[admin]
address = "127.0.0.1:$admin_port"
CONF
say "checking the configuration: $proxy check --config $work/proxy.toml"
"$proxy" check --config "$work/proxy.toml"

say "starting pg-tls-proxy on 127.0.0.1:$proxy_port"
"$proxy" --config "$work/proxy.toml" 2>"$work/proxy.log" &
proxy_pid=$!
for _ in $(seq 50); do
  grep -q listening "$work/proxy.log" 2>/dev/null && break
  sleep 0.1
done

conn="host=localhost port=$proxy_port user=demo dbname=postgres sslmode=verify-full sslrootcert=$work/certs/ca.crt"
say "psql \"$conn\""
PGPASSWORD=demo-password psql "$conn" -c '\conninfo' -c "SELECT current_user, version()"

say "a plaintext client (sslmode=disable) is refused:"
PGPASSWORD=demo-password psql "host=localhost port=$proxy_port user=demo dbname=postgres sslmode=disable" -c 'SELECT 1' || true

say "a few metrics from http://127.0.0.1:$admin_port/metrics"
python3 - "$admin_port" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read().decode()
for line in text.splitlines():
    if line.startswith(("pgtls_negotiations_total", "pgtls_tls_sessions_total", "pgtls_certificate_not_after")) and not line.endswith(" 0"):
        print(" ", line)
PY

say "proxy log"
cat "$work/proxy.log"
say "done: everything stopped and removed"
