//! The IST names of a whole deployment: every service's hostnames and
//! variables, with overrides applied and conflicts found.
//!
//! A conflict (two services claiming one hostname or one variable) is never
//! resolved silently: the name is withheld from every service that claims it,
//! and [`IstTable::conflicts`] names them all, so the caller can report it and
//! the user can fix it with an override.

use std::collections::BTreeMap;
use std::fmt;

use super::config::Overrides;
use super::{encode, IstError};

/// Which kind of name a conflict is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NameKind {
    /// A hostname (compared case-insensitively, as resolvers do).
    Hostname,
    /// An environment variable (compared exactly, as the environment does).
    Variable,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Hostname => "hostname",
            NameKind::Variable => "variable",
        })
    }
}

/// Two or more services claiming the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// Hostname or variable.
    pub kind: NameKind,
    /// The contested name.
    pub name: String,
    /// Every service claiming it, sorted (at least two).
    pub services: Vec<String>,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let quoted: Vec<String> = self.services.iter().map(|s| format!("{s:?}")).collect();
        write!(
            f,
            "{} {} is claimed by services {}; it is given to none of them \
             (set `{}s` for one of them in the `ist` overrides)",
            self.kind,
            self.name,
            quoted.join(" and "),
            self.kind
        )
    }
}

/// The names one service ends up with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    /// The service name.
    pub service: String,
    /// Its hostnames (conflicting ones removed).
    pub hostnames: Vec<String>,
    /// Its variables (conflicting ones removed).
    pub variables: Vec<String>,
}

/// The result of [`IstTable::build`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IstTable {
    /// One entry per valid service, sorted by service name.
    pub entries: Vec<ServiceEntry>,
    /// Names claimed by more than one service.
    pub conflicts: Vec<Conflict>,
    /// Service names that cannot be encoded, with why.
    pub invalid: Vec<(String, IstError)>,
}

