//! The client's leg: the proxy as the SCRAM server, checking a client
//! against a stored (or mock) verifier, with PostgreSQL's parser rules:
//! `-PLUS` offered first and only over TLS with a defined channel binding;
//! `y` refused when `-PLUS` was offered (a downgrade); `p` without `-PLUS`
//! and `n` with it malformed; the binding checked against the hash of the
//! certificate this client was served; the SCRAM user name ignored (the
//! startup's counts); `a=` and `m=` refused.

use base64::Engine;

use super::*;

/// How far the exchange got.
enum State {
    Initial,
    FirstSent {
        client_first_bare: String,
        server_first: String,
        /// `c=` the client must send: base64 of gs2 header + binding data.
        expected_binding: String,
        /// Client nonce + our nonce.
        nonce: String,
    },
}

/// One client's exchange.
pub struct ServerExchange {
    verifier: Verifier,
    /// No proof can succeed (unknown user, or no usable verifier).
    doomed: bool,
    /// tls-server-end-point of the certificate this client was served;
    /// `None` on plaintext or when undefined (Ed25519): no `-PLUS` then.
    end_point: Option<Vec<u8>>,
    state: State,
}

/// A client that proved it knows the password.
#[derive(Debug)]
pub struct Verified {
    pub client_key: ClientKey,
    /// The server-final-message (`v=` ServerSignature) to send once the
    /// backend accepted the login.
    pub server_final: String,
    pub plus: bool,
}

/// How the client's final message ended.
#[derive(Debug)]
pub enum Finished {
    Verified(Verified),
    /// Wrong password, or a mock exchange: 28P01.
    Failed,
}

impl ServerExchange {
    /// `verifier` is the user's, or `None` for a mock exchange with `mock`.
    pub fn new(verifier: Option<Verifier>, mock: Verifier, end_point: Option<Vec<u8>>) -> Self {
        let doomed = verifier.is_none();
        ServerExchange {
            verifier: verifier.unwrap_or(mock),
            doomed,
            end_point,
            state: State::Initial,
        }
    }

