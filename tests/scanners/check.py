#!/usr/bin/env python3
"""Judges scanner results for tests/scanners/run.sh.

Every check prints exactly one line, `<scanner> <check>: ok|FAIL <reason>`; run.sh counts them.

  check.py testssl --json F --log F --rc N --expected tests/scanners/expected.txt
  check.py sslyze  --json F --txt F --rc N
  check.py probe   --port P --expected tests/scanners/expected.txt

`probe` sends hand-built TLS 1.2 ClientHellos (after a PostgreSQL SSLRequest) to check what the
two scanners cannot see through the proxy's extended-master-secret requirement: testssl.sh 3.0
and sslyze's legacy OpenSSL client send TLS 1.2 hellos without the extended_master_secret
extension (RFC 7627), which the proxy refuses with a handshake_failure alert, whatever else the
hello says (see README.md in this directory).
"""

import argparse
import json
import os
import re
import socket
import struct
import sys

SEVERITIES = ("LOW", "MEDIUM", "HIGH", "CRITICAL", "WARN", "FATAL")


def report(scanner, check, ok, reason):
    print(f"{scanner} {check}: {'ok' if ok else 'FAIL'} {reason}", flush=True)


# ---------------------------------------------------------------------------- expectations

class Expectation:
    def __init__(self, scanner, finding, severity, presence, reason, lineno):
        self.scanner, self.finding, self.severity = scanner, finding, severity
        self.presence, self.reason, self.lineno = presence, reason, lineno


