//! The proxy's own startup option, `-c pgtls.route=NAME` in `options`:
//! found as PostgreSQL would split the options, and taken out of the
//! packet so that the backend never sees it.

use bytes::{BufMut, BytesMut};

use super::StartupPacket;

impl StartupPacket {
    /// Takes the route a client named in `options` (`-c pgtls.route=NAME`,
    /// `-cpgtls.route=NAME` or `--pgtls.route=NAME`, split as PostgreSQL
    /// splits options: on spaces, `\` escaping the next character) out of
    /// the packet, so that the backend never sees it; the last one wins.
    pub fn take_route(&mut self) -> Option<String> {
        const KEY: &str = "pgtls.route=";
        let mut found = None;
        let mut out = BytesMut::with_capacity(self.raw.len());
        out.extend_from_slice(&self.raw[..8]);
        let mut rest = &self.raw[8..];
        // `parse_startup` checked the layout: pairs, then one NUL.
        while let Some(k) = rest.iter().position(|&b| b == 0).filter(|&k| k > 0) {
            let v = rest[k + 1..].iter().position(|&b| b == 0).unwrap_or(0);
            let (key, value) = (&rest[..k], &rest[k + 1..k + 1 + v]);
            let pair_len = k + 1 + v + 1;
            if key == b"options" {
                let tokens = split_options(value);
                let mut kept: Vec<&[u8]> = Vec::new();
                let mut i = 0;
                while i < tokens.len() {
                    let (raw, text) = &tokens[i];
                    let named = if text == "-c" {
                        tokens.get(i + 1).and_then(|(_, t)| t.strip_prefix(KEY)).map(|n| (n, 2))
                    } else {
                        text.strip_prefix("-c")
                            .or_else(|| text.strip_prefix("--"))
                            .and_then(|t| t.strip_prefix(KEY))
                            .map(|n| (n, 1))
                    };
                    match named {
                        Some((name, used)) => {
                            found = Some(name.to_string());
                            i += used;
                        }
                        None => {
                            kept.push(raw);
                            i += 1;
                        }
                    }
                }
                if !kept.is_empty() {
                    out.extend_from_slice(b"options\0");
                    out.extend_from_slice(&kept.join(&b' '));
                    out.put_u8(0);
                }
            } else {
                out.extend_from_slice(&rest[..pair_len]);
            }
            rest = &rest[pair_len..];
        }
        if found.is_some() {
            out.put_u8(0);
            let len = out.len() as i32;
            out[..4].copy_from_slice(&len.to_be_bytes());
            self.raw = out.freeze();
            // The decoded map follows, for the checks that read it.
            self.refresh_options();
        }
        found
    }

    /// Re-reads `options` from the raw bytes into the decoded map.
    fn refresh_options(&mut self) {
        let mut value = None;
        let mut rest = &self.raw[8..];
        while let Some(k) = rest.iter().position(|&b| b == 0).filter(|&k| k > 0) {
            let v = rest[k + 1..].iter().position(|&b| b == 0).unwrap_or(0);
            if &rest[..k] == b"options" {
                value = Some(String::from_utf8_lossy(&rest[k + 1..k + 1 + v]).into_owned());
            }
            rest = &rest[k + 1 + v + 1..];
        }
        match value {
            Some(v) => {
                self.message.parameters.insert("options".into(), v);
            }
            None => {
                self.message.parameters.remove("options");
            }
        }
    }
}

/// PostgreSQL's pg_split_opts: tokens separated by spaces, a backslash
/// taking the next character literally. Each token as written (for
/// forwarding unchanged) and as read.
fn split_options(value: &[u8]) -> Vec<(&[u8], String)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < value.len() {
        while i < value.len() && value[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == value.len() {
            break;
        }
        let start = i;
        let mut text = Vec::new();
        while i < value.len() && !value[i].is_ascii_whitespace() {
            if value[i] == b'\\' && i + 1 < value.len() {
                i += 1;
            }
            text.push(value[i]);
            i += 1;
        }
        out.push((&value[start..i], String::from_utf8_lossy(&text).into_owned()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::packet::encode_startup as startup_bytes;
    use super::super::{read_packet, Packet};

    #[tokio::test]
    async fn route_option_is_taken_out() {
        for (options, route, left) in [
            ("-c pgtls.route=shard2", Some("shard2"), None),
            ("-cpgtls.route=a -c work_mem=64MB", Some("a"), Some("-c work_mem=64MB")),
            ("--pgtls.route=b --search_path=x\\ y", Some("b"), Some("--search_path=x\\ y")),
            ("-c work_mem=1MB", None, Some("-c work_mem=1MB")),
            ("-c pgtls.route=a -c pgtls.route=b", Some("b"), None),
        ] {
            let raw = startup_bytes(196608, &[("user", "u"), ("options", options), ("database", "d")]);
            let mut c = std::io::Cursor::new(raw);
            let Ok(Packet::Startup(mut s)) = read_packet(&mut c).await else {
                panic!("startup");
            };
            assert_eq!(s.take_route().as_deref(), route, "{options}");
            assert_eq!(s.message.parameters.get("options").map(String::as_str), left, "{options}");
            let fwd = s.for_backend();
            assert_eq!(i32::from_be_bytes([fwd[0], fwd[1], fwd[2], fwd[3]]) as usize, fwd.len());
            assert!(!fwd.windows(11).any(|w| w == b"pgtls.route"), "{options}");
            assert!(fwd.windows(9).any(|w| w == b"database\0"), "other pairs kept");
        }
    }
}
