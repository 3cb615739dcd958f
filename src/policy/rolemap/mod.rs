//! Role rules: which PostgreSQL roles (and databases) a verified client
//! certificate may use. Pure code, no I/O; compiled once at start-up (and
//! reload), then evaluated per startup.
//!
//! A startup (user U, database D) with identities I is allowed when some
//! rule matches an identity in I, one of the rule's expanded roles equals U
//! exactly, and D is in the rule's databases (or the rule has none). The
//! first such rule, in config order, decides the backend login mode.
//! Everything else is denied: a certificate matching no rule gets nothing.
//!
//! Patterns are regexes anchored at both ends; role templates take `\1` …
//! `\9` from the pattern's capture groups, as pg_ident.conf does. Rules are
//! indexed (exact values in a hash map, patterns in one `RegexSet` per
//! identity kind) so that 1,000 rules cost about as much as a few.

mod template;

use std::collections::HashMap;

use regex::{Regex, RegexSet};

use crate::config::{BackendAuth, ReplicationRule, RuleConfig};
use crate::policy::identity::{Identity, IdentityKind};
use crate::wire::Replication;
use template::{parse_template, render, Template};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("rules[{index}].{key}: {reason}")]
pub struct RuleError {
    pub index: usize,
    pub key: &'static str,
    pub reason: String,
}

enum Matcher {
    Exact(String),
    Pattern(Regex),
}


struct Rule {
    kind: IdentityKind,
    matcher: Matcher,
    roles: Vec<Template>,
    databases: Option<Vec<String>>,
    backend_auth: BackendAuth,
    replication: ReplicationRule,
}

/// Why a startup was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    NoRuleMatched,
    RoleNotAllowed,
    DatabaseNotAllowed,
    ReplicationNotAllowed,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::NoRuleMatched => "no_rule_matched",
            DenyReason::RoleNotAllowed => "role_not_allowed",
            DenyReason::DatabaseNotAllowed => "database_not_allowed",
            DenyReason::ReplicationNotAllowed => "replication_not_allowed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        rule: usize,
        kind: IdentityKind,
        identity: String,
        backend_auth: BackendAuth,
    },
    Deny {
        reason: DenyReason,
        /// The identity named to the client: the one a rule matched, else
        /// the certificate's CN (or DN).
        identity: String,
        kind: Option<IdentityKind>,
    },
}

/// One rule's verdict, for `explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleTrace {
    pub index: usize,
    pub kind: IdentityKind,
    /// The first identity value the rule matched, with its expanded roles.
    pub matched: Option<(String, Vec<String>)>,
    pub database_allowed: bool,
    pub replication_allowed: bool,
    pub allows: bool,
}

#[derive(Default)]
struct KindIndex {
    exact: HashMap<String, Vec<usize>>,
    set: Option<RegexSet>,
    set_rules: Vec<usize>,
}

/// Compiled rules.
pub struct RoleMap {
    rules: Vec<Rule>,
    index: HashMap<IdentityKind, KindIndex>,
}

