//! The backend's leg: the proxy as the SCRAM client, proving the
//! ClientKey a client's proof revealed, with its own nonce and its own
//! channel binding to the backend's certificate. The backend's salt and
//! iterations must be the verifier's (the ClientKey is only valid for
//! them): otherwise the exchange stops before any proof is sent. The
//! backend's ServerSignature is checked with the verifier's ServerKey, so
//! a backend that does not know the password cannot pass for one that
//! does.

use base64::Engine;

use super::*;

/// The channel binding for the backend link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// `-PLUS`, bound to the backend certificate's tls-server-end-point.
    Plus(Vec<u8>),
    /// TLS with a binding the proxy could use, but the backend did not
    /// offer `-PLUS`: gs2 flag `y` (RFC 5802), which a backend that does
    /// support it refuses as a downgrade.
    NotOffered,
    /// No TLS (or no defined binding): gs2 flag `n`.
    None,
}

/// Why the backend's leg stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendScramError {
    #[error("the backend's SCRAM parameters (salt, {backend_iterations} iterations) differ from the verifier's ({verifier_iterations} iterations): the password was changed on the server; update the verifier")]
    VerifierMismatch {
        backend_iterations: u32,
        verifier_iterations: u32,
    },
    #[error("malformed SCRAM message from the backend: {0}")]
    Malformed(&'static str),
    #[error("the backend's SCRAM server signature is wrong: it does not hold this role's verifier")]
    BadServerSignature,
    #[error("the backend refused the SCRAM exchange: {0}")]
    ServerError(String),
}

/// One exchange with the backend.
pub struct ClientExchange<'a> {
    key: &'a ClientKey,
    verifier: &'a Verifier,
    gs2_header: String,
    binding_data: Vec<u8>,
    client_nonce: String,
    client_first_bare: String,
    auth: Option<(String, String)>,
}

impl<'a> ClientExchange<'a> {
    /// Starts an exchange; returns it, the mechanism and the
    /// client-first-message for SASLInitialResponse.
    pub fn start(key: &'a ClientKey, verifier: &'a Verifier, binding: Binding) -> (Self, &'static str, String) {
        let (mechanism, gs2_header, binding_data) = match binding {
            Binding::Plus(hash) => (SCRAM_SHA_256_PLUS, format!("p={TLS_SERVER_END_POINT},,"), hash),
            Binding::NotOffered => (SCRAM_SHA_256, "y,,".to_string(), Vec::new()),
            Binding::None => (SCRAM_SHA_256, "n,,".to_string(), Vec::new()),
        };
        let client_nonce = nonce();
        // The user name is the startup's; libpq sends it empty here.
        let client_first_bare = format!("n=,r={client_nonce}");
        let first = format!("{gs2_header}{client_first_bare}");
        (
            ClientExchange {
                key,
                verifier,
                gs2_header,
                binding_data,
                client_nonce,
                client_first_bare,
                auth: None,
            },
            mechanism,
            first,
        )
    }

    /// server-first-message → client-final-message.
    pub fn respond(&mut self, server_first: &[u8]) -> Result<String, BackendScramError> {
        let msg = std::str::from_utf8(server_first).map_err(|_| BackendScramError::Malformed("not UTF-8"))?;
        let malformed = |_| BackendScramError::Malformed("server-first-message");
        let (nonce, rest) = attr(msg, 'r').map_err(malformed)?;
        let (salt, rest) = attr(rest, 's').map_err(malformed)?;
        let (iterations, _) = attr(rest, 'i').map_err(malformed)?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() || !is_printable(nonce) {
            return Err(BackendScramError::Malformed("the server nonce does not extend ours"));
        }
        // RFC 5802 posit-number: no sign, no leading zero.
        if !iterations.starts_with(|c: char| ('1'..='9').contains(&c))
            || !iterations.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(BackendScramError::Malformed("iteration count"));
        }
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| BackendScramError::Malformed("iteration count"))?;
        let salt = B64.decode(salt).map_err(|_| BackendScramError::Malformed("salt"))?;
        if iterations != self.verifier.iterations || !ct_eq(&salt, &self.verifier.salt) {
            return Err(BackendScramError::VerifierMismatch {
                backend_iterations: iterations,
                verifier_iterations: self.verifier.iterations,
            });
        }
        let mut cbind = self.gs2_header.clone().into_bytes();
        cbind.extend_from_slice(&self.binding_data);
        let without_proof = format!("c={},r={nonce}", B64.encode(cbind));
        let signature = auth_hmac(&self.verifier.stored_key, &self.client_first_bare, msg, &without_proof);
        let mut proof = [0u8; 32];
        for (p, (k, s)) in proof.iter_mut().zip(self.key.0.iter().zip(signature)) {
            *p = k ^ s;
        }
        let reply = format!("{without_proof},p={}", B64.encode(proof));
        proof.zeroize();
        self.auth = Some((msg.to_string(), without_proof));
        Ok(reply)
    }

    /// server-final-message: `v=` must be the ServerSignature for this
    /// exchange under the verifier's ServerKey.
    pub fn verify(&self, server_final: &[u8]) -> Result<(), BackendScramError> {
        let msg = std::str::from_utf8(server_final).map_err(|_| BackendScramError::Malformed("not UTF-8"))?;
        if let Ok((error, _)) = attr(msg, 'e') {
            return Err(BackendScramError::ServerError(sanitize(error)));
        }
        let (v, _) = attr(msg, 'v').map_err(|_| BackendScramError::Malformed("server-final-message"))?;
        let (server_first, without_proof) = self
            .auth
            .as_ref()
            .ok_or(BackendScramError::Malformed("server-final-message before server-first-message"))?;
        let expected = auth_hmac(&self.verifier.server_key, &self.client_first_bare, server_first, without_proof);
        let got = B64.decode(v).map_err(|_| BackendScramError::Malformed("server signature"))?;
        if ct_eq(&got, &expected) {
            Ok(())
        } else {
            Err(BackendScramError::BadServerSignature)
        }
    }
}
