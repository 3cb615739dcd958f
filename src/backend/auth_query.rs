//! `[scram.auth_query]`: verifiers looked up in PostgreSQL on demand, for
//! users the auth_file does not list. The lookup runs on a dedicated link
//! (its own TLS settings, its own low-privilege role, a startup packet of
//! its own: nothing of any client's startup is forwarded), as a
//! parameterized query (the user name is `$1`, never pasted into the
//! text). Results, found or not, are cached with a TTL in a bounded map,
//! so that a login storm does not become a query storm. One lookup runs at
//! a time on the one link; a broken link is replaced on the next lookup.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWriteExt;
use tracing::warn;

use super::login::{self, LoginError, Secret};
use super::{BackendError, Connector, Purpose};
use crate::config::{self, SslMode};
use crate::policy::scram::Verifier;
use crate::wire::packet::encode_startup;
use crate::wire::stream::BackendStream;
use crate::wire::{MessageReader, ReadError, MAX_AUTH_PHASE_MESSAGE};

/// Why a lookup failed (the client is refused; the log says why).
#[derive(Debug, thiserror::Error)]
pub enum AuthQueryError {
    #[error("auth_query link: {0}")]
    Link(#[from] BackendError),
    #[error("auth_query login as {user:?}: {source}")]
    Login { user: String, source: LoginError },
    #[error("auth_query: {0}")]
    Query(String),
    #[error("auth_query i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("auth_query took longer than {0:?}")]
    Timeout(Duration),
}

impl From<ReadError> for AuthQueryError {
    fn from(e: ReadError) -> Self {
        AuthQueryError::Query(format!("reading the answer: {e}"))
    }
}

/// Where a verifier came from, for `pgtls_auth_query_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Query,
}

struct Entry {
    verifier: Option<Verifier>,
    until: Instant,
}

struct Link {
    stream: BackendStream,
    reader: MessageReader,
}

pub struct AuthQuery {
    connector: Connector,
    user: String,
    secret: Option<Secret>,
    database: String,
    query: String,
    verified_link: bool,
    cache_ttl: Duration,
    miss_ttl: Duration,
    max_cached: usize,
    cache: Mutex<HashMap<String, Entry>>,
    link: tokio::sync::Mutex<Option<Link>>,
}

impl AuthQuery {
    pub fn new(
        q: &config::AuthQuery,
        default_link: &config::Backend,
        secret: Option<Secret>,
    ) -> Result<AuthQuery, crate::tls::pem::FileError> {
        let link = q.link.as_ref().unwrap_or(default_link);
        Ok(AuthQuery {
            connector: Connector::new(link)?,
            user: q.user.clone(),
            secret,
            database: q.database.clone(),
            query: q.query.clone(),
            verified_link: matches!(link.sslmode, SslMode::VerifyCa | SslMode::VerifyFull),
            cache_ttl: q.cache_ttl,
            miss_ttl: q.miss_ttl,
            max_cached: q.max_cached,
            cache: Mutex::new(HashMap::new()),
            link: tokio::sync::Mutex::new(None),
        })
    }

    /// The user's verifier (`None`: no such user, NOLOGIN, expired, or no
    /// SCRAM verifier), from the cache or the backend.
    pub async fn lookup(&self, user: &str, within: Duration) -> Result<(Option<Verifier>, Source), AuthQueryError> {
        if let Some(hit) = self.cached(user) {
            return Ok((hit, Source::Cache));
        }
        let verifier = tokio::time::timeout(within, self.query(user))
            .await
            .map_err(|_| AuthQueryError::Timeout(within))??;
        self.remember(user, verifier.clone());
        Ok((verifier, Source::Query))
    }

