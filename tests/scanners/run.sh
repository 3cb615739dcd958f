#!/usr/bin/env bash
# TLS scanner checks: testssl.sh and sslyze against pg-tls-proxy, in front of a throwaway
# PostgreSQL, with `pg-tls-proxy dev-certs` certificates, plus a few raw ClientHello probes.
# Findings are judged against tests/scanners/expected.txt (see README.md beside this file).
#
# Usage: bash tests/scanners/run.sh
#   PG_TLS_PROXY=path   use this proxy binary instead of `cargo build --bin pg-tls-proxy`
#   SCANNERS_OUT=dir    where results are kept (default target/scanners)
#   SCANNERS_ENV=dir    the sslyze virtualenv (default target/scanners-env)
#   TESTSSL_TIME_LIMIT  seconds before testssl.sh is killed (default 300)
# Prints one line per check, `<scanner> <check>: ok|FAIL <reason>`, then `N passed, M failed`;
# exits 1 if any check failed. As root it installs what is missing (apt: testssl.sh, postgresql,
# python3-venv; pip: sslyze into the virtualenv) and runs PostgreSQL as the postgres user.
set -uo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)
here=$repo/tests/scanners
out=${SCANNERS_OUT:-$repo/target/scanners}
venv=${SCANNERS_ENV:-$repo/target/scanners-env}
testssl_limit=${TESTSSL_TIME_LIMIT:-300}
SSLYZE_VERSION=6.3.1
started=$(date +%s)

mkdir -p "$out"
results=$(mktemp /tmp/pg-tls-proxy-scanners-results.XXXXXX)
work=""
proxy_pid=""
scanner_pid=""
pg_bindir=""
as_pg=()

