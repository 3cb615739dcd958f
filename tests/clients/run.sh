#!/usr/bin/env bash
# Client matrix: real client libraries through pg-tls-proxy to a real,
# throwaway PostgreSQL.
#
#   bash tests/clients/run.sh            # from anywhere; as root it installs what it lacks
#
# What it does (tests/clients/README.md has the details):
#   1. installs what is missing (Debian packages, a Python venv and
#      node_modules cached under target/clients-env/), builds the proxy if
#      its binary is missing or older than src/,
#   2. starts a throwaway PostgreSQL cluster (random ports, temp dir, SCRAM),
#   3. writes a PKI with `pg-tls-proxy dev-certs` (and a second, foreign CA),
#   4. runs the proxy in the background (client_auth optional + one CN rule),
#      and a second one that terminates SCRAM ([scram] auth_file) and reaches
#      PostgreSQL over verify-full TLS (the "scram-login" case of each client),
#   5. runs every case of every client, each under `timeout 60`, printing one
#      line per case: "<client> <case>: ok | FAIL <reason> | skip <reason>",
#   6. prints the details each case recorded (error texts, TLS versions) and
#      the closing line "N passed, M failed[, K skipped]"; exits 1 if any failed.
# The proxy and PostgreSQL are always stopped and the temp dir removed (trap).
#
# Environment knobs:
#   PG_TLS_PROXY_BIN   use this proxy binary (default target/debug/pg-tls-proxy,
#                      built with cargo when missing or stale)
#   CLIENTS            space-separated subset: "psql psycopg asyncpg node jdbc tokio-postgres"
#   KEEP_WORK=1        keep the temp dir (logs, certs, config) for inspection
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
here=$root/tests/clients
cache=$root/target/clients-env
mkdir -p "$cache"

t0=$(date +%s)
log() { printf '== %s\n' "$*"; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 2; }

# ---------------------------------------------------------------------------
# 1. Installs (only what is missing; everything cached under target/)
# ---------------------------------------------------------------------------
py=/usr/bin/python3                    # Debian's python, not a pyenv shim
[ -x "$py" ] || py=$(command -v python3 || true)

