#!/usr/bin/env python3
"""Writes the seed corpora under corpus/<target>/ (committed; rerun to
regenerate). Protocol seeds are built here byte by byte; the certificate
seeds come from the openssl command line.

Stream targets take `[flags, seed]` in front of the protocol bytes (see
fuzz_targets/common/mod.rs); most seeds use `00 00` (whole reads, no
Pending), a few vary them so that the chunking paths start covered.
"""
import os
import shutil
import struct
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102


def i32(v):
    return struct.pack(">i", v)


def startup_body(version, params):
    body = i32(version)
    for k, v in params:
        body += k + b"\0" + v + b"\0"
    return body + b"\0"


def packet(body):
    return i32(len(body) + 4) + body


def msg(tag, body=b""):
    return tag + i32(len(body) + 4) + body


def auth(code, rest=b""):
    return msg(b"R", i32(code) + rest)


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# Messages shared by several targets.
SASL = auth(10, b"SCRAM-SHA-256\0\0")
SASL_PLUS = auth(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")
SASL_CONTINUE = auth(11, b"r=clientnonceSERVERNONCE,s=c2FsdHNhbHQ=,i=4096")
SASL_FINAL = auth(12, b"v=c2VydmVyc2lnbmF0dXJlc2VydmVyc2lnbmF0dXJlcw==")
AUTH_OK = auth(0)
MD5 = auth(5, b"\x01\x02\x03\x04")
CLEARTEXT = auth(3)
PARAMS = msg(b"S", b"server_version\x0017.2\0") + msg(b"S", b"client_encoding\0UTF8\0")
KEY = msg(b"K", i32(4242) + b"\xde\xad\xbe\xef")
READY = msg(b"Z", b"I")
ERROR = msg(b"E", b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"app\"\0\0")
NOTICE = msg(b"N", b"SNOTICE\0C00000\0Mhello\0\0")


def sasl_initial(mechanism, data):
    return msg(b"p", mechanism + b"\0" + i32(len(data)) + data)


CLIENT_FIRST = sasl_initial(b"SCRAM-SHA-256", b"n,,n=,r=clientnonce")
CLIENT_FIRST_PLUS = sasl_initial(b"SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=clientnonce")
CLIENT_FINAL = msg(b"p", b"c=biws,r=clientnonceSERVERNONCE,p=cHJvb2Zwcm9vZnByb29mcHJvb2Zwcm9vZnByb29mMTI=")
PASSWORD = msg(b"p", b"secret\0")
MD5_ANSWER = msg(b"p", b"md5" + b"0123456789abcdef0123456789abcdef" + b"\0")


def startup_packet():
    t = "startup_packet"
    v30, v32 = 196608, 196610
    bodies = {
        "startup_30": startup_body(v30, [(b"user", b"alice"), (b"database", b"app"),
                                         (b"application_name", b"psql"), (b"client_encoding", b"UTF8")]),
        "startup_32_pq_options": startup_body(v32, [(b"user", b"bob"), (b"_pq_.test_option", b"1"),
                                                    (b"database", b"db")]),
        "startup_replication": startup_body(v30, [(b"user", b"repl"), (b"replication", b"true"),
                                                  (b"database", b"app")]),
        "startup_long_user": startup_body(v30, [(b"user", "é".encode() * 40)]),
        "startup_no_database": startup_body(v30, [(b"user", b"carol"), (b"options", b"-c search_path=x")]),
        "startup_empty_user": startup_body(v30, [(b"user", b"")]),
        "startup_non_utf8_app_name": startup_body(v32, [(b"user", b"dave"), (b"application_name", b"caf\xe9")]),
        "startup_v2": startup_body(2 << 16, [(b"user", b"old")]),
        "startup_no_terminator": startup_body(v30, [(b"user", b"x")])[:-1],
        # 10000 bytes of body, PostgreSQL's largest; 3.2, so it is re-encoded.
        "startup_32_max_size": startup_body(v32, [(b"user", b"big"), (b"application_name", b"a" * 9968)]),
        "ssl_request": i32(SSL_REQUEST_CODE),
        "gssenc_request": i32(GSSENC_REQUEST_CODE),
        "cancel_30": i32(CANCEL_REQUEST_CODE) + i32(1234) + b"\x01\x02\x03\x04",
        "cancel_32_long_secret": i32(CANCEL_REQUEST_CODE) + i32(1234) + bytes(range(32)),
        "ssl_request_too_long": i32(SSL_REQUEST_CODE) + b"\0\0\0\0",
    }
    for name, body in bodies.items():
        # Mode 0: the body, the harness adds the length word.
        write(t, name, b"\x00\x00" + body)
    # Mode 1: raw streams for read_packet (chunked, with Pendings), including
    # bytes after the packet that must stay unread.
    write(t, "stream_ssl_then_startup", b"\x15\x07" + packet(i32(SSL_REQUEST_CODE))
          + packet(bodies["startup_30"]))
    write(t, "stream_startup_trailing", b"\x11\x03" + packet(bodies["startup_30"]) + b"trailing")
    write(t, "stream_oversized_length", b"\x10\x00" + i32(10_005) + b"x" * 16)
    write(t, "stream_negative_length", b"\x10\x00" + i32(-1))
    # Mode 2: parse_packet on a buffer whose length word disagrees.
    write(t, "direct_bad_length_word", b"\x20\x00" + i32(99) + bodies["startup_30"])


def message_reader():
    t = "message_reader"
    write(t, "backend_scram", b"\x00\x00" + SASL_PLUS + SASL_CONTINUE + SASL_FINAL + AUTH_OK + PARAMS
          + KEY + READY)
    write(t, "backend_md5_error", b"\x00\x00" + MD5 + ERROR)
    write(t, "backend_cleartext_ok", b"\x00\x00" + CLEARTEXT + AUTH_OK + NOTICE + READY + b"Dsurplus")
    write(t, "client_scram", b"\x00\x00" + CLIENT_FIRST + CLIENT_FINAL)
    write(t, "client_password", b"\x00\x00" + PASSWORD + MD5_ANSWER)
    # Chunked (8-byte reads) with Pendings, stop after 3 frames.
    write(t, "chunked_stop_after_3", b"\x35\x11" + SASL + SASL_CONTINUE + SASL_FINAL + AUTH_OK + READY)
    # Small cap (64 + seed): the SASL list is too long for it.
    write(t, "small_cap", b"\x08\x00" + SASL_PLUS + READY)
    write(t, "length_under_4", b"\x00\x00" + b"R\x00\x00\x00\x03")
    write(t, "length_over_cap", b"\x00\x00" + b"p\x7f\xff\xff\xff")
    write(t, "truncated", b"\x02\x09" + AUTH_OK + KEY[:7])


def relay_framer():
    t = "relay_framer"
    rows = b"".join(msg(b"D", i32(1) + b"\x00\x02" + i32(5) + bytes([i]) * 5) for i in range(20))
    result = msg(b"T", b"\x00\x01a\0" + b"\0" * 18) + rows + msg(b"C", b"SELECT 20\0") + READY
    write(t, "query_result_whole", b"\x00\x00" + result)
    write(t, "query_result_8_byte_chunks_stopping", b"\x09\x21" + result)
    write(t, "query_result_64_byte_chunks", b"\x02\x42" + result)
    write(t, "copy_data", b"\x0b\x07" + msg(b"G", b"\0\0\0") + msg(b"d", b"x" * 300) * 3 + msg(b"c"))
    write(t, "short_lengths", b"\x09\x00" + b"Z\x00\x00\x00\x00" + b"Z\xff\xff\xff\xff" + READY)
    write(t, "big_length", b"\x0a\x00" + b"D\x7f\xff\xff\xff" + b"x" * 100)


def identity():
    t = "identity"
    tmp = tempfile.mkdtemp()
    try:
        def cert(name, keyargs, subj, exts=(), md=None, utf8=False):
            key = os.path.join(tmp, name + ".key")
            der = os.path.join(tmp, name + ".der")
            subprocess.run(["openssl", "genpkey", "-out", key, "-quiet"] + keyargs, check=True,
                           capture_output=True)
            cmd = ["openssl", "req", "-new", "-x509", "-key", key, "-subj", subj, "-days", "30",
                   "-outform", "DER", "-out", der]
            if md:
                cmd.append("-" + md)
            if utf8:
                cmd.append("-utf8")
            if "+" in subj:
                cmd.append("-multivalue-rdn")
            for e in exts:
                cmd += ["-addext", e]
            subprocess.run(cmd, check=True, capture_output=True)
            with open(der, "rb") as f:
                write(t, name, f.read())

        ec = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
        rsa = ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]
        cert("ec_client_all_sans", ec, "/O=Acme, Inc./OU=DBA/CN=alice",
             ["subjectAltName=DNS:db.example.com,email:alice@example.com,"
              "URI:spiffe://prod.example.org/ns/app/sa/web,IP:10.1.2.3,IP:2001:db8::1"])
        cert("rsa_sha384", rsa, "/C=DE/ST=Berlin/L=Berlin/O=Org/CN=bob/emailAddress=bob@example.org",
             md="sha384")
        cert("ed25519_multivalue_rdn", ["-algorithm", "ED25519"], "/DC=org/DC=example/UID=u1+CN=multi")
        cert("ec_utf8_cn_escapes", ec, "/CN=José, \"q\"+x;y<z>#/OU= lead and trail ", utf8=True)
        cert("ec_wildcard_cn_no_san", ec, "/CN=*.example.com")
    finally:
        shutil.rmtree(tmp)


