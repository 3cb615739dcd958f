//! The `replication` startup parameter, read exactly as PostgreSQL reads it
//! (src/backend/tcop/backend_startup.c, src/backend/utils/adt/bool.c): the
//! access decision must see the walsender PostgreSQL will start.

/// The kind of connection the `replication` startup parameter asks for
/// (`am_walsender` / `am_db_walsender` in PostgreSQL's
/// src/backend/tcop/backend_startup.c).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Replication {
    /// An ordinary backend.
    #[default]
    None,
    /// A physical walsender: no database, pg_hba's `replication` keyword.
    Physical,
    /// A logical walsender (`replication=database`): connected to its
    /// database and allowed to run replication commands there.
    Logical,
}

impl Replication {
    /// PostgreSQL's reading of the value: exactly `database` (case
    /// sensitive, a `strcmp`), else `parse_bool`; `None` for what
    /// PostgreSQL refuses.
    pub fn parse(value: &str) -> Option<Replication> {
        if value == "database" {
            return Some(Replication::Logical);
        }
        Some(match parse_bool(value)? {
            true => Replication::Physical,
            false => Replication::None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Replication::None => "none",
            Replication::Physical => "physical",
            Replication::Logical => "logical",
        }
    }
}

/// PostgreSQL's `parse_bool_with_len` (src/backend/utils/adt/bool.c): any
/// case-insensitive prefix of true/false/yes/no, `on`/`off` from two
/// letters on (`o` alone is ambiguous), and exactly `1` or `0`. No
/// whitespace is trimmed.
pub fn parse_bool(value: &str) -> Option<bool> {
    let v = value.as_bytes();
    let prefix_of = |word: &str, min: usize| {
        v.len() >= min
            && v.len() <= word.len()
            && word.as_bytes()[..v.len()].eq_ignore_ascii_case(v)
    };
    match v.first()? {
        b't' | b'T' if prefix_of("true", 1) => Some(true),
        b'f' | b'F' if prefix_of("false", 1) => Some(false),
        b'y' | b'Y' if prefix_of("yes", 1) => Some(true),
        b'n' | b'N' if prefix_of("no", 1) => Some(false),
        b'o' | b'O' if prefix_of("on", 2) => Some(true),
        b'o' | b'O' if prefix_of("off", 2) => Some(false),
        b'1' if v.len() == 1 => Some(true),
        b'0' if v.len() == 1 => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every spelling PostgreSQL's parse_bool accepts, and the ones it
    /// refuses (a walsender must never pass as an ordinary backend).
    #[test]
    fn replication_values_read_as_postgresql_reads_them() {
        use Replication::*;
        for v in [
            "t", "tr", "tru", "true", "TRUE", "TrU", "y", "ye", "yes", "YES", "on", "ON", "oN", "1",
        ] {
            assert_eq!(Replication::parse(v), Some(Physical), "{v}");
        }
        for v in [
            "f", "fa", "false", "FALSE", "n", "no", "NO", "of", "off", "OFF", "0",
        ] {
            assert_eq!(Replication::parse(v), Some(None), "{v}");
        }
        assert_eq!(Replication::parse("database"), Some(Logical));
        for v in [
            "",
            "o",
            "truex",
            "yess",
            "onn",
            "offf",
            "2",
            "01",
            "10",
            " true",
            "true ",
            "Database",
            "DATABASE",
            "databases",
            "x",
        ] {
            assert_eq!(Replication::parse(v), Option::None, "{v:?}");
        }
    }
}
