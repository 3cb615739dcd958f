#!/usr/bin/env python3
"""Measurement helpers for benches/compare.sh (stdlib only).

Subcommands:
  pct FILE...            p50/p99 latency (us) from pgbench --log files
  handshakes ...         TLS handshakes per second (SSLRequest + TLS + startup,
                         refused by the server with an ErrorResponse), full or
                         resumed, from several client processes
  idle ...               open N idle TLS sessions (SSLRequest + TLS + startup
                         until ReadyForQuery), measure a process's VmRSS
                         before and while they are open
  report ...             the comparison table (text + Markdown)

Every loop is bounded by a deadline and a count; only the host given (the
harness passes 127.0.0.1) is contacted.
"""
import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import ssl
import statistics
import struct
import sys
import time

SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def startup_message(user, db):
    body = struct.pack("!i", 196608)
    for k, v in (("user", user), ("database", db), ("application_name", "compare")):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return buf


def error_fields(body):
    out = {}
    for part in body.split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return out


# ---------------------------------------------------------------- pct

def cmd_pct(args):
    lat = []
    for path in args.files:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    lat.append(int(parts[2]))
    if not lat:
        print("0 0 0")
        return 1
    lat.sort()

    def q(p):
        return lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))]

    print(f"{q(0.50)} {q(0.99)} {len(lat)}")
    return 0


# ---------------------------------------------------------------- handshakes

def hs_worker(a, start_at, deadline, out):
    ctx = ssl.create_default_context(cafile=a.ca)
    ctx.check_hostname = True
    if a.cert:
        ctx.load_cert_chain(a.cert, a.key)
    startup = startup_message(a.user, a.db)
    session = None
    done = reused = errors = 0
    codes = {}
    first_error = ""
    while time.time() < start_at:
        time.sleep(0.001)
    while time.monotonic() < deadline and done + errors < a.max_count:
        s = t = None
        try:
            s = socket.create_connection((a.host, a.port), timeout=5)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(SSL_REQUEST)
            if recv_exact(s, 1) != b"S":
                raise RuntimeError("server refused SSL")
            t = ctx.wrap_socket(s, server_hostname=a.server_name,
                                session=session if a.resume else None)
            t.sendall(startup)
            # Read until the refusal (ErrorResponse). Session tickets (TLS
            # 1.3) arrive before it, so t.session then carries the ticket.
            code = None
            while True:
                head = recv_exact(t, 5)
                body = recv_exact(t, struct.unpack("!i", head[1:])[0] - 4)
                if head[:1] == b"E":
                    code = error_fields(body).get("C", "?")
                    break
                if head[:1] in (b"R", b"Z"):
                    raise RuntimeError(f"server did not refuse the login (got {head[:1]!r})")
            codes[code] = codes.get(code, 0) + 1
            if t.session_reused:
                reused += 1
            if a.resume:
                session = t.session
            done += 1
        except Exception as e:  # counted, and the first one reported
            errors += 1
            if not first_error:
                first_error = f"{type(e).__name__}: {e}"
            time.sleep(0.01)
        finally:
            for x in (t, s):
                if x is not None:
                    try:
                        x.close()
                    except Exception:
                        pass
    out.put((done, reused, errors, codes, first_error))


def cmd_handshakes(a):
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 0.3
    deadline = time.monotonic() + 0.3 + a.seconds
    procs = [ctx.Process(target=hs_worker, args=(a, start_at, deadline, out)) for _ in range(a.procs)]
    for p in procs:
        p.start()
    results = []
    for _ in procs:
        results.append(out.get(timeout=a.seconds + 60))
    for p in procs:
        p.join(timeout=10)
    done = sum(r[0] for r in results)
    reused = sum(r[1] for r in results)
    errors = sum(r[2] for r in results)
    codes = {}
    for r in results:
        for k, v in r[3].items():
            codes[k] = codes.get(k, 0) + v
    first_error = next((r[4] for r in results if r[4]), "")
    rate = done / a.seconds
    frac = (reused / done) if done else 0.0
    print(json.dumps({"rate": rate, "done": done, "reused_fraction": frac,
                      "errors": errors, "sqlstates": codes, "first_error": first_error}))
    return 0 if done > 0 else 1


# ---------------------------------------------------------------- idle