apt_missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_missing+=(postgresql)
command -v psql >/dev/null 2>&1 || apt_missing+=(postgresql-client)
command -v javac >/dev/null 2>&1 || apt_missing+=(default-jdk-headless)
[ -f /usr/share/java/postgresql.jar ] || apt_missing+=(libpostgresql-jdbc-java)
{ [ -n "$py" ] && "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; } || apt_missing+=(python3 python3-venv)
command -v node >/dev/null 2>&1 || apt_missing+=(nodejs)
command -v npm >/dev/null 2>&1 || apt_missing+=(npm)
if [ "${#apt_missing[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing Debian packages (${apt_missing[*]}); run as root or install them"
  log "apt-get install ${apt_missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null \
    || die "apt-get install ${apt_missing[*]} failed"
  py=/usr/bin/python3
fi
bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
jdbc_jar=/usr/share/java/postgresql.jar

# Python venv with psycopg 3 (binary wheel: its own libpq 17+) and asyncpg.
# Re-created only when requirements.txt changes.
if ! cmp -s "$here/requirements.txt" "$cache/venv/.requirements.txt" 2>/dev/null; then
  log "python venv: pip install -r tests/clients/requirements.txt"
  rm -rf "$cache/venv"
  "$py" -m venv "$cache/venv" || die "python3 -m venv failed"
  "$cache/venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt" \
    || die "pip install failed"
  cp "$here/requirements.txt" "$cache/venv/.requirements.txt"
fi
vpy=$cache/venv/bin/python

# node_modules with pg (node-postgres) and pg-copy-streams, from package.json.
if ! cmp -s "$here/package.json" "$cache/node/package.json" 2>/dev/null \
   || [ ! -d "$cache/node/node_modules/pg" ]; then
  log "npm install (tests/clients/package.json) into target/clients-env/node"
  rm -rf "$cache/node"; mkdir -p "$cache/node"
  cp "$here/package.json" "$cache/node/package.json"
  (cd "$cache/node" && npm install --silent --no-audit --no-fund --no-package-lock) \
    || { rm -f "$cache/node/package.json"; die "npm install failed"; }
fi

# pgjdbc cases: compiled once per change of JdbcCases.java.
mkdir -p "$cache/java"
if [ ! -f "$cache/java/JdbcCases.class" ] || [ "$here/JdbcCases.java" -nt "$cache/java/JdbcCases.class" ]; then
  log "javac JdbcCases.java"
  javac -nowarn -cp "$jdbc_jar" -d "$cache/java" "$here/JdbcCases.java" || die "javac failed"
fi

# tokio-postgres cases: a small crate of its own, built in target/clients-env
# with the repository's Cargo.lock (the dev-dependencies' versions, already
# in cargo's cache after a `cargo test`). Rebuilt when its sources change.
tokio_src=$here/tokio_cases
tokio_dir=$cache/tokio
tokio_bin=$tokio_dir/target/debug/tokio-cases
if [ ! -x "$tokio_bin" ] || ! cmp -s "$tokio_src/Cargo.toml" "$tokio_dir/Cargo.toml" \
   || ! cmp -s "$tokio_src/src/main.rs" "$tokio_dir/src/main.rs"; then
  log "cargo build tests/clients/tokio_cases (in target/clients-env/tokio)"
  mkdir -p "$tokio_dir/src"
  cp "$tokio_src/Cargo.toml" "$tokio_dir/Cargo.toml"
  cp "$tokio_src/src/main.rs" "$tokio_dir/src/main.rs"
  [ -f "$tokio_dir/Cargo.lock" ] || cp "$root/Cargo.lock" "$tokio_dir/Cargo.lock"
  (cd "$tokio_dir" && cargo build --quiet --target-dir "$tokio_dir/target") || { rm -f "$tokio_bin"; die "building tokio_cases failed"; }
fi

# The proxy: build when the binary is missing or older than the sources.
proxy=${PG_TLS_PROXY_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/pg-tls-proxy}
if [ -z "${PG_TLS_PROXY_BIN:-}" ]; then
  if [ ! -x "$proxy" ] || [ -n "$(find src Cargo.toml Cargo.lock build.rs -newer "$proxy" -print -quit 2>/dev/null)" ]; then
    log "cargo build --bin pg-tls-proxy"
    cargo build --quiet --bin pg-tls-proxy || die "cargo build failed"
  fi
fi
[ -x "$proxy" ] || die "no proxy binary at $proxy"

t_installed=$(date +%s)

# ---------------------------------------------------------------------------
# 2. Throwaway PostgreSQL (as the postgres system user when we are root)
# ---------------------------------------------------------------------------
work=$(mktemp -d /tmp/pg-tls-clients.XXXXXX)
chmod 755 "$work"
as_pg=()
mkdir -p "$work/pg"
if [ "$(id -u)" = 0 ]; then
  as_pg=(runuser -u postgres --)       # initdb and postgres refuse to run as root
  chown postgres:postgres "$work/pg"
fi
proxy_pid=""
scram_pid=""
cleanup() {
  for pid in $proxy_pid $scram_pid; do
    kill -INT "$pid" 2>/dev/null     # SIGINT: close everything now (SIGTERM would drain)
    wait "$pid" 2>/dev/null
  done
  "${as_pg[@]}" "$bindir/pg_ctl" -D "$work/pg/data" -m immediate stop >/dev/null 2>&1
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "work dir kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------
# 2. PKI: the proxy's CA, server cert (localhost, 127.0.0.1), a client cert
#    CN=certuser; and a second, unrelated CA with its own CN=certuser cert.
# ---------------------------------------------------------------------------
"$proxy" dev-certs --out "$work/pki" --client certuser >/dev/null || die "dev-certs failed"
"$proxy" dev-certs --out "$work/foreign" --client certuser >/dev/null || die "dev-certs (foreign CA) failed"

free_port() { "$vpy" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_port=$(free_port); proxy_port=$(free_port); admin_port=$(free_port)
scram_port=$(free_port); scram_admin_port=$(free_port)

log "PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$pg_port"
"${as_pg[@]}" "$bindir/initdb" -D "$work/pg/data" -U postgres -A trust --no-sync -E UTF8 --locale=C >/dev/null \
  || die "initdb failed"
cat >> "$work/pg/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = '$work/pg'
password_encryption = 'scram-sha-256'
fsync = off
log_connections = on
ssl = on
ssl_cert_file = '$work/pg/server.crt'
ssl_key_file = '$work/pg/server.key'
CONF
# PostgreSQL serves the same throwaway PKI's server certificate (its key
# owned by the server's user, mode 0600), for the SCRAM-terminating proxy's
# verify-full backend link.
cp "$work/pki/server.crt" "$work/pki/server.key" "$work/pg/"
chmod 600 "$work/pg/server.key"
[ "$(id -u)" = 0 ] && chown postgres:postgres "$work/pg/server.crt" "$work/pg/server.key"
# certuser has no password: only the proxy's [[rules]] let a certificate
# holder pick it (the backend link is loopback plaintext). Everyone else
# needs a SCRAM password.
cat > "$work/pg/data/pg_hba.conf" <<HBA
local all all trust
host all certuser 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
HBA
"${as_pg[@]}" "$bindir/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w start >/dev/null \
  || { cat "$work/pg/log" >&2; die "PostgreSQL did not start"; }

app_password="app-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
psql -X -q -v ON_ERROR_STOP=1 -h "$work/pg" -p "$pg_port" -U postgres -d postgres >/dev/null <<SQL || die "setup SQL failed"
CREATE ROLE app LOGIN PASSWORD '$app_password';
CREATE ROLE certuser LOGIN;
CREATE TABLE copy_rows (client text NOT NULL, n int NOT NULL, payload text NOT NULL);
GRANT SELECT, INSERT ON copy_rows TO app, certuser;
SQL


# ---------------------------------------------------------------------------
# 4. The proxy
# ---------------------------------------------------------------------------
cat > "$work/proxy.toml" <<CONF
[listen]
address = "127.0.0.1:$proxy_port"
[tls]
cert = "$work/pki/server.crt"
key = "$work/pki/server.key"
[backend]
address = "127.0.0.1:$pg_port"
sslmode = "disable"
[client_auth]
mode = "optional"
ca = "$work/pki/ca.crt"
[[rules]]
identity = "cn"
exact = "certuser"
roles = ["certuser"]
[admin]
address = "127.0.0.1:$admin_port"
CONF
# wait_listening PORT PID LOG: until the proxy accepts on PORT (dies with
# its log if it exits first).
wait_listening() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { cat "$3" >&2; die "the proxy on port $1 exited"; }
    sleep 0.1
  done
  die "the proxy on port $1 did not listen within 10 s"
}
"$proxy" check --config "$work/proxy.toml" >"$work/check.txt" 2>&1 || { cat "$work/check.txt" >&2; die "proxy check failed"; }
"$proxy" --config "$work/proxy.toml" >"$work/proxy.log" 2>&1 &
proxy_pid=$!
wait_listening "$proxy_port" "$proxy_pid" "$work/proxy.log"
log "pg-tls-proxy $("$proxy" --version 2>/dev/null | awk '{print $2}') on 127.0.0.1:$proxy_port (admin $admin_port)"

# A second proxy that terminates SCRAM (verifiers exported from the
# cluster into an auth_file) and logs in to PostgreSQL over verify-full TLS.
psql -X -q -At -h "$work/pg" -p "$pg_port" -U postgres -d postgres \
  -c "SELECT '\"' || rolname || '\" \"' || rolpassword || '\"' FROM pg_authid WHERE rolname = 'app'" \
  >"$work/userlist.txt" || die "exporting the verifier failed"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/mock-secret"
cat > "$work/scram.toml" <<CONF
[listen]
address = "127.0.0.1:$scram_port"
[tls]
cert = "$work/pki/server.crt"
key = "$work/pki/server.key"
[backend]
address = "127.0.0.1:$pg_port"
sslmode = "verify-full"
sslrootcert = "$work/pki/ca.crt"
[scram]
terminate = true
auth_file = "$work/userlist.txt"
mock_secret = { password_file = "$work/mock-secret" }
[admin]
address = "127.0.0.1:$scram_admin_port"
CONF
"$proxy" check --config "$work/scram.toml" >"$work/check-scram.txt" 2>&1 || { cat "$work/check-scram.txt" >&2; die "proxy check (scram) failed"; }
"$proxy" --config "$work/scram.toml" >"$work/proxy-scram.log" 2>&1 &
scram_pid=$!
wait_listening "$scram_port" "$scram_pid" "$work/proxy-scram.log"
log "SCRAM-terminating pg-tls-proxy on 127.0.0.1:$scram_port (admin $scram_admin_port), verify-full to PostgreSQL"

# Sum of a counter's samples whose label set contains $2 (plain HTTP/1.0 GET).
metric() {
  local body port=${3:-$admin_port}
  body=$(exec 3<>"/dev/tcp/127.0.0.1/$port" \
         && printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3 && cat <&3) || { echo 0; return; }
  printf '%s\n' "$body" | tr -d '\r' \
    | awk -v n="$1" -v f="$2" 'index($0, n "{") == 1 && (f == "" || index($0, f)) { s += $NF } END { print s + 0 }'
}

# ---------------------------------------------------------------------------
# 5. The cases
# ---------------------------------------------------------------------------
# Connection parameters for every client program.
export PGT_HOST=localhost PGT_PORT=$proxy_port PGT_DB=postgres
export PGT_USER=app PGT_PASSWORD=$app_password PGT_CERT_USER=certuser
export PGT_CA=$work/pki/ca.crt
export PGT_CERT=$work/pki/client-certuser.crt PGT_KEY=$work/pki/client-certuser.key
export PGT_BAD_CERT=$work/foreign/client-certuser.crt PGT_BAD_KEY=$work/foreign/client-certuser.key
export PGT_COPY_ROWS=5000 PGT_TMP=$work
# Keep libpq from picking up anything from the environment or ~/.postgresql.
unset PGHOST PGPORT PGUSER PGPASSWORD PGDATABASE PGSSLMODE PGSSLCERT PGSSLKEY PGSSLROOTCERT PGSERVICE
export PGSYSCONFDIR=$work/none

passed=0; failed=0; skipped=0
details=()
failures=()   # repeated at the very end: CI shows only an output's tail

# run_case CLIENT CASE COMMAND...
# The command prints "ok", "FAIL <reason>" or "skip <reason>" on its first
# line, and may add "note: <text>" lines; anything else is ignored. run.sh
# adds a check of the proxy's own counters for the cases where the client
# alone cannot prove it (below), and prints the one result line.
run_case() {
  local client=$1 case=$2; shift 2
  local counter="" filter="" port=$admin_port before=0 after out rc result reason line log_before
  case $case in
    mtls)         counter=pgtls_role_decisions_total;         filter='decision="allowed"' ;;
    refused-cert) counter=pgtls_tls_handshake_failures_total; filter='' ;;
    cancel)       counter=pgtls_cancel_requests_total;        filter='result="forwarded"' ;;
    scram-login)  counter=pgtls_client_logins_total;          filter='result="ok"'; port=$scram_admin_port ;;
  esac
  [ -n "$counter" ] && before=$(metric "$counter" "$filter" "$port")
  log_before=$(wc -l < "$work/proxy.log")
  out=$(timeout 60 "$@" 2>"$work/stderr.$client.$case"); rc=$?
  result=$(printf '%s\n' "$out" | grep -m1 -E '^(ok|FAIL|skip)( |$)')
  while IFS= read -r line; do
    details+=("$client $case: ${line#note: }")
  done < <(printf '%s\n' "$out" | grep '^note: ')
  if [ "$rc" = 124 ]; then
    result="FAIL timed out after 60 s"
  elif [ -z "$result" ]; then
    reason=$(grep -v '^\s*$' "$work/stderr.$client.$case" | tail -n 1)
    result="FAIL no result line (exit $rc)${reason:+: $reason}"
  elif [ "${result%% *}" = ok ] && [ "$rc" != 0 ]; then
    result="FAIL printed ok but exited $rc"
  fi
  # The proxy must have seen what the client claims: the certificate mapped
  # by a rule (certuser is also reachable by pg_hba trust, so a login alone
  # proves nothing), the foreign CA refused in the TLS handshake, the cancel
  # forwarded to the backend. The proxy may count a moment after the client
  # has its answer: wait up to 10 s (a busy CI machine), it stops as soon as the counter moves.
  if [ "${result%% *}" = ok ] && [ -n "$counter" ]; then
    for _ in $(seq 100); do
      after=$(metric "$counter" "$filter" "$port")
      [ "$after" -gt "$before" ] && break
      sleep 0.1
    done
    if [ "$after" -le "$before" ]; then
      result="FAIL the client succeeded but $counter{$filter} did not move ($before -> $after)"
    fi
  fi
  # From the proxy's log lines written during this case: why it refused the
  # handshake (the reason behind the client's error text), and how the
  # CancelRequest arrived (libpq <= 16 and most drivers: plaintext on a new
  # connection; libpq 17+ cancel_safe, asyncpg, tokio-postgres: over TLS).
  case $case in
    refused-cert)
      line=$(tail -n "+$((log_before + 1))" "$work/proxy.log" | grep 'TLS handshake refused' | tail -n 1 \
             | sed 's/.*TLS handshake refused: //')
      [ -n "$line" ] && details+=("$client $case: proxy log: $line") ;;
    cancel)
      line=$(tail -n "+$((log_before + 1))" "$work/proxy.log" | grep 'path="cancel"' | tail -n 1)
      if [ -n "$line" ]; then
        line=$(printf '%s' "$line" | sed -n 's/.* tls_version="\([^"]*\)".*/\1/p')
        details+=("$client $case: proxy received the CancelRequest ${line:+over }${line:-in plaintext}")
      fi ;;
    scram-login)
      line=$(grep 'pgtls::audit' "$work/proxy-scram.log" | tail -n 1 | sed -n 's/.* auth=\([^ ]* -> [^ ]*\) .*/\1/p')
      [ -n "$line" ] && details+=("$client $case: logins $line") ;;
  esac
  case ${result%% *} in
    ok)   passed=$((passed + 1)); echo "$client $case: ok" ;;
    skip) skipped=$((skipped + 1)); echo "$client $case: $result" ;;
    *)    failed=$((failed + 1)); echo "$client $case: $result"
          failures+=("$client $case: $result")
          while IFS= read -r line; do
            failures+=("    stderr: $line")
          done < <(grep -v '^\s*$' "$work/stderr.$client.$case" | tail -n 5) ;;
  esac
}