def load_expected(path):
    """`scanner finding-id severity always|maybe reason...`, one a line, # comments."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.split(None, 4)
            if len(parts) < 5 or parts[3] not in ("always", "maybe") or parts[2] not in SEVERITIES:
                raise SystemExit(
                    f"{path}:{lineno}: expected `scanner finding-id SEVERITY always|maybe reason`"
                )
            entries.append(Expectation(*parts, lineno))
    return entries


# ---------------------------------------------------------------------------- testssl.sh

def check_testssl(args):
    expected = [e for e in load_expected(args.expected) if e.scanner == "testssl"]
    log = ""
    if os.path.exists(args.log):
        with open(args.log, encoding="utf-8", errors="replace") as f:
            log = f.read()
    try:
        with open(args.json, encoding="utf-8") as f:
            findings = json.load(f)
    except (OSError, ValueError) as e:
        findings = None
        parse_error = str(e)

    # The run itself: finished (its "Done" line), over STARTTLS postgres, not killed by timeout,
    # no fatal testssl error (exit codes 242..255), and a JSON file that parses.
    done = re.search(r"^ Done .*-->> (\S+) ", log, re.M)
    problems = []
    if args.rc == 124 or args.rc == 137:
        problems.append(f"killed by the time limit (exit {args.rc})")
    elif args.rc >= 240:
        problems.append(f"testssl.sh fatal error (exit {args.rc})")
    if "STARTTLS via POSTGRES" not in log:
        problems.append("no 'Service set: STARTTLS via POSTGRES' in the log")
    if not done:
        problems.append("no 'Done' line in the log")
    if findings is None:
        problems.append(f"JSON unreadable: {parse_error}")
    if problems:
        report("testssl", "scan", False, "; ".join(problems) + f" (see {args.log})")
        return
    report("testssl", "scan", True,
           f"completed against {done.group(1)} via STARTTLS postgres, exit {args.rc}, "
           f"{len(findings)} finding(s) at LOW or above (incl. WARN) in {args.json}")

    seen = {}
    for item in findings:
        sev = item.get("severity", "")
        if sev not in SEVERITIES:
            continue
        key = (item.get("id", "?"), sev)
        seen.setdefault(key, item.get("finding", ""))

    matched = set()
    for e in expected:
        key = (e.finding, e.severity)
        if key in seen:
            matched.add(key)
            report("testssl", e.finding, True, f"expected {e.severity} \"{seen[key]}\": {e.reason}")
        elif e.presence == "maybe":
            report("testssl", e.finding, True, f"not reported this run (listed as maybe {e.severity}: {e.reason})")
        else:
            report("testssl", e.finding, False,
                   f"listed in expected.txt line {e.lineno} as {e.severity} but not reported: "
                   "remove the entry if the cause was fixed")
    for key, text in seen.items():
        if key not in matched:
            report("testssl", key[0], False, f"unexpected {key[1]} finding: \"{text}\"")


# ---------------------------------------------------------------------------- sslyze

WEAK = re.compile(r"_CBC_|RC4|_NULL_|EXPORT|anon|_DES|3DES|IDEA|SEED")


def check_sslyze(args):
    try:
        with open(args.json, encoding="utf-8") as f:
            doc = json.load(f)
        server = doc["server_scan_results"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        report("sslyze", "scan", False, f"no readable JSON result ({e}); exit {args.rc}, see {args.txt}")
        return
    if server.get("connectivity_status") != "COMPLETED" or server.get("scan_status") != "COMPLETED":
        report("sslyze", "scan", False,
               f"connectivity {server.get('connectivity_status')}, scan {server.get('scan_status')}: "
               f"{(server.get('connectivity_error_trace') or '')[:200]}")
        return
    results = server["scan_result"]
    errored = [name for name, r in results.items() if r and r.get("status") == "ERROR"]
    if errored:
        report("sslyze", "scan", False, "scan commands failed: " + ", ".join(
            f"{n} ({results[n].get('error_reason')})" for n in errored))
    else:
        report("sslyze", "scan", True,
               f"sslyze {doc.get('sslyze_version')}, every scan command completed, exit {args.rc}")

    def result(name):
        r = results.get(name) or {}
        return r.get("result") if r.get("status") == "COMPLETED" else None

    def accepted(name):
        r = result(name)
        return None if r is None else [c["cipher_suite"]["name"] for c in r["accepted_cipher_suites"]]

    for name, label in (("ssl_2_0_cipher_suites", "ssl_2_0"), ("ssl_3_0_cipher_suites", "ssl_3_0"),
                        ("tls_1_0_cipher_suites", "tls_1_0"), ("tls_1_1_cipher_suites", "tls_1_1")):
        suites = accepted(name)
        if suites is None:
            report("sslyze", label, False, "no result")
        else:
            rejected = len(result(name)["rejected_cipher_suites"])
            report("sslyze", label, not suites,
                   f"not offered ({rejected} suites rejected)" if not suites
                   else "accepted: " + " ".join(suites))

    t12, t13 = accepted("tls_1_2_cipher_suites"), accepted("tls_1_3_cipher_suites")
    if t13 is None or t12 is None:
        report("sslyze", "tls_1_2_and_1_3", False, "no result")
    else:
        report("sslyze", "tls_1_2_and_1_3", bool(t12) and bool(t13),
               f"TLS 1.3: {' '.join(t13) or 'none'}; TLS 1.2: {' '.join(t12) or 'none'} "
               "(sslyze tries AES-GCM with its legacy OpenSSL 1.0.2 client, which sends no EMS, "
               "so it lists only the suites its modern client tried)")
    everything = []
    for name in ("ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites",
                 "tls_1_1_cipher_suites", "tls_1_2_cipher_suites", "tls_1_3_cipher_suites"):
        everything += accepted(name) or []
    weak = [s for s in everything if WEAK.search(s)]
    report("sslyze", "no_cbc_or_weak_suites", not weak,
           f"all {len(everything)} accepted suites are AEAD" if not weak else "accepted: " + " ".join(weak))
    no_fs = [s for s in (t12 or []) if not s.startswith(("TLS_ECDHE_", "TLS_DHE_"))]
    report("sslyze", "forward_secrecy", not no_fs,
           "every TLS 1.2 suite is ECDHE" if not no_fs else "without (EC)DHE: " + " ".join(no_fs))

    reneg = result("session_renegotiation")
    if reneg is None:
        report("sslyze", "renegotiation", False, "no result")
    else:
        ok = reneg["supports_secure_renegotiation"] and not reneg["is_vulnerable_to_client_renegotiation_dos"]
        report("sslyze", "renegotiation", ok,
               f"secure renegotiation {reneg['supports_secure_renegotiation']}, client-initiated "
               f"renegotiation DoS {reneg['is_vulnerable_to_client_renegotiation_dos']} "
               "(sslyze's legacy client is refused for lack of EMS; probe renegotiation_info checks the "
               "ServerHello)")
    comp = result("tls_compression")
    report("sslyze", "compression", comp is not None and not comp["supports_compression"],
           "no result" if comp is None else
           f"supports_compression {comp['supports_compression']} (sslyze's legacy client is refused for "
           "lack of EMS; probe null_compression offers DEFLATE with EMS)")

    cert = result("certificate_info")
    if cert is None:
        report("sslyze", "certificate_chain", False, "no result")
    else:
        problems, details = [], []
        for dep in cert["certificate_deployments"]:
            supplied = [p for p in dep["path_validation_results"] if p["trust_store"]["name"] == "Supplied CA file"]
            if not supplied or not supplied[0]["was_validation_successful"]:
                problems.append("not valid against the dev CA: " +
                                (str(supplied[0].get("validation_error")) if supplied else "no result"))
            if not dep["received_chain_has_valid_order"]:
                problems.append("chain out of order")
            chain = dep.get("verified_certificate_chain") or []
            details.append(" -> ".join(c["subject"]["rfc4514_string"] for c in chain))
        report("sslyze", "certificate_chain", not problems,
               "; ".join(problems) if problems else "verified against the dev CA: " + "; ".join(details))

    for name, field, label in (("tls_extended_master_secret", "supports_ems_extension", "ems"),):
        r = result(name)
        report("sslyze", label, bool(r and r[field]), "no result" if r is None else f"{field} {r[field]}")
    for name, field, label in (("heartbleed", "is_vulnerable_to_heartbleed", "heartbleed"),
                               ("openssl_ccs_injection", "is_vulnerable_to_ccs_injection", "ccs_injection"),
                               ("tls_1_3_early_data", "supports_early_data", "early_data")):
        r = result(name)
        report("sslyze", label, r is not None and not r[field],
               "no result" if r is None else f"{field} {r[field]}")
    robot = result("robot")
    report("sslyze", "robot", bool(robot and robot["robot_result"].startswith("NOT_VULNERABLE")),
           "no result" if robot is None else robot["robot_result"])

    txt = ""
    if os.path.exists(args.txt):
        with open(args.txt, encoding="utf-8", errors="replace") as f:
            txt = f.read()
    compliant = "OK - Compliant." in txt
    detail = re.findall(r"^\s+\* (.*)$", txt.split("COMPLIANCE AGAINST", 1)[-1], re.M)
    report("sslyze", "mozilla_intermediate", compliant,
           "compliant with Mozilla's intermediate configuration" if compliant
           else "not compliant: " + ("; ".join(detail) or f"see {args.txt}"))


# ---------------------------------------------------------------------------- raw probes

ALERTS = {10: "unexpected_message", 40: "handshake_failure", 47: "illegal_parameter",
          50: "decode_error", 70: "protocol_version", 71: "insufficient_security",
          80: "internal_error", 100: "no_renegotiation", 109: "missing_extension"}


def testssl_tls12_suites():
    """testssl.sh's TLS12_CIPHER list (128 suites with 00,ff), as its pre-test sends it."""
    with open("/etc/testssl/tls_data.txt", encoding="utf-8") as f:
        data = f.read()
    body = re.search(r'TLS12_CIPHER="(.*?)"', data, re.S).group(1)
    return [int(a + b, 16) for a, b in re.findall(r"([0-9a-fA-F]{2}),\s*([0-9a-fA-F]{2})", body)]


