//! After the startup message, until ReadyForQuery reached the client: the
//! route, the access decision, SCRAM with the client when the proxy
//! terminates it, the backend link and the login. What comes out is only
//! what the relay needs ([`Established`]); everything else is dropped
//! here.

use tokio::time::Instant;
use tracing::info;

use super::authorize::{authorize, Access};
use super::error::{self, SessionError};
use super::login::{self, LinkedBackend, Login, Surplus};
use super::negotiate::Failed;
use super::record::{CloseReason, SessionRecord};
use super::{route, scram, Conn};
use crate::backend::cancel::CancelTarget;
use crate::config::BackendAuth;
use crate::wire::stream::ClientStream;
use crate::wire::StartupPacket;

/// A logged-in session, ready to relay: only what the relay needs.
pub(super) struct Established {
    /// The cancel key stays valid exactly as long as this is held. First,
    /// so it is dropped before the sockets close.
    pub(super) _registration: Option<crate::policy::cancel::Registration<CancelTarget>>,
    pub(super) client: ClientStream,
    pub(super) backend: LinkedBackend,
    pub(super) surplus: Surplus,
}

/// Access decision and backend login, until ReadyForQuery reached the
/// client; `Err` is a login that ended without a session.
pub(super) async fn establish(
    mut client: ClientStream,
    mut startup: StartupPacket,
    conn: &Conn<'_>,
    deadline: Instant,
    record: &mut SessionRecord,
) -> Result<Result<Established, CloseReason>, Failed> {
    let rt = conn.rt;
    let fail = |error, stream| {
        Err(Failed {
            error,
            stream: Some(stream),
        })
    };
    // The backend never sees the route option.
    let named_route = startup.take_route();
    let (user, database, replication) = match startup.effective_names() {
        Ok(n) => (n.user, n.database, n.replication),
        Err(e) => return fail(e.into(), client),
    };
    let span = tracing::Span::current();
    span.record("user", user.as_str());
    span.record("database", database.as_str());
    record.user = Some(user.clone());
    record.database = Some(database.clone());
    record.protocol_minor = Some(startup.client_minor());
    let by_name = record.tls.as_ref().and_then(|t| t.route.clone());
    let (route, selected_by) =
        match route::after_startup(rt, by_name.as_ref(), named_route, &database) {
            Ok(r) => r,
            Err(e) => return fail(SessionError::Route(e), client),
        };
    record.set_route(&route, selected_by);
    let served = by_name.as_deref().unwrap_or(&rt.default);
    let conn = &Conn {
        route: &route,
        served,
        ..*conn
    };
    let access = authorize(
        conn.route,
        &conn.ctx.metrics,
        &client,
        &user,
        &database,
        replication,
    );
    let password_client = matches!(access, Ok(Access::Password));
    let backend_auth = match access {
        Ok(Access::Password) => BackendAuth::Passthrough,
        Ok(Access::Certificate {
            identity,
            backend_auth,
        }) => {
            span.record("client_identity", identity.as_str());
            record.identity = Some(identity);
            backend_auth
        }
        Err(e) => {
            if let SessionError::RoleDenied { identity, .. } = &e {
                record.identity = Some(identity.clone());
            }
            return fail(e, client);
        }
    };
    record.backend_auth = Some(backend_auth);
    // A password client (no certificate a rule allowed) of a terminating
    // proxy proves its password here, before any backend link is opened
    // for it. Certificate clients keep their rule's way in.
    let (proved, deadline) = match &rt.scram {
        Some(setup) if password_client => {
            let leg = scram::client_leg(conn, setup, &mut client, &user);
            match tokio::time::timeout(rt.auth_timeout, Box::pin(leg)).await {
                Ok(Ok(p)) => (Some(p), Instant::now() + rt.handshake_timeout),
                Ok(Err(e)) => return fail(e, client),
                Err(_) => return fail(SessionError::Timeout(error::Phase::Authentication), client),
            }
        }
        _ => (None, deadline),
    };
    let client_method = proved.as_ref().map(|p| p.method());
    let link = match Box::pin(login::reach_backend(conn, deadline, backend_auth, &startup)).await {
        Ok(link) => link,
        Err(e) => return fail(e, client),
    };
    if let Err(error) = Box::pin(login::negotiate_version(&mut client, &startup)).await {
        return Err(Failed {
            error,
            stream: None,
        });
    }
    // The client gets the backend's pid and a secret of ours; the
    // backend's own secret stays in the registry,
    // for exactly as long as this session.
    let mut registration = None;
    // A 3.2 client gets a 32-byte secret (the backend speaks 3.0).
    let long_key = startup.long_cancel_key();
    let mut issue_key = |backend_pid: i32, backend_secret: [u8; 4]| {
        let target = CancelTarget {
            backend_pid,
            backend_secret,
            connector: conn.route.connector.clone(),
        };
        let (key, guard) = conn.ctx.cancels.register(backend_pid, target, long_key);
        registration = Some(guard);
        key
    };
    let (backend, surplus) =
        match Box::pin(login::log_in(conn, &mut client, link, &user, proved, &mut issue_key)).await {
            Login::Ready {
                backend,
                surplus,
                method,
            } => {
                record.backend_login = method;
                (backend, surplus)
            }
            Login::Ended(reason) => return Ok(Err(reason)),
            Login::Failed(error) => return fail(error, client),
        };
    record.role = Some(user);
    record.client_auth = client_method;
    info!(
        route = conn.route.name.as_str(),
        backend = conn.route.connector.address(),
        sslmode = conn.route.connector.sslmode().as_str(),
        "session established"
    );
    Ok(Ok(Established {
        client,
        backend,
        surplus,
        _registration: registration,
    }))
}
