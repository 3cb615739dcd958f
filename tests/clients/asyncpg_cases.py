"""asyncpg (its own protocol implementation, Python's ssl) through pg-tls-proxy.

    python asyncpg_cases.py CASE    CASE: tls-login direct-tls mtls refused-cert cancel copy

Connection parameters come from PGT_* environment variables (see run.sh).
Prints "ok", "FAIL <reason>" or "skip <reason>" first, then "note: ..." lines.
"""

import asyncio
import os
import sys
import time
from urllib.parse import quote, urlencode

import asyncpg

E = os.environ
CLIENT = "asyncpg"


def dsn(user, password=None, **tls):
    # libpq-style sslmode/sslrootcert/sslcert/sslkey in the DSN: asyncpg then
    # builds its own SSLContext (verify-full: chain + host name, ALPN
    # "postgresql").
    q = dict(sslmode="verify-full", sslrootcert=E["PGT_CA"], **tls)
    cred = quote(user) + (":" + quote(password) if password else "")
    return f"postgresql://{cred}@{E['PGT_HOST']}:{E['PGT_PORT']}/{E['PGT_DB']}?{urlencode(q)}"


def app_dsn():
    return dsn(E["PGT_USER"], E["PGT_PASSWORD"])


def tls_of(conn):
    # No public API for the TLS session: the transport's ssl_object.
    ssl_obj = conn._transport.get_extra_info("ssl_object")
    if ssl_obj is None:
        return None
    return f"{ssl_obj.version()} {ssl_obj.cipher()[0]} alpn={ssl_obj.selected_alpn_protocol()}"


async def login(direct):
    conn = await asyncpg.connect(app_dsn(), direct_tls=direct, timeout=10)
    try:
        tls = tls_of(conn)
        if tls is None:
            return "FAIL connected without TLS"
        one = await conn.fetchval("SELECT 1")
        if one != 1:
            return f"FAIL SELECT 1 returned {one!r}"
        real_pid = await conn.fetchval("SELECT pg_backend_pid()")
        if conn.get_server_pid() != real_pid:
            return f"FAIL get_server_pid() {conn.get_server_pid()} is not pg_backend_pid() {real_pid}"
        print("ok")
        print(f"note: asyncpg {asyncpg.__version__}, direct_tls={direct}, {tls}")
        print(f"note: get_server_pid() {conn.get_server_pid()}, pg_backend_pid() {real_pid}")
    finally:
        await conn.close()


async def case_tls_login():
    return await login(False)


async def case_direct_tls():
    return await login(True)


async def case_mtls():
    conn = await asyncpg.connect(dsn(E["PGT_CERT_USER"], sslcert=E["PGT_CERT"], sslkey=E["PGT_KEY"]), timeout=10)
    try:
        who = await conn.fetchval("SELECT current_user")
        if who != E["PGT_CERT_USER"]:
            return f"FAIL current_user is {who!r}"
        if tls_of(conn) is None:
            return "FAIL connected without TLS"
    finally:
        await conn.close()
    print("ok")


async def case_refused_cert():
    try:
        conn = await asyncpg.connect(
            dsn(E["PGT_CERT_USER"], sslcert=E["PGT_BAD_CERT"], sslkey=E["PGT_BAD_KEY"]), timeout=10
        )
    except Exception as e:  # an SSLError, a reset, ... is what the user sees
        print("ok")
        print(f"note: error: {type(e).__name__}: {' '.join(str(e).split())}")
        return
    await conn.close()
    return "FAIL logged in with a certificate from a foreign CA"


async def case_cancel():
    # asyncpg cancels on task cancellation (or a command timeout): it sends a
    # CancelRequest on a new connection (SSLRequest + TLS, as the session)
    # and waits for the backend to finish the query. The task ends with
    # CancelledError, not the server's 57014, so the proof is on the server:
    # the backend is idle again within seconds, not after 30 s.
    conn = await asyncpg.connect(app_dsn(), timeout=10)
    watcher = await asyncpg.connect(app_dsn(), timeout=10)
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        running = asyncio.create_task(conn.execute("SELECT pg_sleep(30)"))
        # Cancel only once the server runs the query: a CancelRequest that
        # came before it would hit an idle backend and prove nothing.
        deadline = time.monotonic() + 10
        state = None
        while time.monotonic() < deadline and not running.done():
            state = await watcher.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pid)
            if state == "active":
                break
            await asyncio.sleep(0.05)
        if state != "active":
            running.cancel()
            return f"FAIL pg_sleep(30) never showed as active (state {state})"
        start = time.monotonic()
        running.cancel()
        try:
            await running
            return "FAIL pg_sleep(30) finished despite the cancellation"
        except asyncio.CancelledError:
            pass
        state = None
        while time.monotonic() - start < 10:
            state = await watcher.fetchval("SELECT state || ': ' || query FROM pg_stat_activity WHERE pid = $1", pid)
            if state and not state.startswith("active"):
                break
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - start
        if not state or state.startswith("active"):
            return f"FAIL backend still busy {elapsed:.1f} s after the cancel: {state}"
        if await conn.fetchval("SELECT 1", timeout=5) != 1:  # the session goes on
            return "FAIL the session is unusable after the cancel"
    finally:
        await watcher.close()
        await conn.close()
    print("ok")
    print(f"note: task.cancel() -> CancelRequest; backend idle again {elapsed:.1f} s after it ({state})")


async def case_copy():
    n = int(E["PGT_COPY_ROWS"])
    rows = [(CLIENT, i, f"{i:06d}-{i:080d}") for i in range(1, n + 1)]
    conn = await asyncpg.connect(app_dsn(), timeout=10)
    try:
        # COPY FROM STDIN (binary format) and COPY TO STDOUT (text).
        await conn.copy_records_to_table("copy_rows", records=rows, columns=["client", "n", "payload"])
        chunks = []

        async def sink(data):
            chunks.append(data)

        await conn.copy_from_query(
            "SELECT client, n, payload FROM copy_rows WHERE client = $1 ORDER BY n", CLIENT, output=sink
        )
    finally:
        await conn.close()
    got = [tuple(line.split("\t")) for line in b"".join(chunks).decode().splitlines()]
    got = [(c, int(i), p) for c, i, p in got]
    if got != rows:
        return f"FAIL COPY TO returned {len(got)} rows, not the {n} written"
    print("ok")
    print(f"note: {n} rows in (copy_records_to_table, binary) and out (copy_from_query), identical")


def main():
    name = sys.argv[1]
    fn = globals().get("case_" + name.replace("-", "_"))
    if fn is None:
        print(f"FAIL unknown case {name}")
        return 1
    try:
        result = asyncio.run(fn())
    except Exception as e:
        result = f"FAIL {type(e).__name__}: {' '.join(str(e).split())}"
    if result:
        print(result)
        return 1 if result.startswith("FAIL") else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