impl RoleMap {
    pub fn compile(configs: &[RuleConfig]) -> Result<RoleMap, RuleError> {
        let mut rules = Vec::with_capacity(configs.len());
        let mut patterns: HashMap<IdentityKind, Vec<(usize, String)>> = HashMap::new();
        let mut index: HashMap<IdentityKind, KindIndex> = HashMap::new();
        for (i, c) in configs.iter().enumerate() {
            let err = |key, reason: String| RuleError {
                index: i,
                key,
                reason,
            };
            let (matcher, groups) = match (&c.pattern, &c.exact) {
                (Some(p), None) => {
                    let anchored = format!("^(?:{p})$");
                    let re = Regex::new(&anchored).map_err(|e| err("pattern", e.to_string()))?;
                    let groups = re.captures_len() - 1;
                    patterns.entry(c.identity).or_default().push((i, anchored));
                    (Matcher::Pattern(re), groups)
                }
                (None, Some(e)) => {
                    index
                        .entry(c.identity)
                        .or_default()
                        .exact
                        .entry(e.clone())
                        .or_default()
                        .push(i);
                    (Matcher::Exact(e.clone()), 0)
                }
                _ => {
                    return Err(err(
                        "pattern",
                        "give exactly one of `pattern` or `exact`".into(),
                    ))
                }
            };
            if c.roles.is_empty() {
                return Err(err("roles", "must list at least one role".into()));
            }
            let roles = c
                .roles
                .iter()
                .map(|t| parse_template(t, groups).map_err(|r| err("roles", r)))
                .collect::<Result<Vec<_>, _>>()?;
            let lists_replication = c
                .databases
                .as_ref()
                .is_some_and(|d| d.iter().any(|x| x == "replication"));
            if lists_replication
                && !matches!(
                    c.replication,
                    ReplicationRule::Physical | ReplicationRule::Any
                )
            {
                return Err(err(
                    "replication",
                    "databases lists \"replication\" (physical walsenders) but the rule does not allow replication: add replication = \"physical\"".into(),
                ));
            }
            if matches!(&c.databases, Some(d) if d.is_empty()) {
                return Err(err(
                    "databases",
                    "an empty list allows nothing; omit it to allow any database".into(),
                ));
            }
            rules.push(Rule {
                kind: c.identity,
                matcher,
                roles,
                databases: c.databases.clone(),
                backend_auth: c.backend_auth,
                replication: c.replication,
            });
        }
        for (kind, list) in patterns {
            let set = RegexSet::new(list.iter().map(|(_, p)| p)).map_err(|e| RuleError {
                index: list.first().map(|(i, _)| *i).unwrap_or(0),
                key: "pattern",
                reason: e.to_string(),
            })?;
            let entry = index.entry(kind).or_default();
            entry.set = Some(set);
            entry.set_rules = list.into_iter().map(|(i, _)| i).collect();
        }
        Ok(RoleMap { rules, index })
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The decision for one startup.
    pub fn decide(
        &self,
        id: &Identity,
        user: &str,
        database: &str,
        replication: Replication,
    ) -> Decision {
        let mut candidates: Vec<(usize, &str)> = Vec::new();
        for (kind, idx) in &self.index {
            for value in id.values(*kind) {
                if let Some(rules) = idx.exact.get(value) {
                    candidates.extend(rules.iter().map(|&r| (r, value.as_str())));
                }
                if let Some(set) = &idx.set {
                    candidates.extend(
                        set.matches(value)
                            .iter()
                            .map(|m| (idx.set_rules[m], value.as_str())),
                    );
                }
            }
        }
        candidates.sort_unstable_by_key(|(rule, _)| *rule);
        let mut best: Option<(DenyReason, usize, &str)> = None;
        for (i, value) in candidates {
            let rule = &self.rules[i];
            let Some(roles) = rule.expand(value) else {
                continue;
            };
            let reason = if !roles.iter().any(|r| r == user) {
                DenyReason::RoleNotAllowed
            } else if !rule.database_allowed(database) {
                DenyReason::DatabaseNotAllowed
            } else if !rule.replication_allowed(replication) {
                DenyReason::ReplicationNotAllowed
            } else {
                return Decision::Allow {
                    rule: i,
                    kind: rule.kind,
                    identity: value.to_string(),
                    backend_auth: rule.backend_auth,
                };
            };
            // Name the most specific refusal: a rule that matched the role
            // says more than one that did not.
            if best.is_none_or(|(r, ..)| {
                reason != DenyReason::RoleNotAllowed && r == DenyReason::RoleNotAllowed
            }) {
                best = Some((reason, i, value));
            }
        }
        match best {
            Some((reason, i, value)) => Decision::Deny {
                reason,
                identity: value.to_string(),
                kind: Some(self.rules[i].kind),
            },
            None => Decision::Deny {
                reason: DenyReason::NoRuleMatched,
                identity: id.display_name().to_string(),
                kind: None,
            },
        }
    }

    /// Every rule in order, with what it made of this certificate.
    pub fn explain(
        &self,
        id: &Identity,
        user: &str,
        database: &str,
        replication: Replication,
    ) -> Vec<RuleTrace> {
        self.rules
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                // Prefer an identity value that allows, as `decide` does.
                let all: Vec<(String, Vec<String>)> = id
                    .values(rule.kind)
                    .iter()
                    .filter_map(|v| rule.expand(v).map(|roles| (v.clone(), roles)))
                    .collect();
                let matched = all
                    .iter()
                    .find(|(_, roles)| roles.iter().any(|r| r == user))
                    .or(all.first())
                    .cloned();
                let database_allowed = rule.database_allowed(database);
                let replication_allowed = rule.replication_allowed(replication);
                let allows = database_allowed
                    && replication_allowed
                    && matched
                        .as_ref()
                        .is_some_and(|(_, roles)| roles.iter().any(|r| r == user));
                RuleTrace {
                    index,
                    kind: rule.kind,
                    matched,
                    database_allowed,
                    replication_allowed,
                    allows,
                }
            })
            .collect()
    }
}

impl Rule {
    /// The expanded roles if this rule matches `value`.
    fn expand(&self, value: &str) -> Option<Vec<String>> {
        match &self.matcher {
            Matcher::Exact(e) => {
                (e == value).then(|| self.roles.iter().map(|t| render(t, &[])).collect())
            }
            Matcher::Pattern(re) => {
                let caps = re.captures(value)?;
                let groups: Vec<&str> = (1..caps.len())
                    .map(|g| caps.get(g).map_or("", |m| m.as_str()))
                    .collect();
                Some(self.roles.iter().map(|t| render(t, &groups)).collect())
            }
        }
    }

