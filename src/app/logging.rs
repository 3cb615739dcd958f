//! Logging: the tracing subscriber (text or JSON on stderr), with a
//! filter that a reload can change.

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

use super::reload::LogReloader;

/// Installs the subscriber; returns how to change its filter on reload.
pub fn init(c: &Config) -> LogReloader {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{reload, Layer};
    let wanted = std::env::var("RUST_LOG").unwrap_or_else(|_| c.log.level.clone());
    let filter = EnvFilter::try_new(&wanted).unwrap_or_else(|e| {
        eprintln!("pg-tls-proxy: log filter {wanted:?} is invalid ({e}); using \"info\"");
        EnvFilter::new("info")
    });
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match c.log.format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(fmt.json().with_filter(filter))
            .init(),
        LogFormat::Text => tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .init(),
    }
    Box::new(move |level: &str| {
        let next = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(next).map_err(|e| e.to_string())
    })
}
