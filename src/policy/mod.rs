//! Decisions, not I/O: who a client certificate says the client is
//! ([`identity`]), which roles and databases that identity may use
//! ([`rolemap`]), the proxy's cancel keys ([`cancel`]) and SCRAM
//! ([`scram`]). No sockets and
//! no async runtime here, so every rule is a plain unit test.

pub mod cancel;
pub mod identity;
pub mod rolemap;
pub mod scram;
