//! Idle TLS sessions at scale: the proxy's RSS with 1k, 5k, ... sessions
//! open and idle, and the KiB each one costs.
//!
//! PostgreSQL cannot hold tens of thousands of backends on one small
//! machine, so the backend here is a stand-in (this same program, run as a
//! child process): it answers each StartupMessage with AuthenticationOk,
//! BackendKeyData and ReadyForQuery, then holds the connection. The proxy
//! is the real release binary, with its default settings apart from the
//! addresses and `limits.max_connections`; clients are rustls over
//! SSLRequest, each ending at ReadyForQuery and then silent.
//!
//!     cargo bench --bench idle_sessions                       # 1000,5000,9000
//!     SESSIONS=1000,20000,50000 cargo bench --bench idle_sessions
//!     PROXY=/path/to/pg-tls-proxy cargo bench --bench idle_sessions
//!
//! It ends with the CPU the proxy spent over 10 s with every session
//! open and idle (utime + stime from /proc): an idle session should cost
//! none.
//!
//! Each session holds two descriptors in the proxy (client and backend),
//! so the largest count is bounded by RLIMIT_NOFILE: 50,000 sessions need
//! a hard limit of at least 100,128 plus 2 per session thread for the
//! proxy (systemd `LimitNOFILE=`),
//! and this program needs 50,000 for the clients, as does the stand-in.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const STAND_IN: &str = "--stand-in-backend";

fn main() {
    if std::env::args().any(|a| a == STAND_IN) {
        return stand_in();
    }
    let counts: Vec<usize> = std::env::var("SESSIONS")
        .unwrap_or_else(|_| "1000,5000,9000".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let max = counts.iter().copied().max().unwrap_or(0);
    let proxy_bin = std::env::var("PROXY").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/pg-tls-proxy").into()
    });
    let fd_hard = raise_nofile();
    if (max as u64) + 64 > fd_hard {
        eprintln!(
            "idle_sessions: {max} sessions need {} descriptors here, RLIMIT_NOFILE allows {fd_hard}",
            max + 64
        );
        std::process::exit(1);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ok = Command::new(&proxy_bin)
        .args(["dev-certs", "--out"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .status()
        .expect("run pg-tls-proxy dev-certs");
    assert!(ok.success(), "dev-certs failed");

    let (mut backend, backend_addr) = start_stand_in();
    let listen = free_port();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\naddress = \"{listen}\"\n\
             [tls]\ncert = \"{d}/server.crt\"\nkey = \"{d}/server.key\"\n\
             [backend]\naddress = \"{backend_addr}\"\nsslmode = \"disable\"\n\
             [admin]\nenabled = false\n\
             [log]\nlevel = \"warn\"\n\
             [limits]\nmax_connections = {max}\n",
            d = dir.path().display()
        ),
    )
    .expect("config");
    let mut proxy = Command::new(&proxy_bin)
        .arg("--config")
        .arg(&config)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the proxy");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ca = CertificateDer::from_pem_file(dir.path().join("ca.crt")).expect("ca.crt");
    let result = rt.block_on(measure(proxy.id(), listen, ca, &counts));

    // The proxy goes first: clients closing now would only fill its log.
    stop(&mut proxy);
    let _ = backend.kill();
    let _ = backend.wait();
    match result {
        Ok((rows, idle_cpu, open)) => {
            drop(open);
            report(&proxy_bin, &rows, idle_cpu)
        }
        Err(e) => {
            eprintln!("idle_sessions: {e}");
            std::process::exit(1);
        }
    }
}

struct Row {
    sessions: usize,
    rss_kib: u64,
    before_kib: u64,
    took: Duration,
}

/// CPU the proxy spent while every session sat idle: (sessions, ms per s).
type IdleCpu = Option<(usize, f64)>;

async fn measure(
    pid: u32,
    addr: SocketAddr,
    ca: CertificateDer<'static>,
    counts: &[usize],
) -> Result<(Vec<Row>, IdleCpu, Vec<Session>), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            return Err("the proxy did not start listening".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_kib = rss_kib(pid);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).map_err(|e| e.to_string())?;
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let connector = tokio_rustls::TlsConnector::from(tls);
    let mut open = Vec::new();
    let mut rows = Vec::new();
    let mut sorted = counts.to_vec();
    sorted.sort_unstable();
    for &n in &sorted {
        let started = Instant::now();
        while open.len() < n {
            let batch = (n - open.len()).min(64);
            let mut tasks = Vec::with_capacity(batch);
            for _ in 0..batch {
                tasks.push(tokio::spawn(session(connector.clone(), addr)));
            }
            for t in tasks {
                open.push(t.await.map_err(|e| e.to_string())??);
            }
        }
        // Let the proxy settle (handshake buffers freed, allocator quiet).
        tokio::time::sleep(Duration::from_secs(2)).await;
        rows.push(Row {
            sessions: n,
            rss_kib: rss_kib(pid),
            before_kib,
            took: started.elapsed(),
        });
    }
    // Idle sessions should cost no CPU: nothing to read, no timer due.
    let window = Duration::from_secs(IDLE_WINDOW_S);
    let before = cpu_ms(pid);
    tokio::time::sleep(window).await;
    let idle_cpu = Some((open.len(), (cpu_ms(pid) - before) / window.as_secs_f64()));
    Ok((rows, idle_cpu, open))
}

