//! Role templates of `[[rules]]`: literal text with `\1`..`\9` for the
//! pattern's capture groups (`\\` for a backslash), parsed once when the
//! rules compile and rendered per decision.

/// A parsed template.
pub(super) type Template = Vec<Part>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Part {
    Literal(String),
    Group(usize),
}

pub(super) fn render(template: &[Part], groups: &[&str]) -> String {
    let mut out = String::new();
    for part in template {
        match part {
            Part::Literal(s) => out.push_str(s),
            Part::Group(g) => out.push_str(groups.get(g - 1).copied().unwrap_or("")),
        }
    }
    out
}

/// `\1`..`\9` are capture groups; `\\` is a backslash.
pub(super) fn parse_template(t: &str, groups: usize) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut lit = String::new();
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            lit.push(c);
            continue;
        }
        match chars.next() {
            Some(d @ '1'..='9') => {
                let g = d as usize - '0' as usize;
                if g > groups {
                    return Err(format!("role template {t:?} uses \\{g} but the pattern has {groups} capture group(s)"));
                }
                if !lit.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut lit)));
                }
                parts.push(Part::Group(g));
            }
            Some('\\') => lit.push('\\'),
            _ => {
                return Err(format!(
                    "role template {t:?}: a backslash must be followed by 1-9 or another backslash"
                ))
            }
        }
    }
    if !lit.is_empty() {
        parts.push(Part::Literal(lit));
    }
    if parts.is_empty() {
        return Err("a role template cannot be empty".into());
    }
    Ok(parts)
}