def ext(kind, body=b""):
    return struct.pack("!HH", kind, len(body)) + body


def client_hello(suites, ems, compression=(0,)):
    """A TLS 1.2 ClientHello with testssl.sh's tls_sockets() extensions, plus EMS if asked."""
    sigalgs = bytes.fromhex("060106020603050105020503040104020403030103020303020102020203"
                            "080408050806080708080809080a080b")
    groups = bytes.fromhex("001d001700180019")                   # x25519, P-256, P-384, P-521
    exts = ext(0x0023)                                           # session_ticket
    exts += ext(0x3374)                                          # NPN, as testssl.sh sends it
    exts += ext(0x000D, struct.pack("!H", len(sigalgs)) + sigalgs)
    exts += ext(0x000A, struct.pack("!H", len(groups)) + groups)
    exts += ext(0x000B, b"\x01\x00")                             # ec_point_formats: uncompressed
    if ems:
        exts += ext(0x0017)                                      # extended_master_secret
    exts += ext(0x000F, b"\x01")                                 # heartbeat, testssl.sh's last
    cs = b"".join(struct.pack("!H", s) for s in suites)
    body = b"\x03\x03" + os.urandom(32) + b"\x00" + struct.pack("!H", len(cs)) + cs
    body += bytes([len(compression)]) + bytes(compression)
    body += struct.pack("!H", len(exts)) + exts
    hs = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