impl IstTable {
    /// Computes the names of `services`, applying `overrides`. Duplicate
    /// service names count once.
    pub fn build<'a>(services: impl IntoIterator<Item = &'a str>, overrides: &Overrides) -> Self {
        let mut table = IstTable::default();
        let mut names: Vec<&str> = services.into_iter().collect();
        names.sort_unstable();
        names.dedup();
        for service in names {
            match Self::entry_for(service, overrides) {
                Ok(entry) => table.entries.push(entry),
                Err(e) => table.invalid.push((service.to_owned(), e)),
            }
        }
        table.remove_conflicts();
        table
    }

    /// The computed names of one service, replaced by its overrides if any.
    fn entry_for(service: &str, overrides: &Overrides) -> Result<ServiceEntry, IstError> {
        let computed = encode(service)?;
        let over = overrides.get(service);
        let hostnames = match over.and_then(|o| o.hostnames.clone()) {
            Some(list) => list,
            None => vec![computed.hostname],
        };
        let mut variables = match over.and_then(|o| o.variables.clone()) {
            Some(list) => list,
            None => vec![computed.variable, computed.shell_variable],
        };
        variables.dedup();
        Ok(ServiceEntry {
            service: service.to_owned(),
            hostnames,
            variables,
        })
    }

    /// Finds names claimed by several services and withholds them from all.
    fn remove_conflicts(&mut self) {
        let mut claims: BTreeMap<(NameKind, String), Vec<String>> = BTreeMap::new();
        for e in &self.entries {
            let hosts = e
                .hostnames
                .iter()
                .map(|h| (NameKind::Hostname, h.to_ascii_lowercase()));
            let vars = e.variables.iter().map(|v| (NameKind::Variable, v.clone()));
            for key in hosts.chain(vars) {
                let owners = claims.entry(key).or_default();
                if owners.last() != Some(&e.service) {
                    owners.push(e.service.clone());
                }
            }
        }
        self.conflicts = claims
            .into_iter()
            .filter(|(_, owners)| owners.len() > 1)
            .map(|((kind, name), services)| Conflict {
                kind,
                name,
                services,
            })
            .collect();
        for c in &self.conflicts {
            for e in self
                .entries
                .iter_mut()
                .filter(|e| c.services.contains(&e.service))
            {
                match c.kind {
                    NameKind::Hostname => e.hostnames.retain(|h| !h.eq_ignore_ascii_case(&c.name)),
                    NameKind::Variable => e.variables.retain(|v| v != &c.name),
                }
            }
        }
    }

    /// The entry of one service.
    pub fn get(&self, service: &str) -> Option<&ServiceEntry> {
        self.entries.iter().find(|e| e.service == service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ist::config::parse_toml;

    #[test]
    fn seed_conflict_is_reported_with_all_services() {
        // my-db, "my db" and my=db all encode to my-db.warp (seed 004).
        let t = IstTable::build(["my-db", "my db", "my=db", "api"], &Overrides::default());
        let host = t
            .conflicts
            .iter()
            .find(|c| c.kind == NameKind::Hostname)
            .unwrap();
        assert_eq!(host.name, "my-db.warp");
        assert_eq!(host.services, ["my db", "my-db", "my=db"]);
        // "my db" and "my=db" share the generic variable; with my-db's shell
        // variable all three share WARP_IST_my_db.
        let var = t
            .conflicts
            .iter()
            .find(|c| c.name == "WARP_IST_my_db")
            .unwrap();
        assert_eq!(var.services, ["my db", "my-db", "my=db"]);
        // Nobody got the contested names; my-db keeps its unique generic one.
        assert!(t.get("my db").unwrap().hostnames.is_empty());
        assert_eq!(t.get("my-db").unwrap().variables, ["WARP_IST_my-db"]);
        assert_eq!(t.get("api").unwrap().hostnames, ["api.warp"]);
        let msg = host.to_string();
        assert!(
            msg.contains("\"my db\"") && msg.contains("\"my-db\""),
            "{msg}"
        );
    }

    #[test]
    fn overrides_resolve_a_conflict() {
        let o = parse_toml(
            r#"
            [[ist]]
            service = "my db"
            hostnames = ["mydb.local"]
            variables = ["MY_DB"]
            "#,
        )
        .unwrap();
        let t = IstTable::build(["my-db", "my db"], &o);
        assert!(t.conflicts.is_empty(), "{:?}", t.conflicts);
        assert_eq!(t.get("my db").unwrap().hostnames, ["mydb.local"]);
        assert_eq!(t.get("my db").unwrap().variables, ["MY_DB"]);
        assert_eq!(t.get("my-db").unwrap().hostnames, ["my-db.warp"]);
        assert_eq!(
            t.get("my-db").unwrap().variables,
            ["WARP_IST_my-db", "WARP_IST_my_db"]
        );
    }

    #[test]
    fn override_that_collides_is_a_conflict_too() {
        let o = parse_toml("[[ist]]\nservice = \"a\"\nhostnames = [\"B.warp\"]\n").unwrap();
        let t = IstTable::build(["a", "b"], &o);
        assert_eq!(t.conflicts.len(), 1);
        assert_eq!(t.conflicts[0].services, ["a", "b"]);
        assert_eq!(t.conflicts[0].name, "b.warp");
    }

    #[test]
    fn invalid_services_are_listed_not_dropped_silently() {
        let t = IstTable::build(["", "ok"], &Overrides::default());
        assert_eq!(t.invalid, [(String::new(), IstError::Empty)]);
        assert_eq!(t.entries.len(), 1);
    }

    #[test]
    fn same_names_within_one_service_are_no_conflict() {
        let t = IstTable::build(["api", "api"], &Overrides::default());
        assert!(t.conflicts.is_empty());
        assert_eq!(t.get("api").unwrap().variables, ["WARP_IST_api"]);
    }
}
