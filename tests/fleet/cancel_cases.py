"""Cancels through HAProxy in front of a fleet, with psycopg 3 and its
bundled libpq 18. HAProxy balances round robin, so a cancel's new
connection lands on another replica than the session's: the replicas'
metrics must show it sent on to its peer (`peer` on the replica that got it,
`received/forwarded` on the one that issued the key) and the query must end
with 57014.

    python3 cancel_cases.py CONNINFO ADMIN_PORTS LB_PORT CASE

CASE: legacy (PQcancel: a plaintext CancelRequest), encrypted (libpq 17+
PQcancelBlocking over TLS), v32 (protocol 3.2, a 32-byte key; encrypted),
v32-legacy (protocol 3.2, PQcancel), forged (made-up 3.0 and 3.2 keys for
a live pid cancel nothing).
Prints one line; exit status 0 when the case passed.
"""
import os
import socket
import struct
import sys
import threading
import time
import urllib.request

import psycopg

conninfo, admin_ports, lb_port, case = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4]


def metric(series):
    total = 0.0
    for port in admin_ports:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        except ConnectionRefusedError:
            continue  # a drained replica
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name == series:
                total += float(value)
    return total


PEER = 'pgtls_cancel_requests_total{result="peer"}'
RECEIVED = 'pgtls_cancel_peer_total{direction="received",result="forwarded"}'
FORGED = 'pgtls_cancel_requests_total{result="forged"}'


def run_query(conn, seconds, out):
    try:
        conn.execute(f"SELECT pg_sleep({seconds})")
        out.append("completed")
    except psycopg.errors.QueryCanceled:
        out.append("57014")
    except Exception as e:  # noqa: BLE001 - reported as the case's failure
        out.append(f"{type(e).__name__}: {e}")


def started(conn, seconds):
    """The query in a thread, returned once the server runs it (read from a
    second connection): a cancel that came before it would hit an idle
    backend and prove nothing, a fixed wait races it on a busy machine."""
    out = []
    pid = conn.info.backend_pid
    t = threading.Thread(target=run_query, args=(conn, seconds, out))
    t.start()
    with psycopg.connect(conninfo, autocommit=True) as watcher:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and t.is_alive():
            row = watcher.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
            if row and row[0] == "active":
                return t, out
            time.sleep(0.05)
    fail(f"pg_sleep({seconds}) never showed as active: {out}")


def deltas(base, want):
    """Each series' increase over `base`, once every one has reached `want`
    or after 10 s: a replica counts a cancel a moment after the client saw
    its 57014."""
    deadline = time.monotonic() + 10
    while True:
        got = [metric(series) - b for series, b in base]
        if all(g >= w for g, w in zip(got, want)) or time.monotonic() >= deadline:
            return got
        time.sleep(0.05)


def fail(why):
    print(why)
    sys.exit(1)


def cancel_case(extra, how):
    conn = psycopg.connect(conninfo + extra, autocommit=True)
    version = conn.pgconn.full_protocol_version
    want = 30002 if "3.2" in extra else 30000
    if version != want:
        fail(f"protocol {version}, expected {want}")
    peer0, recv0 = metric(PEER), metric(RECEIVED)
    t, out = started(conn, 30)
    began = time.monotonic()
    getattr(conn, how)()
    t.join(15)
    took = (time.monotonic() - began) * 1000
    if out != ["57014"]:
        fail(f"query not cancelled: {out or 'still running'}")
    peer, recv = deltas([(PEER, peer0), (RECEIVED, recv0)], [1, 1])
    if peer != 1 or recv != 1:
        fail(f"the cancel was not sent on between replicas (peer +{peer:g}, received +{recv:g})")
    print(f"57014 via another replica in {took:.0f} ms, protocol {version // 10000}.{version % 100}, pid {conn.info.backend_pid}")
    conn.close()


def send_cancel(pid, secret):
    s = socket.create_connection(("127.0.0.1", lb_port))
    s.sendall(struct.pack("!iii", 12 + len(secret), 80877102, pid) + secret)
    s.settimeout(5)
    try:
        if s.recv(1):
            fail("a CancelRequest got a reply")
    except OSError:
        pass
    s.close()


def forged_case():
    conn = psycopg.connect(conninfo, autocommit=True)
    pid = conn.info.backend_pid
    forged0 = metric(FORGED)
    t, out = started(conn, 2)
    for replica in range(3):
        # 3.0: each replica's id in the top 6 bits, the rest made up.
        send_cancel(pid, bytes([replica << 2]) + os.urandom(3))
    for _ in range(3):
        send_cancel(pid, bytes([0]) + os.urandom(31))  # 3.2 without the MAC
    t.join(15)
    if out != ["completed"]:
        fail(f"a forged key cancelled the query: {out or 'still running'}")
    (forged,) = deltas([(FORGED, forged0)], [3])
    if forged != 3:
        fail(f"forged 3.2 keys counted {forged:g} times, expected 3")
    print(f"6 forged keys for pid {pid}: query completed, 3 dropped as forged")
    conn.close()


if case == "legacy":
    cancel_case("", "cancel")
elif case == "encrypted":
    cancel_case("", "cancel_safe")
elif case == "v32":
    cancel_case(" max_protocol_version=3.2", "cancel_safe")
elif case == "v32-legacy":
    cancel_case(" max_protocol_version=3.2", "cancel")
elif case == "forged":
    forged_case()
else:
    fail(f"unknown case {case}")