def auth_exchange():
    t = "auth_exchange"

    def seed(flags, backend, client):
        return bytes([flags, 0]) + struct.pack(">H", len(backend)) + backend + client

    write(t, "scram", seed(0x10, SASL + SASL_CONTINUE + SASL_FINAL + AUTH_OK + PARAMS + KEY + READY,
                           CLIENT_FIRST + CLIENT_FINAL))
    write(t, "scram_plus_over_tls", seed(0x18, SASL_PLUS + SASL_CONTINUE, CLIENT_FIRST_PLUS))
    write(t, "scram_plain_over_tls", seed(0x18, SASL_PLUS + SASL_CONTINUE + SASL_FINAL + AUTH_OK + KEY
                                          + READY, CLIENT_FIRST + CLIENT_FINAL))
    write(t, "md5_with_surplus", seed(0x10, MD5 + AUTH_OK + KEY + READY + msg(b"T", b"\0\0"),
                                      MD5_ANSWER))
    write(t, "password_refused", seed(0x10, CLEARTEXT + ERROR, PASSWORD))
    write(t, "trust_chunked_pending", bytes([0x15, 0x33]) + struct.pack(">H", len(AUTH_OK + PARAMS + KEY + READY))
          + AUTH_OK + PARAMS + KEY + READY)
    write(t, "client_terminates", seed(0x30, CLEARTEXT, msg(b"X")))
    write(t, "client_sends_query", seed(0x10, CLEARTEXT, msg(b"Q", b"select 1\0")))
    write(t, "scram_no_final_answer_stalls", seed(0x10, SASL + SASL_CONTINUE + SASL_FINAL + AUTH_OK + KEY + READY,
                                                  CLIENT_FIRST))
    write(t, "scram_ungated_client_closes", seed(0x20, SASL + SASL_CONTINUE + SASL_FINAL + AUTH_OK + KEY + READY,
                                                CLIENT_FIRST + CLIENT_FINAL))


