//! The proxy, started in-process on 127.0.0.1:0 through `app::start`, the
//! same path `main` takes. Each proxy has its own metrics registry.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use pg_tls_proxy::app::{self, DrainReport, Handle};
use pg_tls_proxy::config::{CertKey, Config, SslMode};
use prometheus::Registry;

use super::pki::Pki;

/// A config for tests: client TLS from `pki`, plaintext backend at `backend`.
pub fn config(pki: &Pki, backend: &str) -> Config {
    let mut c = Config::default();
    c.listen.address = "127.0.0.1:0".into();
    c.admin.address = "127.0.0.1:0".into();
    c.tls.server = Some(CertKey {
        cert: pki.server_chain.clone(),
        key: pki.server_key.clone(),
    });
    c.backend.address = backend.into();
    c.backend.connect_timeout = Duration::from_secs(5);
    c.shutdown.grace_period = Duration::from_secs(5);
    c
}

/// Sets a TLS backend link.
pub fn backend_tls(c: &mut Config, mode: SslMode, root: Option<PathBuf>) {
    c.backend.sslmode = mode;
    c.backend.sslrootcert = root;
}

pub struct TestProxy {
    pub addr: SocketAddr,
    pub registry: Registry,
    handle: Option<Handle>,
}

impl TestProxy {
    pub async fn start(config: Config) -> TestProxy {
        config.validate(None).expect("test config is valid");
        let registry = Registry::new();
        let handle = app::start(config, &registry).await.expect("proxy starts");
        TestProxy {
            addr: handle.local_addr(),
            registry,
            handle: Some(handle),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Base URL of the admin listener.
    pub fn admin_url(&self) -> String {
        format!(
            "http://{}",
            self.handle().admin_addr().expect("admin enabled")
        )
    }

    pub fn handle(&self) -> &Handle {
        self.handle.as_ref().expect("running")
    }

    /// Graceful shutdown, as SIGTERM does.
    pub async fn shutdown(mut self) -> DrainReport {
        self.handle.take().expect("running").shutdown().await
    }

    /// The value of one series in the Prometheus text output, e.g.
    /// `pgtls_negotiations_total{path="sslrequest"}` (0 if absent).
    pub fn metric(&self, series: &str) -> f64 {
        use prometheus::Encoder;
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encode metrics");
        let text = String::from_utf8(out).expect("utf-8 metrics");
        text.lines()
            .find_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                (name == series).then(|| value.parse().ok())?
            })
            .unwrap_or(0.0)
    }

    /// [`metric`](Self::metric) once it reads `want`, or its value after
    /// 10 s: a session records how it ended on its own thread, a moment
    /// after its client saw the end.
    pub async fn metric_when(&self, series: &str, want: f64) -> f64 {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let value = self.metric(series);
            if value == want || tokio::time::Instant::now() >= deadline {
                return value;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// [`metric`](Self::metric) once it reads at least `min`, or its value
    /// after 10 s (for counts that grow by more than one step).
    pub async fn metric_at_least(&self, series: &str, min: f64) -> f64 {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let value = self.metric(series);
            if value >= min || tokio::time::Instant::now() >= deadline {
                return value;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            // Best effort: close listeners and sessions without waiting.
            tokio::spawn(handle.abort());
        }
    }
}

/// Requests client certificates signed by `pki` (its root; the
/// intermediate is sent by clients in their chain) and installs `rules`,
/// given as TOML `[[rules]]` tables.
pub fn mtls(c: &mut Config, pki: &Pki, mode: pg_tls_proxy::config::ClientAuthMode, rules: &str) {
    c.client_auth.mode = Some(mode);
    c.client_auth.ca = vec![pki.root_cert.clone()];
    c.rules = parse_rules(rules);
}

pub fn parse_rules(text: &str) -> Vec<pg_tls_proxy::config::RuleConfig> {
    #[derive(serde::Deserialize)]
    struct Rules {
        #[serde(default)]
        rules: Vec<pg_tls_proxy::config::RuleConfig>,
    }
    use figment::providers::Format;
    let parsed: Rules = figment::Figment::from(figment::providers::Toml::string(text))
        .extract()
        .expect("rules TOML");
    parsed.rules
}

impl TestProxy {
    /// Starts from a config file, as `main` does, so that `reload()` (and
    /// POST /reload) re-read that file.
    pub async fn start_from_file(path: &std::path::Path) -> TestProxy {
        let config = Config::load(Some(path)).expect("config file");
        let registry = Registry::new();
        let prepared = app::prepare(config, &registry).expect("prepare");
        let source = app::ReloadSource {
            path: Some(path.to_path_buf()),
            log: None,
        };
        let handle = app::serve(prepared, &registry, source)
            .await
            .expect("serve");
        TestProxy {
            addr: handle.local_addr(),
            registry,
            handle: Some(handle),
        }
    }
}

/// A TOML config file for `pki`'s server certificate (the paths given) in
/// front of `backend`, with listeners on port 0, plus `extra` TOML.
pub fn config_file(
    dir: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    backend: &str,
    extra: &str,
) -> PathBuf {
    let text = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n[admin]\naddress = \"127.0.0.1:0\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[backend]\naddress = \"{backend}\"\n{extra}",
        cert.display(),
        key.display()
    );
    super::write_file(&dir.join("proxy.toml"), &text, 0o644, false)
}

/// A spawned binary, killed (and reaped) when dropped, so that a failing
/// test leaves no process behind.
pub struct Spawned(std::process::Child);

impl std::ops::Deref for Spawned {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The real binary, spawned from `cmd` (which runs it) with stderr piped
/// and stdout discarded: the child and a channel that receives each log
/// line.
pub fn spawn_logged(
    cmd: &mut std::process::Command,
) -> (Spawned, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn proxy");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    (Spawned(child), rx)
}

/// The first `127.0.0.1:PORT` in a log line (text or JSON): where a binary
/// started on port 0 is listening.
pub fn logged_addr(line: &str) -> std::net::SocketAddr {
    let at = line.find("127.0.0.1:").expect("an address in the line");
    let rest = &line[at..];
    let end = rest
        .char_indices()
        .skip("127.0.0.1:".len())
        .find(|(_, c)| !c.is_ascii_digit())
        .map_or(rest.len(), |(i, _)| i);
    rest[..end].parse().expect("an address")
}
