#!/usr/bin/env bash
# psql (the system's, with its libpq) through pg-tls-proxy: one case per run.
#   bash psql_cases.sh CASE     CASE: tls-login direct-tls mtls refused-cert cancel copy
# Connection parameters come from PGT_* (see run.sh). Prints "ok",
# "FAIL <reason>" or "skip <reason>" first, then "note: ..." lines.
set -uo pipefail
case_name=${1:?case}

base="host=$PGT_HOST port=$PGT_PORT dbname=$PGT_DB sslmode=verify-full sslrootcert=$PGT_CA"
app="$base user=$PGT_USER"
psql_() { psql -X -A -t -q -v ON_ERROR_STOP=1 -v VERBOSITY=verbose "$@"; }
fail() { echo "FAIL $*"; exit 1; }
oneline() { tr '\n' ' ' | sed 's/  */ /g; s/ $//'; }
libpq_major=$(psql --version | sed -E 's/.* ([0-9]+)(\.[0-9]+)*.*/\1/')

case $case_name in
tls-login)
  # verify-full: the chain must lead to PGT_CA and the name must match.
  out=$(PGPASSWORD=$PGT_PASSWORD psql_ "$app" -c '\conninfo' -c 'SELECT 1' 2>&1) || fail "$(echo "$out" | oneline)"
  echo "$out" | grep -q '^1$' || fail "SELECT 1 returned: $(echo "$out" | oneline)"
  tls=$(echo "$out" | grep -o 'SSL connection ([^)]*)') || fail "\\conninfo shows no SSL connection: $(echo "$out" | oneline)"
  echo ok
  echo "note: libpq $libpq_major, $tls"
  ;;
direct-tls)
  [ "$libpq_major" -ge 17 ] || { echo "skip psql/libpq $libpq_major has no sslnegotiation=direct (libpq 17+)"; exit 0; }
  out=$(PGPASSWORD=$PGT_PASSWORD psql_ "$app sslnegotiation=direct" -c '\conninfo' -c 'SELECT 1' 2>&1) || fail "$(echo "$out" | oneline)"
  echo "$out" | grep -q '^1$' || fail "SELECT 1 returned: $(echo "$out" | oneline)"
  echo ok
  echo "note: $(echo "$out" | grep -o 'SSL connection ([^)]*)')"
  ;;
mtls)
  # No password: the certificate (CN=certuser) is what the proxy's rule maps.
  out=$(psql_ "$base user=$PGT_CERT_USER sslcert=$PGT_CERT sslkey=$PGT_KEY" -c 'SELECT current_user' 2>&1) \
    || fail "$(echo "$out" | oneline)"
  [ "$out" = "$PGT_CERT_USER" ] || fail "current_user is '$out'"
  echo ok
  ;;
refused-cert)
  # A CN=certuser certificate from a CA the proxy does not trust.
  if out=$(psql_ "$base user=$PGT_CERT_USER sslcert=$PGT_BAD_CERT sslkey=$PGT_BAD_KEY" -c 'SELECT current_user' 2>&1); then
    fail "logged in with a certificate from a foreign CA: $out"
  fi
  echo ok
  echo "note: error: $(echo "$out" | oneline)"
  ;;
cancel)
  # psql's SIGINT handler sends a CancelRequest (libpq <= 16: PQcancel, in
  # plaintext on a new connection; 17+: over TLS).
  err=$PGT_TMP/psql-cancel.err
  # psql itself in the background (not the psql_ function, whose subshell
  # would get the signal): $! is then psql's pid.
  PGPASSWORD=$PGT_PASSWORD psql -X -q -v VERBOSITY=verbose "$app" -c 'SELECT pg_sleep(30)' >/dev/null 2>"$err" &
  pid=$!
  # SIGINT only once the server runs the query (a second connection reads
  # pg_stat_activity): a SIGINT that came before psql had sent it would
  # prove nothing, and psql would just exit.
  active=0
  for _ in $(seq 100); do
    n=$(PGPASSWORD=$PGT_PASSWORD psql_ "$app" -c \
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = 'SELECT pg_sleep(30)'" 2>/dev/null)
    [ "${n:-0}" -ge 1 ] && { active=1; break; }
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  [ "$active" = 1 ] || { kill "$pid" 2>/dev/null; wait "$pid"; fail "pg_sleep(30) never showed as active: $(oneline < "$err")"; }
  start=$(date +%s.%N)
  kill -INT "$pid"
  wait "$pid"; rc=$?
  elapsed=$(awk -v a="$(date +%s.%N)" -v b="$start" 'BEGIN{print a-b}')
  msg=$(oneline < "$err")
  [ "$rc" != 0 ] || fail "psql exited 0 after SIGINT (the query was not cancelled)"
  echo "$msg" | grep -q '57014' || fail "no 57014 after SIGINT (exit $rc): $msg"
  awk -v e="$elapsed" 'BEGIN{exit !(e < 10)}' || fail "cancel took ${elapsed}s"
  echo ok
  echo "note: 57014 $(printf '%.1f' "$elapsed") s after SIGINT: $msg"
  ;;
copy)
  # COPY FROM STDIN (\copy) of PGT_COPY_ROWS rows, then COPY TO STDOUT back.
  n=$PGT_COPY_ROWS
  gen() { awk -v n="$n" 'BEGIN{for(i=1;i<=n;i++) printf "psql\t%d\t%06d-%s\n", i, i, sprintf("%080d", i)}'; }
  out=$(gen | PGPASSWORD=$PGT_PASSWORD psql_ "$app" -c '\copy copy_rows (client, n, payload) from stdin' 2>&1) \
    || fail "COPY FROM: $(echo "$out" | oneline)"
  want=$(gen | cut -f2,3 | md5sum)
  got=$(PGPASSWORD=$PGT_PASSWORD psql_ "$app" \
        -c "\\copy (SELECT n, payload FROM copy_rows WHERE client = 'psql' ORDER BY n) to stdout" 2>&1 | md5sum)
  [ "$got" = "$want" ] || fail "COPY TO STDOUT did not return the $n rows written"
  echo ok
  echo "note: $n rows in and out, byte-identical"
  ;;
*) fail "unknown case $case_name" ;;
esac