const IDLE_WINDOW_S: u64 = 10;

/// utime + stime of `pid`, in ms.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 * 1000.0 / hz
}

type Session = tokio_rustls::client::TlsStream<TcpStream>;

/// SSLRequest, TLS 1.3, StartupMessage, then read until ReadyForQuery.
async fn session(
    connector: tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> Result<Session, String> {
    let mut tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .map_err(|e| e.to_string())?;
    let mut s = [0u8];
    tcp.read_exact(&mut s).await.map_err(|e| e.to_string())?;
    if s[0] != b'S' {
        return Err(format!("SSLRequest answered {:?}", s[0] as char));
    }
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut startup = Vec::new();
    startup.extend_from_slice(&[0, 0, 0, 0, 0, 3, 0, 0]);
    for kv in ["user", "bench", "database", "bench"] {
        startup.extend_from_slice(kv.as_bytes());
        startup.push(0);
    }
    startup.push(0);
    let len = startup.len() as u32;
    startup[..4].copy_from_slice(&len.to_be_bytes());
    tls.write_all(&startup).await.map_err(|e| e.to_string())?;
    loop {
        let tag = tls.read_u8().await.map_err(|e| e.to_string())?;
        let len = tls.read_u32().await.map_err(|e| e.to_string())?;
        let mut body = vec![0; len.saturating_sub(4) as usize];
        tls.read_exact(&mut body).await.map_err(|e| e.to_string())?;
        match tag {
            b'Z' => return Ok(tls),
            b'E' => return Err(format!("error: {}", String::from_utf8_lossy(&body))),
            _ => {}
        }
    }
}

fn report(proxy: &str, rows: &[Row], idle_cpu: IdleCpu) {
    println!("proxy: {proxy}");
    println!("| idle TLS sessions | proxy RSS (MiB) | KiB per session (all) | KiB per session (this step) | opened in |");
    println!("|---:|---:|---:|---:|---:|");
    let mut prev: Option<&Row> = None;
    for r in rows {
        let all = (r.rss_kib.saturating_sub(r.before_kib)) as f64 / r.sessions as f64;
        let step = prev.map_or(all, |p| {
            (r.rss_kib as f64 - p.rss_kib as f64) / (r.sessions - p.sessions) as f64
        });
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} s |",
            r.sessions,
            r.rss_kib as f64 / 1024.0,
            all,
            step,
            r.took.as_secs_f64()
        );
        prev = Some(r);
    }
    if let Some(r) = rows.first() {
        println!(
            "before any session: {:.1} MiB",
            r.before_kib as f64 / 1024.0
        );
    }
    if let Some((sessions, ms_per_s)) = idle_cpu {
        println!(
            "proxy CPU with {sessions} idle sessions: {ms_per_s:.1} ms per s (over {IDLE_WINDOW_S} s)"
        );
    }
}

/// SIGINT (the proxy closes its sessions and exits), SIGKILL after 30 s.
fn stop(child: &mut Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// Soft RLIMIT_NOFILE up to the hard limit (children inherit it); returns it.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    lim.rlim_cur
}

fn start_stand_in() -> (Child, SocketAddr) {
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .arg(STAND_IN)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the stand-in backend");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("stand-in address");
    let addr = line.trim().parse().expect("stand-in prints its address");
    (child, addr)
}

/// The stand-in backend: trust login, then silence until the peer closes.
fn stand_in() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        println!("{}", listener.local_addr().expect("addr"));
        let mut pid = 1000u32;
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            pid = pid.wrapping_add(1);
            tokio::spawn(backend_session(tcp, pid));
        }
    });
}

async fn backend_session(mut tcp: TcpStream, pid: u32) {
    let Ok(len) = tcp.read_u32().await else {
        return;
    };
    let mut rest = vec![0; (len as usize).saturating_sub(4).min(10_000)];
    if tcp.read_exact(&mut rest).await.is_err() {
        return;
    }
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0]);
    out.extend_from_slice(&[b'K', 0, 0, 0, 12]);
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(&pid.rotate_left(16).to_be_bytes());
    out.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
    if tcp.write_all(&out).await.is_err() {
        return;
    }
    let mut sink = [0u8; 64];
    while let Ok(n) = tcp.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}