def server_answer(port, hello):
    """Sends SSLRequest + hello; returns ("alert", level, desc) or ("hello", fields) or ("other", text)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(struct.pack("!II", 8, 80877103))
        if s.recv(1) != b"S":
            return ("other", "no 'S' answer to SSLRequest")
        s.sendall(hello)
        buf = b""
        while len(buf) < 5 or len(buf) < 5 + struct.unpack("!H", buf[3:5])[0]:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    if len(buf) < 7:
        return ("other", f"connection closed after {len(buf)} bytes")
    if buf[0] == 0x15:
        return ("alert", buf[5], buf[6])
    if buf[0] == 0x16 and buf[5] == 0x02:
        p = 9
        version = struct.unpack("!H", buf[p:p + 2])[0]
        p += 2 + 32
        p += 1 + buf[p]
        suite = struct.unpack("!H", buf[p:p + 2])[0]
        comp = buf[p + 2]
        p += 3
        exts = {}
        if p + 2 <= len(buf):
            end = p + 2 + struct.unpack("!H", buf[p:p + 2])[0]
            p += 2
            while p + 4 <= end:
                kind, n = struct.unpack("!HH", buf[p:p + 4])
                exts[kind] = buf[p + 4:p + 4 + n]
                p += 4 + n
        return ("hello", {"version": version, "suite": suite, "compression": comp, "exts": exts})
    return ("other", "first bytes " + buf[:8].hex(" "))


def describe(answer):
    if answer[0] == "alert":
        return f"alert level {answer[1]} {answer[2]} ({ALERTS.get(answer[2], '?')})"
    if answer[0] == "hello":
        h = answer[1]
        return f"ServerHello {h['version']:04x} suite {h['suite']:04x}"
    return answer[1]


def check_probe(args):
    expected = load_expected(args.expected)
    try:
        suites129 = [0xC086] + testssl_tls12_suites()
    except (OSError, AttributeError) as e:
        report("probe", "setup", False, f"cannot read testssl.sh's cipher list: {e}")
        return
    try:
        # 1. The real 128-cipher-limit test: testssl's 129-suite pre-test hello, plus EMS.
        a = server_answer(args.port, client_hello(suites129, ems=True))
        report("probe", "tls12_129_suites_with_ems", a[0] == "hello" and a[1]["version"] == 0x0303,
               f"{len(suites129)} suites + extended_master_secret -> {describe(a)}")

        # 2. The same hello without EMS, as testssl.sh sends it. The proxy requires EMS
        #    (tls/server.rs require_ems), which is what testssl reports as pre_128cipher.
        a = server_answer(args.port, client_hello(suites129, ems=False))
        listed = any(e.scanner == "testssl" and e.finding == "pre_128cipher" for e in expected)
        refused = a[0] == "alert" and a[2] == 40
        if listed:
            report("probe", "tls12_without_ems", refused,
                   f"{len(suites129)} suites, no extended_master_secret -> {describe(a)}: "
                   "EMS is required, the cause of testssl's expected pre_128cipher")
        else:
            report("probe", "tls12_without_ems", a[0] == "hello",
                   f"{len(suites129)} suites, no extended_master_secret -> {describe(a)} "
                   "(pre_128cipher is not in expected.txt, so this hello must succeed)")

        # 3. Compression (CRIME): offer DEFLATE and null; the server must pick null.
        a = server_answer(args.port, client_hello([0xC02B, 0xC02C, 0xCCA9, 0x00FF], ems=True,
                                                  compression=(1, 0)))
        report("probe", "null_compression", a[0] == "hello" and a[1]["compression"] == 0,
               f"DEFLATE+null offered -> {describe(a)}"
               + (f", compression method {a[1]['compression']}" if a[0] == "hello" else ""))

        # 4. Secure renegotiation (RFC 5746): SCSV offered, renegotiation_info answered empty.
        a = server_answer(args.port, client_hello([0xC02B, 0x00FF], ems=True))
        ri = a[1]["exts"].get(0xFF01) if a[0] == "hello" else None
        report("probe", "renegotiation_info", ri == b"\x00",
               f"SCSV offered -> {describe(a)}, renegotiation_info "
               + ("present, empty" if ri == b"\x00" else f"{ri!r}"))
    except OSError as e:
        report("probe", "connect", False, f"127.0.0.1:{args.port}: {e}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("testssl")
    t.add_argument("--json", required=True)
    t.add_argument("--log", required=True)
    t.add_argument("--rc", type=int, required=True)
    t.add_argument("--expected", required=True)
    s = sub.add_parser("sslyze")
    s.add_argument("--json", required=True)
    s.add_argument("--txt", required=True)
    s.add_argument("--rc", type=int, required=True)
    r = sub.add_parser("probe")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--expected", required=True)
    args = p.parse_args()
    {"testssl": check_testssl, "sslyze": check_sslyze, "probe": check_probe}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
