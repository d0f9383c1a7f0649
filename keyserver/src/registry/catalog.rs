//! What a join needs to know about a network without scanning its
//! members: each service's app id, the app ids and `.warp` labels in use,
//! and the indexes taken per (app, process type). Kept up to date on every
//! member added or removed, so a join into a network of a thousand members
//! costs the same as into one of ten.

use std::collections::{BTreeMap, HashMap};

use meshlib::ids::{AppId, ProcessType};
use meshlib::keys::PublicKey;
use meshlib::netmap::Member;

/// Counts of what a network's members use.
#[derive(Debug, Default)]
pub(super) struct Catalog {
    /// Service name → its app id (the first member's) and member count.
    services: HashMap<String, (AppId, usize)>,
    /// App ids in use, with member counts.
    app_ids: HashMap<AppId, usize>,
    /// `.warp` labels of the services in use, with member counts.
    labels: HashMap<String, usize>,
    /// Indexes taken per (app id, process type), with their holders.
    indexes: HashMap<(AppId, ProcessType), BTreeMap<u32, PublicKey>>,
}

fn dec<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Catalog {
    /// A member joined (or was loaded).
    pub(super) fn add(&mut self, m: &Member) {
        self.services
            .entry(m.service.clone())
            .or_insert_with(|| (m.app_id.clone(), 0))
            .1 += 1;
        *self.app_ids.entry(m.app_id.clone()).or_insert(0) += 1;
        if let Ok(label) = meshlib::ist::hostname_label(&m.service) {
            *self.labels.entry(label).or_insert(0) += 1;
        }
        self.indexes
            .entry((m.app_id.clone(), m.process_type.clone()))
            .or_default()
            .insert(m.index, m.public_key);
    }

    /// A member left.
    pub(super) fn remove(&mut self, m: &Member) {
        if let Some(entry) = self.services.get_mut(&m.service) {
            entry.1 -= 1;
            if entry.1 == 0 {
                self.services.remove(&m.service);
            }
        }
        dec(&mut self.app_ids, &m.app_id);
        if let Ok(label) = meshlib::ist::hostname_label(&m.service) {
            dec(&mut self.labels, &label);
        }
        let key = (m.app_id.clone(), m.process_type.clone());
        if let Some(set) = self.indexes.get_mut(&key) {
            if set.get(&m.index) == Some(&m.public_key) {
                set.remove(&m.index);
            }
            if set.is_empty() {
                self.indexes.remove(&key);
            }
        }
    }

    /// The app id of a service's members, if it has any.
    pub(super) fn service_app(&self, service: &str) -> Option<&AppId> {
        self.services.get(service).map(|(id, _)| id)
    }

    /// Whether an app id is used by a member, as app id or as the `.warp`
    /// label of its service.
    pub(super) fn app_taken(&self, id: &AppId) -> bool {
        self.app_ids.contains_key(id) || self.labels.contains_key(id.as_str())
    }

    /// The lowest index from 1 of (app, type) that no member holds, or
    /// whose holder is `gone` (an ephemeral member gone offline): the index
    /// and that holder. The numbering rule of slots (see `slots.rs`).
    pub(super) fn lowest_index(
        &self,
        app: &AppId,
        ptype: &ProcessType,
        gone: impl Fn(&PublicKey) -> bool,
    ) -> (u32, Option<PublicKey>) {
        let Some(taken) = self.indexes.get(&(app.clone(), ptype.clone())) else {
            return (1, None);
        };
        let mut next = 1;
        for (i, holder) in taken {
            if *i != next {
                break;
            }
            if gone(holder) {
                return (next, Some(*holder));
            }
            next += 1;
        }
        (next, None)
    }
}