    /// A walsender needs a rule that names its kind: replication streams
    /// every database's data, whatever `databases` says.
    fn replication_allowed(&self, replication: Replication) -> bool {
        use ReplicationRule as R;
        match replication {
            Replication::None => true,
            Replication::Physical => matches!(self.replication, R::Physical | R::Any),
            Replication::Logical => matches!(self.replication, R::Logical | R::Any),
        }
    }

    fn database_allowed(&self, database: &str) -> bool {
        self.databases
            .as_ref()
            .is_none_or(|d| d.iter().any(|x| x == database))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        kind: IdentityKind,
        pattern: Option<&str>,
        exact: Option<&str>,
        roles: &[&str],
    ) -> RuleConfig {
        RuleConfig {
            identity: kind,
            pattern: pattern.map(str::to_string),
            exact: exact.map(str::to_string),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            databases: None,
            backend_auth: BackendAuth::Passthrough,
            replication: ReplicationRule::None,
        }
    }

    fn id_cn(cn: &str) -> Identity {
        Identity {
            cn: vec![cn.into()],
            dn: format!("CN={cn}"),
            ..Default::default()
        }
    }

    #[test]
    fn spiffe_captures_expand_roles() {
        let map = RoleMap::compile(&[rule(
            IdentityKind::Uri,
            Some(r"spiffe://prod\.example\.org/ns/([a-z0-9-]+)/sa/([a-z0-9-]+)"),
            None,
            &[r"\2", "readonly", r"\1_\2"],
        )])
        .expect("compile");
        let id = Identity {
            uris: vec!["spiffe://prod.example.org/ns/shop/sa/web".into()],
            ..Default::default()
        };
        assert!(matches!(
            map.decide(&id, "web", "app", Replication::None),
            Decision::Allow { rule: 0, .. }
        ));
        assert!(matches!(
            map.decide(&id, "readonly", "app", Replication::None),
            Decision::Allow { .. }
        ));
        assert!(matches!(
            map.decide(&id, "shop_web", "app", Replication::None),
            Decision::Allow { .. }
        ));
        assert_eq!(
            map.decide(&id, "admin", "app", Replication::None),
            Decision::Deny {
                reason: DenyReason::RoleNotAllowed,
                identity: "spiffe://prod.example.org/ns/shop/sa/web".into(),
                kind: Some(IdentityKind::Uri)
            }
        );
        // Anchored: a longer URI does not match.
        let id = Identity {
            uris: vec!["spiffe://prod.example.org/ns/shop/sa/web/extra".into()],
            ..Default::default()
        };
        assert!(matches!(
            map.decide(&id, "web", "app", Replication::None),
            Decision::Deny {
                reason: DenyReason::NoRuleMatched,
                ..
            }
        ));
    }

    #[test]
    fn exact_is_case_sensitive_and_literal() {
        let map = RoleMap::compile(&[
            rule(IdentityKind::Cn, None, Some("alice"), &["alice"]),
            rule(IdentityKind::Cn, None, Some("*.example.com"), &["wild"]),
        ])
        .expect("compile");
        assert!(matches!(
            map.decide(&id_cn("Alice"), "alice", "db", Replication::None),
            Decision::Deny { .. }
        ));
        assert!(matches!(
            map.decide(&id_cn("alice"), "alice", "db", Replication::None),
            Decision::Allow { .. }
        ));
        assert!(matches!(
            map.decide(&id_cn("*.example.com"), "wild", "db", Replication::None),
            Decision::Allow { .. }
        ));
        assert!(matches!(
            map.decide(&id_cn("db.example.com"), "wild", "db", Replication::None),
            Decision::Deny { .. }
        ));
    }

    #[test]
    fn databases_and_first_allowing_rule_wins() {
        let mut a = rule(IdentityKind::Cn, None, Some("team"), &["reader", "writer"]);
        a.databases = Some(vec!["app".into()]);
        let mut b = rule(IdentityKind::Cn, Some("te.*"), None, &["writer"]);
        b.backend_auth = BackendAuth::Proxy;
        let map = RoleMap::compile(&[a, b]).expect("compile");
        let id = id_cn("team");
        assert!(matches!(
            map.decide(&id, "reader", "app", Replication::None),
            Decision::Allow { rule: 0, .. }
        ));
        assert!(matches!(
            map.decide(&id, "reader", "other", Replication::None),
            Decision::Deny {
                reason: DenyReason::DatabaseNotAllowed,
                ..
            }
        ));
        assert!(matches!(
            map.decide(&id, "writer", "other", Replication::None),
            Decision::Allow {
                rule: 1,
                backend_auth: BackendAuth::Proxy,
                ..
            }
        ));
        let trace = map.explain(&id, "reader", "other", Replication::None);
        assert_eq!(trace.len(), 2);
        assert!(!trace[0].allows && !trace[0].database_allowed);
        assert_eq!(
            trace[1].matched,
            Some(("team".into(), vec!["writer".into()]))
        );
    }