note() { printf '# %s\n' "$*"; }
report() { # scanner check ok|FAIL reason
  local line="$1 $2: $3${4:+ $4}"
  printf '%s\n' "$line"
  printf '%s\n' "$line" >>"$results"
}
finish() {
  local passed failed
  passed=$(grep -cE '^[^ ]+ [^ ]+: ok( |$)' "$results" || true)
  failed=$(grep -cE '^[^ ]+ [^ ]+: FAIL( |$)' "$results" || true)
  note "results in $out; wall time $(($(date +%s) - started)) s"
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
  exit $?
}
# A scanner runs in the background under `timeout` (its own process group) so that a signal to
# this script is handled at once, not after the scanner ends.
bounded() { # seconds command...
  local limit=$1 rc
  shift
  timeout -k 10 "$limit" "$@" &
  scanner_pid=$!
  wait "$scanner_pid"
  rc=$?
  scanner_pid=""
  return $rc
}
cleanup() {
  if [ -n "$scanner_pid" ]; then
    kill "$scanner_pid" 2>/dev/null && wait "$scanner_pid" 2>/dev/null
    scanner_pid=""
  fi
  if [ -n "$proxy_pid" ]; then
    kill "$proxy_pid" 2>/dev/null && wait "$proxy_pid" 2>/dev/null
    proxy_pid=""
  fi
  if [ -n "$work" ]; then
    if [ -n "$pg_bindir" ] && [ -f "$work/pg/data/postmaster.pid" ]; then
      "${as_pg[@]}" "$pg_bindir/pg_ctl" -D "$work/pg/data" -m immediate stop >/dev/null 2>&1 || true
    fi
    [ -f "$work/proxy.log" ] && cp "$work/proxy.log" "$out/proxy.log" 2>/dev/null
    rm -rf "$work"
    work=""
  fi
  rm -f "$results"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------- prerequisites
find_pg_bindir() {
  pg_bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if { [ -z "$pg_bindir" ] || [ ! -x "$pg_bindir/initdb" ]; } && command -v pg_config >/dev/null; then
    pg_bindir=$(pg_config --bindir)
  fi
  [ -n "$pg_bindir" ] && [ -x "$pg_bindir/initdb" ]
}
missing=()
command -v testssl >/dev/null || missing+=(testssl.sh)
find_pg_bindir || missing+=(postgresql)
command -v psql >/dev/null || missing+=(postgresql-client)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v timeout >/dev/null || missing+=(coreutils)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    note "installing ${missing[*]} (apt-get)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }; then
      report setup prerequisites FAIL "apt-get install ${missing[*]} failed"
      finish
    fi
    find_pg_bindir
  else
    report setup prerequisites FAIL "missing ${missing[*]}: install them (or run as root)"
    finish
  fi
fi
if ! "$venv/bin/sslyze" --help 2>/dev/null | grep -q "SSLyze version $SSLYZE_VERSION"; then
  note "installing sslyze $SSLYZE_VERSION into $venv (pip)"
  rm -rf "$venv"
  if ! { python3 -m venv "$venv" && "$venv/bin/pip" install -q --disable-pip-version-check "sslyze==$SSLYZE_VERSION"; }; then
    report setup prerequisites FAIL "could not install sslyze $SSLYZE_VERSION into $venv"
    finish
  fi
fi
if [ -n "${PG_TLS_PROXY:-}" ]; then
  proxy=$PG_TLS_PROXY
else
  note "cargo build --bin pg-tls-proxy"
  if ! cargo build --quiet --bin pg-tls-proxy; then
    report setup prerequisites FAIL "cargo build --bin pg-tls-proxy failed"
    finish
  fi
  proxy=$repo/target/debug/pg-tls-proxy
fi
report setup prerequisites ok "$(testssl --version 2>/dev/null | grep -o 'testssl *[0-9][0-9.]*' | head -n 1 | tr -s ' '), sslyze $SSLYZE_VERSION, PostgreSQL $("$pg_bindir/postgres" --version | grep -o '[0-9][0-9.]*' | head -n 1), $proxy"

# ---------------------------------------------------------------------------- PostgreSQL, certificates, proxy
work=$(mktemp -d /tmp/pg-tls-proxy-scanners.XXXXXX)
chmod 755 "$work"
mkdir -p "$work/pg"
if [ "$(id -u)" = 0 ]; then
  as_pg=(runuser -u postgres --) # initdb and postgres refuse to run as root
  chown postgres:postgres "$work/pg"
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_port=$(free_port)
proxy_port=$(free_port)

if ! "${as_pg[@]}" "$pg_bindir/initdb" -D "$work/pg/data" -U postgres -A trust --no-sync -E UTF8 --locale=C >"$work/initdb.log" 2>&1; then
  report setup postgresql FAIL "initdb failed: $(tail -n 3 "$work/initdb.log" | tr '\n' ' ')"
  finish
fi
cat >>"$work/pg/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = '$work/pg'
fsync = off
CONF
printf 'local all all trust\nhost all all 127.0.0.1/32 trust\n' >"$work/pg/data/pg_hba.conf"
if ! "${as_pg[@]}" "$pg_bindir/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w -t 60 start >/dev/null 2>&1; then
  report setup postgresql FAIL "pg_ctl start failed: $(tail -n 3 "$work/pg/log" 2>/dev/null | tr '\n' ' ')"
  finish
fi

if ! "$proxy" dev-certs --out "$work/certs" >"$work/dev-certs.log" 2>&1; then
  report setup proxy FAIL "dev-certs failed: $(tr '\n' ' ' <"$work/dev-certs.log")"
  finish
fi
ca=$work/certs/ca.crt
cp "$ca" "$out/ca.crt"
cat >"$work/proxy.toml" <<CONF
[listen]
address = "127.0.0.1:$proxy_port"
[tls]
cert = "$work/certs/server.crt"
key = "$work/certs/server.key"
[backend]
address = "127.0.0.1:$pg_port"
sslmode = "disable"
[admin]
enabled = false
CONF
"$proxy" --config "$work/proxy.toml" >"$work/proxy.log" 2>&1 &
proxy_pid=$!
for _ in $(seq 100); do
  grep -q listening "$work/proxy.log" 2>/dev/null && break
  kill -0 "$proxy_pid" 2>/dev/null || break
  sleep 0.1
done
if ! grep -q listening "$work/proxy.log"; then
  report setup proxy FAIL "not listening on 127.0.0.1:$proxy_port: $(tail -n 3 "$work/proxy.log" | tr '\n' ' ')"
  finish
fi
conn="host=localhost port=$proxy_port user=postgres dbname=postgres sslmode=verify-full sslrootcert=$ca connect_timeout=10"
if answer=$(psql "$conn" -c '\conninfo' 2>&1); then
  report setup proxy ok "127.0.0.1:$proxy_port -> PostgreSQL 127.0.0.1:$pg_port; psql sslmode=verify-full: $(grep -o 'SSL connection ([^)]*)' <<<"$answer")"
else
  report setup proxy FAIL "psql sslmode=verify-full through the proxy: $(tr '\n' ' ' <<<"$answer")"
  finish
fi

# ---------------------------------------------------------------------------- testssl.sh
rm -f "$out"/testssl.json "$out"/testssl.csv "$out"/testssl.log
note "testssl.sh -t postgres against 127.0.0.1:$proxy_port (bounded by ${testssl_limit}s)"
t0=$(date +%s)
bounded "$testssl_limit" testssl --quiet --color 0 --warnings batch --nodns none \
  --openssl-timeout 10 --connect-timeout 10 \
  -t postgres --add-ca "$ca" \
  --severity LOW --jsonfile "$out/testssl.json" --csvfile "$out/testssl.csv" --logfile "$out/testssl.log" \
  "127.0.0.1:$proxy_port" >/dev/null 2>&1
testssl_rc=$?
note "testssl.sh took $(($(date +%s) - t0)) s"
python3 "$here/check.py" testssl --json "$out/testssl.json" --log "$out/testssl.log" --rc "$testssl_rc" \
  --expected "$here/expected.txt" | tee -a "$results"

# ---------------------------------------------------------------------------- sslyze
note "sslyze --starttls postgres against localhost:$proxy_port"
t0=$(date +%s)
bounded 120 "$venv/bin/sslyze" --starttls postgres \
  --certinfo --certinfo_ca_file "$ca" \
  --sslv2 --sslv3 --tlsv1 --tlsv1_1 --tlsv1_2 --tlsv1_3 \
  --reneg --compression --ems --heartbleed --robot --openssl_ccs --early_data \
  --mozilla_config intermediate --json_out "$out/sslyze.json" \
  "localhost:$proxy_port{127.0.0.1}" >"$out/sslyze.txt" 2>&1
sslyze_rc=$?
note "sslyze took $(($(date +%s) - t0)) s"
python3 "$here/check.py" sslyze --json "$out/sslyze.json" --txt "$out/sslyze.txt" --rc "$sslyze_rc" | tee -a "$results"

# ---------------------------------------------------------------------------- raw ClientHello probes
python3 "$here/check.py" probe --port "$proxy_port" --expected "$here/expected.txt" | tee -a "$results"

finish