    /// The mechanisms for AuthenticationSASL, `-PLUS` first when offered.
    pub fn mechanisms(&self) -> &'static [&'static str] {
        if self.end_point.is_some() {
            &[SCRAM_SHA_256_PLUS, SCRAM_SHA_256]
        } else {
            &[SCRAM_SHA_256]
        }
    }

    /// SASLInitialResponse: the mechanism chosen and client-first-message;
    /// returns server-first-message.
    pub fn first(&mut self, mechanism: &str, data: &[u8]) -> Result<String, ScramError> {
        let plus = match mechanism {
            SCRAM_SHA_256 => false,
            SCRAM_SHA_256_PLUS if self.end_point.is_some() => true,
            _ => return Err(ScramError::InvalidMechanism),
        };
        let msg = std::str::from_utf8(data)
            .map_err(|_| ScramError::malformed("The message is not valid UTF-8."))?;
        let mut rest = msg;
        let flag = rest.chars().next().unwrap_or('\0');
        let gs2_flag = match flag {
            'n' | 'y' => {
                if plus {
                    return Err(ScramError::malformed(
                        "The client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include channel binding data.",
                    ));
                }
                if flag == 'y' && self.end_point.is_some() {
                    return Err(ScramError::Downgrade);
                }
                rest = expect_comma(&rest[1..])?;
                if flag == 'n' { "n" } else { "y" }
            }
            'p' => {
                if !plus {
                    return Err(ScramError::malformed(
                        "The client selected SCRAM-SHA-256 without channel binding, but the SCRAM message includes channel binding data.",
                    ));
                }
                let (cb_type, after) = attr(rest, 'p')?;
                if cb_type != TLS_SERVER_END_POINT {
                    return Err(ScramError::BindingType(cb_type.to_string()));
                }
                rest = after;
                "p"
            }
            other => {
                return Err(ScramError::malformed(format!(
                    "Unexpected channel-binding flag \"{}\".",
                    sanitize(&other.to_string())
                )))
            }
        };
        if rest.starts_with('a') {
            return Err(ScramError::AuthzId);
        }
        let client_first_bare = expect_comma(rest)?;
        if client_first_bare.starts_with('m') {
            return Err(ScramError::Extension);
        }
        let (_ignored_user, after_user) = attr(client_first_bare, 'n')?;
        let (client_nonce, _extensions) = attr(after_user, 'r')?;
        if client_nonce.is_empty() || !is_printable(client_nonce) {
            return Err(ScramError::NonPrintableNonce);
        }
        let nonce = format!("{client_nonce}{}", super::nonce());
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        let expected_binding = match (gs2_flag, &self.end_point) {
            ("p", Some(hash)) => {
                let mut input = format!("p={TLS_SERVER_END_POINT},,").into_bytes();
                input.extend_from_slice(hash);
                B64.encode(input)
            }
            ("y", _) => "eSws".to_string(),
            _ => "biws".to_string(),
        };
        self.state = State::FirstSent {
            client_first_bare: client_first_bare.to_string(),
            server_first: server_first.clone(),
            expected_binding,
            nonce,
        };
        Ok(server_first)
    }

    /// SASLResponse: client-final-message. Checks the binding and the
    /// nonce, then the proof.
    pub fn finish(&mut self, data: &[u8]) -> Result<Finished, ScramError> {
        let State::FirstSent {
            client_first_bare,
            server_first,
            expected_binding,
            nonce,
        } = std::mem::replace(&mut self.state, State::Initial)
        else {
            return Err(ScramError::malformed("client-final-message before client-first-message."));
        };
        let msg = std::str::from_utf8(data)
            .map_err(|_| ScramError::malformed("The message is not valid UTF-8."))?;
        let (binding, rest) = attr(msg, 'c')?;
        if binding != expected_binding {
            return Err(if expected_binding.len() > 4 {
                ScramError::BindingCheck
            } else {
                ScramError::BindingAttribute
            });
        }
        let (final_nonce, mut rest) = attr(rest, 'r')?;
        // Extensions are ignored up to the proof, which comes last.
        let proof_at = loop {
            let at = msg.len() - rest.len();
            if rest.starts_with("p=") {
                break at;
            }
            match rest.split_once(',') {
                Some((field, after)) if field.len() >= 2 && field.as_bytes()[1] == b'=' => rest = after,
                _ => return Err(ScramError::malformed("Malformed proof in client-final-message.")),
            }
        };
        let (proof_b64, garbage) = attr(rest, 'p')?;
        if !garbage.is_empty() || msg.ends_with(',') {
            return Err(ScramError::malformed("Garbage found at the end of client-final-message."));
        }
        let proof = B64
            .decode(proof_b64)
            .ok()
            .filter(|p| p.len() == 32)
            .ok_or_else(|| ScramError::malformed("Malformed proof in client-final-message."))?;
        if !ct_eq(final_nonce.as_bytes(), nonce.as_bytes()) {
            return Err(ScramError::malformed("Nonce does not match."));
        }
        let without_proof = &msg[..proof_at - 1];
        let signature = auth_hmac(&self.verifier.stored_key, &client_first_bare, &server_first, without_proof);
        let mut key = [0u8; 32];
        for (k, (p, s)) in key.iter_mut().zip(proof.iter().zip(signature)) {
            *k = p ^ s;
        }
        let client_key = ClientKey(key);
        key.zeroize();
        if !ct_eq(&sha256(&client_key.0), &self.verifier.stored_key) || self.doomed {
            return Ok(Finished::Failed);
        }
        let server_signature =
            auth_hmac(&self.verifier.server_key, &client_first_bare, &server_first, without_proof);
        Ok(Finished::Verified(Verified {
            client_key,
            server_final: format!("v={}", B64.encode(server_signature)),
            plus: expected_binding.len() > 4,
        }))
    }

    /// The verifier the exchange runs against (the backend leg needs its
    /// salt, iterations and ServerKey).
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }
}

fn expect_comma(s: &str) -> Result<&str, ScramError> {
    match s.strip_prefix(',') {
        Some(rest) => Ok(rest),
        None => Err(ScramError::malformed(format!(
            "Comma expected, but found character \"{}\".",
            sanitize(&s.chars().next().map(String::from).unwrap_or_default())
        ))),
    }
}
