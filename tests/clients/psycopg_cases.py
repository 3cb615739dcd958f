"""psycopg 3 (binary wheel, its own libpq 17+) through pg-tls-proxy.

    python psycopg_cases.py CASE    CASE: tls-login direct-tls mtls refused-cert cancel copy

Connection parameters come from PGT_* environment variables (see run.sh).
Prints "ok", "FAIL <reason>" or "skip <reason>" first, then "note: ..." lines.
"""

import ctypes
import glob
import os
import sys
import threading
import time

import psycopg
from psycopg import errors, pq

E = os.environ
CLIENT = "psycopg"


def params(**extra):
    p = dict(
        host=E["PGT_HOST"],
        port=E["PGT_PORT"],
        dbname=E["PGT_DB"],
        sslmode="verify-full",
        sslrootcert=E["PGT_CA"],
        connect_timeout=10,
    )
    p.update(extra)
    return p


def app(**extra):
    return psycopg.connect(**params(user=E["PGT_USER"], password=E["PGT_PASSWORD"], **extra))


def ssl_info(conn):
    """protocol/cipher/ALPN from PQsslAttribute of the wheel's own libpq."""
    pg = conn.pgconn
    if not pg.ssl_in_use:
        return None
    libs = glob.glob(os.path.join(os.path.dirname(psycopg.__file__), "..", "psycopg_binary.libs", "libpq-*"))
    try:
        lib = ctypes.CDLL(libs[0])
        lib.PQsslAttribute.restype = ctypes.c_char_p
        lib.PQsslAttribute.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        get = lambda k: (lib.PQsslAttribute(pg.pgconn_ptr, k) or b"-").decode()
        return f"{get(b'protocol')} {get(b'cipher')} alpn={get(b'alpn')}"
    except (IndexError, OSError, AttributeError):
        return "TLS (attributes unavailable)"


def login(negotiation):
    with app(sslnegotiation=negotiation) as conn:
        tls = ssl_info(conn)
        if tls is None:
            return "FAIL connected without TLS"
        one = conn.execute("SELECT 1").fetchone()[0]
        if one != 1:
            return f"FAIL SELECT 1 returned {one!r}"
        if not conn.pgconn.used_password:
            return "FAIL libpq reports that no password was used"
        real_pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        if conn.info.backend_pid != real_pid:
            return f"FAIL BackendKeyData pid {conn.info.backend_pid} is not pg_backend_pid() {real_pid}"
        print("ok")
        print(f"note: libpq {pq.version()}, sslnegotiation={negotiation}, {tls}")
        print(f"note: BackendKeyData pid {conn.info.backend_pid}, pg_backend_pid() {real_pid}")


def case_tls_login():
    return login("postgres")


def case_direct_tls():
    if pq.version() < 170000:
        return f"skip libpq {pq.version()} has no sslnegotiation=direct"
    return login("direct")


def case_mtls():
    with psycopg.connect(**params(user=E["PGT_CERT_USER"], sslcert=E["PGT_CERT"], sslkey=E["PGT_KEY"])) as conn:
        who = conn.execute("SELECT current_user").fetchone()[0]
        if who != E["PGT_CERT_USER"]:
            return f"FAIL current_user is {who!r}"
        if ssl_info(conn) is None:
            return "FAIL connected without TLS"
    print("ok")


def case_refused_cert():
    try:
        psycopg.connect(**params(user=E["PGT_CERT_USER"], sslcert=E["PGT_BAD_CERT"], sslkey=E["PGT_BAD_KEY"])).close()
    except psycopg.OperationalError as e:
        print("ok")
        print("note: error: " + " ".join(str(e).split()))
        return
    return "FAIL logged in with a certificate from a foreign CA"


def wait_active(pid, seconds=10.0):
    """Until the backend `pid` runs a query, read from a second connection:
    a cancel sent before the query started would hit an idle backend and
    prove nothing."""
    with app(autocommit=True) as watcher:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            row = watcher.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
            if row and row[0] == "active":
                return True
            time.sleep(0.05)
    return False


def case_cancel():
    # cancel_safe(): libpq 17's PQcancelCreate, which sends the CancelRequest
    # over TLS with the connection's sslmode (cancel() would be PQcancel).
    with app(autocommit=True) as conn:
        sent = {}

        def cancel_when_running():
            if wait_active(conn.info.backend_pid):
                sent["at"] = time.monotonic()
                conn.cancel_safe()

        canceller = threading.Thread(target=cancel_when_running, daemon=True)
        canceller.start()
        try:
            conn.execute("SELECT pg_sleep(30)")
            return "FAIL pg_sleep(30) finished without being cancelled"
        except errors.QueryCanceled as e:
            elapsed = time.monotonic() - sent.get("at", 0.0)
            message = " ".join(str(e).split())
            if e.sqlstate != "57014" or elapsed > 10:
                return f"FAIL {e.sqlstate} {elapsed:.1f} s after the cancel: {message}"
        finally:
            canceller.join(timeout=15)
        conn.execute("SELECT 1")  # the session goes on
    print("ok")
    print(f"note: cancel_safe() (libpq {pq.version()}), 57014 {elapsed:.1f} s after it: {message}")


def case_copy():
    n = int(E["PGT_COPY_ROWS"])
    rows = [(i, f"{i:06d}-{i:080d}") for i in range(1, n + 1)]
    with app() as conn:
        with conn.cursor() as cur:
            with cur.copy("COPY copy_rows (client, n, payload) FROM STDIN") as copy:
                for i, p in rows:
                    copy.write_row((CLIENT, i, p))
            got = []
            with cur.copy(f"COPY (SELECT n, payload FROM copy_rows WHERE client = '{CLIENT}' ORDER BY n) TO STDOUT") as copy:
                for row in copy.rows():
                    got.append((int(row[0]), row[1]))
    if got != rows:
        return f"FAIL COPY TO returned {len(got)} rows, not the {n} written"
    print("ok")
    print(f"note: {n} rows in (COPY FROM STDIN) and out (COPY TO STDOUT), identical")


def main():
    name = sys.argv[1]
    fn = globals().get("case_" + name.replace("-", "_"))
    if fn is None:
        print(f"FAIL unknown case {name}")
        return 1
    try:
        result = fn()
    except Exception as e:  # any unexpected error is this case's failure
        result = f"FAIL {type(e).__name__}: {' '.join(str(e).split())}"
    if result:
        print(result)
        return 1 if result.startswith("FAIL") else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
