//! Which route a connection takes. During the handshake, the ClientHello's
//! server name selects a route and its certificate ([`Certificates`] for
//! the runtime); a client without a server name gets the default route's
//! certificate and its route is chosen after the startup: the route named
//! in `options` (`-c pgtls.route=NAME`), else the first route whose
//! database patterns match, else the default route (when
//! `routing.default` allows it). A server name always wins; an `options`
//! route that differs from it is refused.

use std::sync::Arc;

use super::error::RouteError;
use super::negotiate::{Certificates, Selected};
use crate::config::DEFAULT_ROUTE;
use crate::runtime::{Route, Runtime};

impl Certificates for Runtime {
    fn select(&self, server_name: Option<&str>) -> Option<Selected> {
        let default = || {
            self.default.tls.clone().map(|config| Selected {
                config,
                route: None,
            })
        };
        let Some(name) = server_name else {
            return default();
        };
        match self.routes.for_server_name(name) {
            Some(route) => route.tls.clone().map(|config| Selected {
                config,
                route: Some(route.clone()),
            }),
            None if self.routing_default || self.routes.is_empty() => default(),
            None => None,
        }
    }
}

/// How the route was chosen (the `selected_by` label).
pub(super) type SelectedBy = &'static str;

/// The route of a session, from what its handshake chose (`by_name`), the
/// route named in options and the database.
pub(super) fn after_startup(
    rt: &Runtime,
    by_name: Option<&Arc<Route>>,
    named: Option<String>,
    database: &str,
) -> Result<(Arc<Route>, SelectedBy), RouteError> {
    if let Some(route) = by_name {
        return match named {
            Some(n) if n != route.name => Err(RouteError::Mismatch {
                named: n,
                sni: route.name.clone(),
            }),
            _ => Ok((route.clone(), "server_name")),
        };
    }
    let default = (rt.routing_default || rt.routes.is_empty()).then(|| rt.default.clone());
    if let Some(n) = named {
        let route = match n.as_str() {
            DEFAULT_ROUTE => default.ok_or(RouteError::DefaultOff)?,
            _ => rt.routes.by_name(&n).cloned().ok_or(RouteError::Unknown(n))?,
        };
        if route.own_client_auth {
            return Err(RouteError::NeedsServerName(route.name.clone()));
        }
        return Ok((route, "options"));
    }
    if let Some(route) = rt.routes.for_database(database) {
        if !route.own_client_auth {
            return Ok((route.clone(), "database"));
        }
    }
    default
        .map(|r| (r, "default"))
        .ok_or(RouteError::NoRoute)
}