    #[test]
    fn second_san_matches() {
        let map = RoleMap::compile(&[rule(IdentityKind::Dns, None, Some("b.example"), &["svc"])])
            .expect("compile");
        let id = Identity {
            dns: vec!["a.example".into(), "b.example".into()],
            ..Default::default()
        };
        assert!(matches!(
            map.decide(&id, "svc", "db", Replication::None),
            Decision::Allow { .. }
        ));
    }

    #[test]
    fn compile_errors_name_the_rule() {
        let bad = rule(IdentityKind::Cn, Some("(a"), None, &["x"]);
        assert_eq!(
            RoleMap::compile(&[bad]).err().map(|e| e.key),
            Some("pattern")
        );
        let bad = rule(IdentityKind::Cn, Some("(a)"), None, &[r"\2"]);
        let e = RoleMap::compile(&[rule(IdentityKind::Cn, None, Some("x"), &["x"]), bad])
            .err()
            .expect("error");
        assert_eq!((e.index, e.key), (1, "roles"));
        let both = rule(IdentityKind::Cn, Some("a"), Some("a"), &["x"]);
        assert!(RoleMap::compile(&[both]).is_err());
    }

    #[test]
    fn thousand_rules_compile_and_decide() {
        let rules: Vec<_> = (0..1000)
            .map(|i| {
                if i % 2 == 0 {
                    rule(
                        IdentityKind::Cn,
                        None,
                        Some(&format!("user{i}")),
                        &[&format!("role{i}")],
                    )
                } else {
                    rule(
                        IdentityKind::Uri,
                        Some(&format!(r"spiffe://t/ns{i}/sa/([a-z]+)")),
                        None,
                        &[r"\1"],
                    )
                }
            })
            .collect();
        let map = RoleMap::compile(&rules).expect("compile");
        assert!(matches!(
            map.decide(&id_cn("user998"), "role998", "db", Replication::None),
            Decision::Allow { rule: 998, .. }
        ));
        let id = Identity {
            uris: vec!["spiffe://t/ns999/sa/web".into()],
            ..Default::default()
        };
        assert!(matches!(
            map.decide(&id, "web", "db", Replication::None),
            Decision::Allow { rule: 999, .. }
        ));
    }

    #[test]
    fn replication_needs_a_rule_that_names_it() {
        let id = id_cn("repl");
        let mut r = rule(IdentityKind::Cn, None, Some("repl"), &["repl"]);
        r.databases = Some(vec!["bench".into()]);
        let map = RoleMap::compile(&[r.clone()]).expect("compile");
        let denied = |d: Decision| {
            matches!(
                d,
                Decision::Deny {
                    reason: DenyReason::ReplicationNotAllowed,
                    ..
                }
            )
        };
        assert!(matches!(
            map.decide(&id, "repl", "bench", Replication::None),
            Decision::Allow { .. }
        ));
        // Physical walsenders are checked as database "replication".
        assert!(matches!(
            map.decide(&id, "repl", "replication", Replication::Physical),
            Decision::Deny {
                reason: DenyReason::DatabaseNotAllowed,
                ..
            }
        ));
        assert!(denied(map.decide(
            &id,
            "repl",
            "bench",
            Replication::Logical
        )));
        r.replication = ReplicationRule::Logical;
        let map = RoleMap::compile(&[r.clone()]).expect("compile");
        assert!(matches!(
            map.decide(&id, "repl", "bench", Replication::Logical),
            Decision::Allow { .. }
        ));
        r.databases = None;
        let map = RoleMap::compile(&[r.clone()]).expect("compile");
        assert!(denied(map.decide(
            &id,
            "repl",
            "replication",
            Replication::Physical
        )));
        r.replication = ReplicationRule::Physical;
        let map = RoleMap::compile(&[r.clone()]).expect("compile");
        assert!(matches!(
            map.decide(&id, "repl", "replication", Replication::Physical),
            Decision::Allow { .. }
        ));
        assert!(denied(map.decide(
            &id,
            "repl",
            "bench",
            Replication::Logical
        )));
        r.replication = ReplicationRule::Any;
        r.databases = Some(vec!["replication".into()]);
        assert!(RoleMap::compile(&[r.clone()]).is_ok());
        r.replication = ReplicationRule::None;
        let e = RoleMap::compile(&[r]).err().expect("refused");
        assert_eq!(e.key, "replication");
    }
}