    /// Drops a cached verifier the backend no longer agrees with.
    pub fn forget(&self, user: &str) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).remove(user);
    }

    fn cached(&self, user: &str) -> Option<Option<Verifier>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(user)
            .filter(|e| e.until > Instant::now())
            .map(|e| e.verifier.clone())
    }

    fn remember(&self, user: &str, verifier: Option<Verifier>) {
        let now = Instant::now();
        let ttl = if verifier.is_some() { self.cache_ttl } else { self.miss_ttl };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= self.max_cached && !cache.contains_key(user) {
            cache.retain(|_, e| e.until > now);
            if cache.len() >= self.max_cached {
                // Still full of live entries: make room for the newest.
                if let Some(k) = cache.keys().next().cloned() {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(user.to_string(), Entry { verifier, until: now + ttl });
    }

    /// One lookup on the link, reconnecting once if the kept link broke.
    async fn query(&self, user: &str) -> Result<Option<Verifier>, AuthQueryError> {
        let mut slot = self.link.lock().await;
        for attempt in 0..2 {
            if slot.is_none() {
                *slot = Some(self.connect().await?);
            }
            let Some(link) = slot.as_mut() else { continue };
            match self.run(link, user).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    *slot = None;
                    if attempt == 1 {
                        return Err(e);
                    }
                }
            }
        }
        Err(AuthQueryError::Query("no link".into()))
    }

    async fn connect(&self) -> Result<Link, AuthQueryError> {
        let mut stream = self.connector.connect(Purpose::ProxyLogin).await?;
        let startup = encode_startup(
            196608,
            &[
                ("user", self.user.as_str()),
                ("database", self.database.as_str()),
                ("application_name", "pg-tls-proxy auth_query"),
            ],
        );
        stream.write_all(&startup).await?;
        let mut reader = MessageReader::new(MAX_AUTH_PHASE_MESSAGE);
        let end_point = stream.peer_leaf().and_then(crate::tls::end_point);
        login::login(&mut reader, &mut stream, &self.user, self.secret.as_ref(), end_point, self.verified_link)
            .await
            .map_err(|source| AuthQueryError::Login {
                user: self.user.clone(),
                source,
            })?;
        // ParameterStatus, BackendKeyData, ReadyForQuery.
        loop {
            let f = reader.next(&mut stream).await?;
            match f.tag() {
                b'Z' => return Ok(Link { stream, reader }),
                b'E' => return Err(AuthQueryError::Query(error_text(f.body()))),
                _ => {}
            }
        }
    }

    async fn run(&self, link: &mut Link, user: &str) -> Result<Option<Verifier>, AuthQueryError> {
        link.stream.write_all(&extended_query(&self.query, user)).await?;
        let mut found: Option<Option<String>> = None;
        let mut error = None;
        loop {
            let f = link.reader.next(&mut link.stream).await?;
            match f.tag() {
                b'D' if found.is_none() => found = Some(second_column(f.body())?),
                b'E' => error = Some(error_text(f.body())),
                b'Z' => break,
                _ => {}
            }
        }
        if let Some(e) = error {
            return Err(AuthQueryError::Query(e));
        }
        Ok(match found.flatten() {
            None => None,
            Some(text) => match text.parse::<Verifier>() {
                Ok(v) => Some(v),
                Err(e) => {
                    warn!(user, "auth_query returned a password that is not usable: {e}");
                    None
                }
            },
        })
    }
}

/// Parse, Bind (`$1` = the user, text), Execute, Sync.
fn extended_query(query: &str, user: &str) -> BytesMut {
    let mut out = BytesMut::new();
    let mut msg = |tag: u8, body: &[u8]| {
        out.put_u8(tag);
        out.put_i32(body.len() as i32 + 4);
        out.put_slice(body);
    };
    let mut parse = Vec::new();
    parse.push(0); // unnamed statement
    parse.extend_from_slice(query.as_bytes());
    parse.push(0);
    parse.extend_from_slice(&0i16.to_be_bytes());
    msg(b'P', &parse);
    let mut bind = vec![0, 0]; // unnamed portal, unnamed statement
    bind.extend_from_slice(&0i16.to_be_bytes()); // parameters in text
    bind.extend_from_slice(&1i16.to_be_bytes());
    bind.extend_from_slice(&(user.len() as i32).to_be_bytes());
    bind.extend_from_slice(user.as_bytes());
    bind.extend_from_slice(&0i16.to_be_bytes()); // results in text
    msg(b'B', &bind);
    msg(b'E', &[0, 0, 0, 0, 0]);
    msg(b'S', &[]);
    out
}

/// The second column of a DataRow; `None` for NULL.
fn second_column(body: &[u8]) -> Result<Option<String>, AuthQueryError> {
    let bad = || AuthQueryError::Query("the query must return (name, verifier)".into());
    let n = i16::from_be_bytes([*body.first().ok_or_else(bad)?, *body.get(1).ok_or_else(bad)?]);
    if n < 2 {
        return Err(bad());
    }
    let mut rest = &body[2..];
    for col in 0..2 {
        let len = i32::from_be_bytes(rest.get(..4).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
        rest = &rest[4..];
        let value = if len < 0 {
            None
        } else {
            let v = rest.get(..len as usize).ok_or_else(bad)?;
            rest = &rest[len as usize..];
            Some(String::from_utf8_lossy(v).into_owned())
        };
        if col == 1 {
            return Ok(value);
        }
    }
    Err(bad())
}

/// The message field of an ErrorResponse.
fn error_text(body: &[u8]) -> String {
    body.split(|&b| b == 0)
        .find(|f| f.first() == Some(&b'M'))
        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
        .unwrap_or_else(|| "error".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_rows_and_bind() {
        let mut row = 2i16.to_be_bytes().to_vec();
        row.extend_from_slice(&5i32.to_be_bytes());
        row.extend_from_slice(b"alice");
        row.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(second_column(&row).expect("row"), None);
        let mut row = 2i16.to_be_bytes().to_vec();
        row.extend_from_slice(&1i32.to_be_bytes());
        row.extend_from_slice(b"a");
        row.extend_from_slice(&3i32.to_be_bytes());
        row.extend_from_slice(b"xyz");
        assert_eq!(second_column(&row).expect("row").as_deref(), Some("xyz"));
        assert!(second_column(&row[..6]).is_err());
        assert!(second_column(&[0, 1, 0, 0, 0, 0]).is_err());
        let q = extended_query("SELECT $1", "o'brien");
        assert_eq!(q[0], b'P');
        assert!(q.windows(7).any(|w| w == b"o'brien"), "sent as a parameter, verbatim");
        assert!(q.ends_with(b"S\0\0\0\x04"));
    }
}