def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def idle_main(a):
    ctx = ssl.create_default_context(cafile=a.ca)
    startup = startup_message(a.user, a.db)
    sem = asyncio.Semaphore(a.concurrency)
    conns = []
    errors = []

    async def open_one():
        r, w = await asyncio.open_connection(a.host, a.port)
        w.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        w.write(SSL_REQUEST)
        await w.drain()
        if await r.readexactly(1) != b"S":
            raise RuntimeError("server refused SSL")
        await w.start_tls(ctx, server_hostname=a.server_name)
        w.write(startup)
        await w.drain()
        while True:
            head = await r.readexactly(5)
            body = await r.readexactly(struct.unpack("!i", head[1:])[0] - 4)
            if head[:1] == b"E":
                raise RuntimeError("login refused: " + error_fields(body).get("M", "?"))
            if head[:1] == b"Z":
                break
        conns.append((r, w))

    async def guarded():
        # At most `concurrency` logins in progress; the 30 s deadline covers
        # one login, not the wait for a turn.
        async with sem:
            try:
                await asyncio.wait_for(open_one(), 30)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")

    rss0 = rss_kib(a.pid)
    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(guarded() for _ in range(a.n))), a.n * 0.1 + 120)
    opened_in = time.monotonic() - t0
    await asyncio.sleep(a.hold)
    rss1 = rss_kib(a.pid)
    for _, w in conns:
        try:
            w.write(b"X\0\0\0\4")
            w.close()
        except Exception:
            pass
    await asyncio.sleep(0.5)
    n = len(conns)
    print(json.dumps({"n": n, "wanted": a.n, "rss_idle_kib": rss0, "rss_open_kib": rss1,
                      "per_session_kib": (rss1 - rss0) / n if n else 0.0,
                      "open_seconds": opened_in, "errors": len(errors),
                      "first_error": errors[0] if errors else ""}))
    return 0 if n == a.n else 1


def cmd_idle(a):
    return asyncio.run(idle_main(a))


# ---------------------------------------------------------------- report

TARGETS = [
    ("pg_plain", "direct PG plaintext"),
    ("pg_tls", "direct PG TLS"),
    ("haproxy", "HAProxy plaintext"),
    ("pgbouncer", "PgBouncer TLS"),
    ("proxy", "pg-tls-proxy"),
    ("proxy_w1", "pg-tls-proxy, listen.workers = 1"),
    ("proxy_vf", "pg-tls-proxy (verify-full backend)"),
    ("proxy_base", "pg-tls-proxy baseline (--baseline)"),
]

# key, label, unit, higher_is_better, decimals
FIGURES = [
    ("tps", "a. pgbench -S, 8 clients, 2 threads", "tx/s", True, 0),
    ("cpu_tx", "a. front end's CPU per transaction (utime+stime)", "µs", False, 1),
    ("storm", "b. connection storm, pgbench -C -S, 8 clients", "sessions/s", True, 0),
    ("copy_out", "c. COPY ... TO STDOUT, {bulk}", "MB/s", True, 0),
    ("copy_in", "c. COPY t FROM STDIN, {bulk}", "MB/s", True, 0),
    ("lat_p50", "d. SELECT 1 round trip p50, 1 connection", "µs", False, 0),
    ("lat_p99", "d. SELECT 1 round trip p99, 1 connection", "µs", False, 0),
    ("rss_per_session", "e. RSS per idle TLS session, N={sessions}", "KiB", False, 1),
    ("rss_open", "e. RSS with N={sessions} idle TLS sessions", "MiB", False, 1),
    ("rss_idle", "e. RSS before they opened (fresh process)", "MiB", False, 1),
    ("hs_full", "f. TLS handshakes/s, full (login refused)", "/s", True, 0),
    ("hs_resumed", "f. TLS handshakes/s, resumption offered", "/s", True, 0),
    ("hs_full_nocert", "f. TLS handshakes/s, full, no client cert (proxy: backend port closed)", "/s", True, 0),
    ("hs_resumed_nocert", "f. TLS handshakes/s, resumption offered, no client cert", "/s", True, 0),
]


def fmt(v, d):
    if v is None:
        return "—"
    if d == 0:
        return f"{v:,.0f}"
    return f"{v:,.{d}f}"


