//! PgBouncer's auth_file format (userlist.txt): one user per line,
//! `"user" "SCRAM-SHA-256$..."`, each field in double quotes with `""` for
//! a quote inside; further fields are ignored; blank lines and lines
//! starting with `;` or `#` are comments. Only SCRAM-SHA-256 verifiers are
//! accepted: an MD5 hash or a plain password is an error that names its
//! line (the proxy could not run SCRAM for that user).

use std::collections::HashMap;

use super::{Verifier, VerifierError};

/// A line that is not a user and a SCRAM verifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserlistError {
    #[error("line {line}: expected \"user\" \"SCRAM-SHA-256$...\"")]
    Syntax { line: usize },
    #[error("line {line}: user {user:?}: {reason}")]
    Verifier {
        line: usize,
        user: String,
        reason: VerifierError,
    },
    #[error("line {line}: user {user:?} is listed twice")]
    Duplicate { line: usize, user: String },
}

/// Parses a whole auth_file.
pub fn parse(text: &str) -> Result<HashMap<String, Verifier>, UserlistError> {
    let mut out = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let s = raw.trim();
        if s.is_empty() || s.starts_with(';') || s.starts_with('#') {
            continue;
        }
        let (user, rest) = quoted(s).ok_or(UserlistError::Syntax { line })?;
        let (secret, _) = quoted(rest.trim_start()).ok_or(UserlistError::Syntax { line })?;
        if user.is_empty() {
            return Err(UserlistError::Syntax { line });
        }
        let verifier = secret.parse::<Verifier>().map_err(|reason| UserlistError::Verifier {
            line,
            user: user.clone(),
            reason,
        })?;
        if out.insert(user.clone(), verifier).is_some() {
            return Err(UserlistError::Duplicate { line, user });
        }
    }
    Ok(out)
}

/// One `"..."` field at the front of `s`; the value and what follows.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut rest = s.strip_prefix('"')?;
    let mut value = String::new();
    loop {
        let end = rest.find('"')?;
        value.push_str(&rest[..end]);
        rest = &rest[end + 1..];
        match rest.strip_prefix('"') {
            Some(after) => {
                value.push('"');
                rest = after;
            }
            None => return Some((value, rest)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pgbouncer_userlists() {
        let v = Verifier::from_password(b"pw", b"0123456789abcdef", 4096);
        let text = format!(
            "; comment\n# another\n\n\"alice\" \"{v}\"\n\"we\"\"ird\" \"{v}\" \"ignored\"\n"
        );
        let map = parse(&text).expect("parses");
        assert_eq!(map.len(), 2);
        assert_eq!(map["alice"], v);
        assert!(map.contains_key("we\"ird"));
    }

    #[test]
    fn refuses_what_cannot_be_terminated() {
        let md5 = format!("\"a\" \"md5{}\"", "0".repeat(32));
        assert!(matches!(
            parse(&md5),
            Err(UserlistError::Verifier { line: 1, reason: VerifierError::Md5, .. })
        ));
        let err = parse("\n\"bob\" \"hunter2\"").expect_err("plain");
        assert_eq!(err.to_string().split(':').next(), Some("line 2"));
        assert!(matches!(parse("alice pw"), Err(UserlistError::Syntax { line: 1 })));
        assert!(matches!(parse("\"alice"), Err(UserlistError::Syntax { line: 1 })));
        let v = Verifier::from_password(b"pw", b"0123456789abcdef", 4096);
        let twice = format!("\"a\" \"{v}\"\n\"a\" \"{v}\"");
        assert!(matches!(parse(&twice), Err(UserlistError::Duplicate { line: 2, .. })));
    }
}