def backend_login():
    t = "backend_login"
    secret, tls, verified = 0x08, 0x10, 0x20
    write(t, "trust", bytes([0, 0]) + AUTH_OK + PARAMS + READY)
    write(t, "cleartext_verified", bytes([secret | tls | verified, 0]) + CLEARTEXT + AUTH_OK)
    write(t, "cleartext_unverified", bytes([secret, 0]) + CLEARTEXT + AUTH_OK)
    write(t, "md5_verified", bytes([secret | verified, 0]) + MD5 + AUTH_OK)
    write(t, "scram", bytes([secret, 0]) + SASL + SASL_CONTINUE + SASL_FINAL + AUTH_OK)
    write(t, "scram_plus_tls", bytes([secret | tls, 0]) + SASL_PLUS + SASL_CONTINUE + SASL_FINAL + AUTH_OK)
    write(t, "no_credential", bytes([0, 0]) + SASL)
    write(t, "refused", bytes([secret, 0]) + ERROR)
    write(t, "gss_unsupported", bytes([secret, 0]) + auth(7))
    write(t, "continue_without_sasl", bytes([secret, 0]) + SASL_CONTINUE)
    write(t, "chunked_pending", bytes([0x2d, 0x44]) + MD5 + AUTH_OK)
    write(t, "scram_huge_iterations", bytes([secret, 0]) + SASL
          + auth(11, b"r=clientnonceSERVERNONCE,s=c2FsdHNhbHQ=,i=2000000000"))