clients=${CLIENTS:-psql psycopg asyncpg node jdbc tokio-postgres}
for client in $clients; do
  case $client in
    psql)
      for c in tls-login direct-tls mtls refused-cert cancel copy; do
        run_case psql "$c" bash "$here/psql_cases.sh" "$c"
      done
      run_case psql scram-login env PGT_PORT="$scram_port" bash "$here/psql_cases.sh" tls-login ;;
    psycopg)
      for c in tls-login direct-tls mtls refused-cert cancel copy; do
        run_case psycopg "$c" "$vpy" "$here/psycopg_cases.py" "$c"
      done
      run_case psycopg scram-login env PGT_PORT="$scram_port" "$vpy" "$here/psycopg_cases.py" tls-login ;;
    asyncpg)
      for c in tls-login direct-tls mtls refused-cert cancel copy; do
        run_case asyncpg "$c" "$vpy" "$here/asyncpg_cases.py" "$c"
      done
      run_case asyncpg scram-login env PGT_PORT="$scram_port" "$vpy" "$here/asyncpg_cases.py" tls-login ;;
    node)
      for c in tls-login direct-tls mtls refused-cert cancel copy; do
        run_case node "$c" env NODE_PATH="$cache/node/node_modules" node "$here/node_cases.js" "$c"
      done
      run_case node scram-login env PGT_PORT="$scram_port" env NODE_PATH="$cache/node/node_modules" node "$here/node_cases.js" tls-login ;;
    jdbc)
      for c in tls-login direct-tls mtls refused-cert cancel copy; do
        run_case jdbc "$c" java -Xshare:auto -XX:TieredStopAtLevel=1 -cp "$jdbc_jar:$cache/java" JdbcCases "$c"
      done
      run_case jdbc scram-login env PGT_PORT="$scram_port" java -Xshare:auto -XX:TieredStopAtLevel=1 -cp "$jdbc_jar:$cache/java" JdbcCases tls-login ;;
    tokio-postgres)
      for c in tls-login direct-tls mtls refused-cert cancel copy; do
        run_case tokio-postgres "$c" "$tokio_bin" "$c"
      done
      run_case tokio-postgres scram-login env PGT_PORT="$scram_port" "$tokio_bin" tls-login ;;
    *) die "unknown client $client" ;;
  esac
done

t_done=$(date +%s)
echo
echo "details:"
for d in "${details[@]}"; do echo "  $d"; done
echo "  installs and setup: $((t_installed - t0)) s; cluster, proxy and cases: $((t_done - t_installed)) s"
if [ "$failed" -gt 0 ]; then
  echo "  proxy log (last 30 lines):"
  tail -n 30 "$work/proxy.log" | sed 's/^/    /'
  echo "  SCRAM-terminating proxy log (last 10 lines):"
  tail -n 10 "$work/proxy-scram.log" | sed 's/^/    /'
  echo
  echo "failed:"
  for f in "${failures[@]}"; do echo "  $f"; done
fi
echo
summary="$passed passed, $failed failed"
[ "$skipped" -gt 0 ] && summary+=", $skipped skipped"
echo "$summary"
[ "$failed" -eq 0 ]