def cmd_report(a):
    meta = {}
    with open(a.meta) as f:
        for line in f:
            if "\t" in line:
                k, v = line.rstrip("\n").split("\t", 1)
                meta[k] = v
    vals, notes = {}, {}
    with open(a.results) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 4:
                continue
            fig, tgt, rnd, val = parts[:4]
            note = parts[4] if len(parts) > 4 else ""
            if val in ("", "NA", "FAIL"):
                vals.setdefault((fig, tgt), []).append(None)
            else:
                vals.setdefault((fig, tgt), []).append(float(val))
            if note:
                notes.setdefault((fig, tgt), []).append(note)

    def mean(key):
        xs = vals.get(key)
        if not xs or any(x is None for x in xs):
            return None
        return statistics.fmean(xs)

    # Columns with no figure at all (no --baseline) are left out.
    targets = [t for t in TARGETS if any(k[1] == t[0] for k in vals)]
    header = (["figure", "unit"] + [t[1] for t in targets]
              + ["proxy / direct TLS", "proxy / PgBouncer", "proxy / HAProxy"])
    rows = []
    for key, label, unit, hib, d in FIGURES:
        if not any((key, t) in vals for t, _ in targets):
            continue
        label = label.format(bulk=meta.get("bulk", "?"), sessions=meta.get("sessions", "?"))
        unit = unit + (" ↑" if hib else " ↓")
        cells = []
        for t, _ in targets:
            xs = vals.get((key, t))
            if not xs:
                cells.append("—")
                continue
            m = mean((key, t))
            per = ", ".join(fmt(x, d) if x is not None else "FAIL" for x in xs)
            cell = f"**{fmt(m, d)}** ({per})" if m is not None else f"FAIL ({per})"
            nt = sorted(set(notes.get((key, t), [])))
            if nt:
                cell += " " + "; ".join(nt)
            cells.append(cell)
        p = mean((key, "proxy"))
        # The no-client-cert handshake rows compare with the same PostgreSQL
        # and PgBouncer runs as the rows above (they never ask for one).
        base = key.replace("_nocert", "")
        dt = mean((base, "pg_tls"))
        pb = mean((base, "pgbouncer"))
        hp = mean((base, "haproxy"))
        cells.append(f"{p / dt:.2f}" if p is not None and dt else "—")
        cells.append(f"{p / pb:.2f}" if p is not None and pb else "—")
        cells.append(f"{p / hp:.2f}" if p is not None and hp else "—")
        rows.append([label, unit] + cells)

    md = []
    md.append(f"Measured {meta.get('date', '?')} by `bash benches/compare.sh{meta.get('mode_flag', '')}` "
              f"({meta.get('rounds', '?')} rounds, targets alternated within each round).")
    md.append("")
    md.append(f"- machine: {meta.get('nproc', '?')} cores, {meta.get('cpu', '?')}, "
              f"{meta.get('mem', '?')}, Linux {meta.get('kernel', '?')}; {meta.get('load', '')}")
    md.append(f"- versions: {meta.get('pg_version', '?')}; {meta.get('pgb_version', '?')}; "
              f"pg-tls-proxy {meta.get('proxy_commit', '?')} (release build); "
              f"{meta.get('openssl', '?')} (PostgreSQL, PgBouncer, clients)")
    if meta.get("baseline"):
        md.append(f"- baseline (--baseline): {meta['baseline']}, same config as pg-tls-proxy")
    md.append(f"- {meta.get('settings', '')}")
    md.append("")
    md.append("| " + " | ".join(header) + " |")
    md.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
    for r in rows:
        md.append("| " + " | ".join(r) + " |")
    md.append("")
    md.append("Cells: **mean** (round 1, round 2, ...). ↑ higher is better, ↓ lower is better; "
              "ratios are pg-tls-proxy (plaintext backend link) over the column named.")
    for line in meta.get("notes", "").split("|"):
        if line.strip():
            md.append(f"- {line.strip()}")
    text = "\n".join(md) + "\n"
    with open(a.out, "w") as f:
        f.write(text)
    print(text)
    return 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("pct")
    s.add_argument("files", nargs="+")
    for name in ("handshakes", "idle"):
        s = sub.add_parser(name)
        s.add_argument("--host", default="127.0.0.1")
        s.add_argument("--port", type=int, required=True)
        s.add_argument("--ca", required=True)
        s.add_argument("--server-name", default="localhost")
        s.add_argument("--user", required=True)
        s.add_argument("--db", required=True)
        if name == "handshakes":
            s.add_argument("--cert")
            s.add_argument("--key")
            s.add_argument("--seconds", type=float, required=True)
            s.add_argument("--procs", type=int, default=8)
            s.add_argument("--resume", action="store_true")
            s.add_argument("--max-count", type=int, default=1_000_000)
        else:
            s.add_argument("--n", type=int, required=True)
            s.add_argument("--pid", type=int, required=True)
            s.add_argument("--concurrency", type=int, default=32)
            s.add_argument("--hold", type=float, default=2.0)
    s = sub.add_parser("report")
    s.add_argument("--results", required=True)
    s.add_argument("--meta", required=True)
    s.add_argument("--out", required=True)
    a = p.parse_args()
    if getattr(a, "host", None) not in (None, "127.0.0.1", "localhost", "::1"):
        sys.exit("compare_helpers: only loopback targets are allowed")
    return {"pct": cmd_pct, "handshakes": cmd_handshakes, "idle": cmd_idle, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