def negotiate():
    t = "negotiate"
    tls, plain = 0x01, 0x02
    startup = packet(startup_body(196608, [(b"user", b"alice"), (b"database", b"db")]))
    ssl = packet(i32(SSL_REQUEST_CODE))
    gss = packet(i32(GSSENC_REQUEST_CODE))
    cancel = packet(i32(CANCEL_REQUEST_CODE) + i32(7) + b"\x01\x02\x03\x04")
    write(t, "plaintext_allowed", bytes([plain]) + startup)
    write(t, "plaintext_refused", bytes([tls]) + startup)
    write(t, "ssl_request_alone", bytes([tls]) + ssl)
    write(t, "ssl_request_early_data", bytes([tls]) + ssl + startup)
    write(t, "ssl_without_tls_then_startup", bytes([plain]) + ssl + startup)
    write(t, "gssenc_then_ssl", bytes([tls]) + gss + ssl)
    write(t, "gssenc_twice", bytes([tls | plain]) + gss + gss)
    write(t, "cancel", bytes([tls]) + cancel)
    write(t, "oversized", bytes([tls]) + i32(10_005))
    write(t, "protocol_2", bytes([plain]) + packet(startup_body(2 << 16, [(b"user", b"a")])))
    write(t, "client_hello_prefix", bytes([tls]) + b"\x16\x03\x01\x00\x2a\x01\x00\x00\x26\x03\x03" + bytes(32))


def scram():
    t = "scram"
    def seed(flags, first, second):
        return bytes([flags, len(first)]) + first + second
    final = b"c=biws,r={NONCE},p=" + b"A" * 43 + b"="
    write(t, "plain", seed(0, b"n,,n=,r=abcdefghij", final))
    write(t, "plus", seed(3, b"p=tls-server-end-point,,n=,r=abcdefghij",
                           b"c=cD10bHMtc2VydmVyLWVuZC1wb2ludCwsBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=,r={NONCE},p=" + b"A" * 43 + b"="))
    write(t, "downgrade", seed(1, b"y,,n=,r=abcdefghij", final))
    write(t, "mock", seed(4, b"n,,n=,r=abcdefghij", b"c=biws,r={NONCE},x=ext,p=" + b"A" * 43 + b"="))
    write(t, "authzid", seed(0, b"n,a=bob,n=,r=abc", final))
    write(t, "server_first", seed(0, b"r={NONCE}xyz,s=MDEyMzQ1Njc4OWFiY2RlZg==,i=4096", b"v=" + b"A" * 43 + b"="))
    write(t, "server_first_other_salt", seed(0, b"r={NONCE}xyz,s=c2FsdA==,i=4096", b"e=invalid-proof"))


if __name__ == "__main__":
    for target in ["startup_packet", "message_reader", "relay_framer", "identity", "auth_exchange",
                   "backend_login", "negotiate", "scram"]:
        shutil.rmtree(os.path.join(CORPUS, target), ignore_errors=True)
        globals()[target]()
    for target in sorted(os.listdir(CORPUS)):
        files = os.listdir(os.path.join(CORPUS, target))
        size = sum(os.path.getsize(os.path.join(CORPUS, target, f)) for f in files)
        print(f"corpus/{target}: {len(files)} seeds, {size} bytes")
