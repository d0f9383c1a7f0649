//! Scale to zero on internal traffic (issue 19, item 5), the registry's
//! part: a service address's wake hook and idle settings
//! ([`Registry::set_address`]), wake requests that start the hook once
//! however many members (and replicas) ask ([`Registry::request_wake`]),
//! the flows members report ([`Registry::note_flows`]) and the idle
//! services they leave ([`Registry::idle_sweep`]).
//!
//! All of it lives in the [`AddressRecord`]s of the network's record, so
//! every decision is one write of that record: on a shared store the
//! commit compares it, exactly one replica's wake (or idle transition)
//! commits, and the others, run again on the fresh record, find it done.
//! The hooks themselves run in the driver ([`crate::hooks`]), from the
//! [`HookJob`]s these operations return.

use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use meshlib::ids::NetworkId;
use meshlib::netmap::MapChange;
use meshlib::proto::ErrorCode;
use meshlib::services::{check_wake, check_wake_timeout, WakeHook, WakeSpec};
use serde::{Deserialize, Serialize};

use super::network::Network;
use super::{unix, AddressRecord, AdminError, Change, Registry, StoreOp};

/// The wake timeout a wake hook gets unless one is given (seconds).
pub const DEFAULT_WAKE_TIMEOUT_SECS: u16 = 30;
/// Longest `idle-after`: 30 days.
pub const MAX_IDLE_AFTER_SECS: u32 = 30 * 24 * 3600;
/// How long an idle hook may run.
pub const IDLE_HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// Which hook a [`HookJob`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookKind {
    /// The wake hook: a member asked to wake the service.
    Wake,
    /// The idle hook: the service turned idle.
    Idle,
}

impl HookKind {
    /// `wake` or `idle` (metrics labels, logs, the hook's environment).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Wake => "wake",
            Self::Idle => "idle",
        }
    }
}

/// A hook to run, as an operation decided it (the driver runs it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookJob {
    /// Which hook.
    pub kind: HookKind,
    /// The service's network.
    pub network: NetworkId,
    /// The network's name.
    pub network_name: String,
    /// The service.
    pub service: String,
    /// The service's address.
    pub ip: Ipv4Addr,
    /// The hook.
    pub hook: WakeHook,
    /// How long it may run (the wake timeout for a wake hook).
    pub timeout: Duration,
}

/// What a wake request led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// This request starts the hook: run it.
    Run(HookJob),
    /// A wake started at this time (Unix seconds) is still within its
    /// timeout: nothing to do.
    Waking(u64),
}

/// Why a wake request is refused (nothing runs, nothing changes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WakeError {
    /// The member's network is gone.
    #[error("unknown network {0}")]
    UnknownNetwork(NetworkId),
    /// No service of this name has an address in the network.
    #[error("no service {0:?} in this network")]
    UnknownService(String),
    /// The service has no wake hook.
    #[error("service {0:?} is not wakeable (no wake hook)")]
    NotWakeable(String),
    /// The service has an online instance: nothing to wake.
    #[error("service {service:?} has {online} online instance(s); nothing to wake")]
    Online {
        /// The service.
        service: String,
        /// Its online instances.
        online: usize,
    },
}

impl WakeError {
    /// The wire error code (all non-fatal).
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::UnknownService(_) => ErrorCode::InvalidMetadata,
            Self::UnknownNetwork(_) | Self::NotWakeable(_) | Self::Online { .. } => {
                ErrorCode::Forbidden
            }
        }
    }
}

/// A change of an address's settings, parsed and checked (see
/// [`AddressPatch::settings`]). `None` leaves a setting as it is;
/// `Some(None)` removes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressSettings {
    /// The wake hook.
    pub wake: Option<Option<WakeHook>>,
    /// The wake timeout, seconds (1–3600); needs a wake hook.
    pub wake_timeout_secs: Option<u16>,
    /// `idle-after`, seconds (1 s to 30 days).
    pub idle_after_secs: Option<Option<u32>>,
    /// The idle hook; needs `idle-after`.
    pub idle_hook: Option<Option<WakeHook>>,
}

/// The body of `PATCH …/addresses/{service}`: every field optional,
/// `null` removes a hook or `idle_after_secs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressPatch {
    /// `{"command": [...]}` or `{"url": "http://…"}`; `null` removes it.
    #[serde(default, deserialize_with = "present")]
    pub wake: Option<Option<WakeSpec>>,
    /// 1–3600; default 30 when a hook is first set.
    #[serde(default)]
    pub wake_timeout_secs: Option<i64>,
    /// Seconds without a new flow before the service is reported idle;
    /// `null` stops watching.
    #[serde(default, deserialize_with = "present")]
    pub idle_after_secs: Option<Option<i64>>,
    /// The hook run when the service turns idle (also accepted as
    /// `idle`); `null` removes it.
    #[serde(default, alias = "idle", deserialize_with = "present")]
    pub idle_hook: Option<Option<WakeSpec>>,
}

/// A field that is present (even `null`) becomes `Some`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

impl AddressPatch {
    /// Checks every value (hooks with [`check_wake`], the timeout with
    /// [`check_wake_timeout`], `idle-after` within 1 s to 30 days).
    pub fn settings(&self) -> Result<AddressSettings, AdminError> {
        let bad = |what: String| AdminError::BadAddress(what);
        let hook = |spec: &Option<WakeSpec>, what: &str| {
            spec.as_ref()
                .map(check_wake)
                .transpose()
                .map_err(|e| bad(format!("{what}: {e}")))
        };
        let wake = self.wake.as_ref().map(|w| hook(w, "wake")).transpose()?;
        let idle_hook = self
            .idle_hook
            .as_ref()
            .map(|w| hook(w, "idle"))
            .transpose()?;
        let wake_timeout_secs = self
            .wake_timeout_secs
            .map(|t| {
                check_wake_timeout(t)
                    .ok()
                    .and_then(|t| u16::try_from(t).ok())
                    .ok_or_else(|| bad(format!("wake_timeout_secs {t} is outside 1-3600")))
            })
            .transpose()?;
        let idle_after_secs = self
            .idle_after_secs
            .map(|v| {
                v.map(|secs| {
                    u32::try_from(secs)
                        .ok()
                        .filter(|s| (1..=MAX_IDLE_AFTER_SECS).contains(s))
                        .ok_or_else(|| {
                            bad(format!(
                                "idle_after_secs {secs} is outside 1-{MAX_IDLE_AFTER_SECS}"
                            ))
                        })
                })
                .transpose()
            })
            .transpose()?;
        Ok(AddressSettings {
            wake,
            wake_timeout_secs,
            idle_after_secs,
            idle_hook,
        })
    }
}

/// A service address as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressInfo {
    /// The stored address, settings and state.
    #[serde(flatten)]
    pub record: AddressRecord,
    /// Online instances the address balances over now.
    pub online: usize,
    /// A wake is under way: started within the wake timeout, and no
    /// instance online yet.
    pub waking: bool,
    /// The service is idle (no flow for `idle-after`; see `idle_since`).
    pub idle: bool,
}

/// Applies `s` to a copy of `rec`; the copy, or why the settings do not fit.
fn apply_settings(
    rec: &AddressRecord,
    s: &AddressSettings,
    now: u64,
) -> Result<AddressRecord, AdminError> {
    let bad = |what: &str| Err(AdminError::BadAddress(what.to_owned()));
    let mut r = rec.clone();
    match &s.wake {
        Some(Some(hook)) => {
            if r.wake.as_ref() != Some(hook) {
                // A new hook has not run yet.
                r.waking_since = None;
            }
            r.wake = Some(hook.clone());
            let t = s
                .wake_timeout_secs
                .or(r.address.wake_timeout_secs)
                .unwrap_or(DEFAULT_WAKE_TIMEOUT_SECS);
            r.address.wake_timeout_secs = Some(t);
        }
        Some(None) if s.wake_timeout_secs.is_some() => {
            return bad("wake_timeout_secs needs a wake hook; this request removes it")
        }
        Some(None) => {
            r.wake = None;
            r.address.wake_timeout_secs = None;
            r.waking_since = None;
        }
        None => match (s.wake_timeout_secs, r.wake.is_some()) {
            (Some(t), true) => r.address.wake_timeout_secs = Some(t),
            (Some(_), false) => return bad("wake_timeout_secs needs a wake hook: set `wake` too"),
            (None, _) => {}
        },
    }
    if let Some(idle_after) = s.idle_after_secs {
        if idle_after != r.idle_after_secs {
            r.idle_after_secs = idle_after;
            r.watch_since = idle_after.map(|_| now);
            r.idle_since = None;
        }
    }
    if let Some(hook) = &s.idle_hook {
        r.idle_hook.clone_from(hook);
    }
    if r.idle_hook.is_some() && r.idle_after_secs.is_none() {
        return bad("an idle hook needs idle_after_secs");
    }
    Ok(r)
}

impl Network {
    /// Online members of `service` (the instances its address balances
    /// over, whatever their process type).
    pub(super) fn online_of(&self, service: &str) -> usize {
        self.members
            .values()
            .filter(|r| r.member.service == service && r.member.is_online())
            .count()
    }

    fn address_info(&self, rec: &AddressRecord, now: u64) -> AddressInfo {
        let online = self.online_of(&rec.address.service);
        let timeout = u64::from(rec.address.wake_timeout_secs.unwrap_or(0));
        AddressInfo {
            waking: online == 0
                && rec.wake.is_some()
                && rec.waking_since.is_some_and(|t| now < t + timeout),
            idle: rec.idle_since.is_some(),
            online,
            record: rec.clone(),
        }
    }

    fn hook_job(&self, rec: &AddressRecord, kind: HookKind, hook: WakeHook) -> HookJob {
        let timeout = match kind {
            HookKind::Wake => Duration::from_secs(
                rec.address
                    .wake_timeout_secs
                    .unwrap_or(DEFAULT_WAKE_TIMEOUT_SECS)
                    .into(),
            ),
            HookKind::Idle => IDLE_HOOK_TIMEOUT,
        };
        HookJob {
            kind,
            network: self.rec.id,
            network_name: self.rec.name.clone(),
            service: rec.address.service.clone(),
            ip: rec.address.ip,
            hook,
            timeout,
        }
    }
}

impl Registry {
    /// A network's service addresses with their settings and state, by
    /// service name.
    pub fn addresses(
        &self,
        network: NetworkId,
        now: SystemTime,
    ) -> Result<Vec<AddressInfo>, AdminError> {
        let net = self
            .networks
            .get(&network)
            .ok_or_else(|| AdminError::UnknownNetwork(network.to_string()))?;
        let now = unix(now);
        Ok(net
            .rec
            .addresses
            .values()
            .map(|a| net.address_info(a, now))
            .collect())
    }

    /// One service address.
    pub fn address(
        &self,
        network: NetworkId,
        service: &str,
        now: SystemTime,
    ) -> Result<AddressInfo, AdminError> {
        let net = self
            .networks
            .get(&network)
            .ok_or_else(|| AdminError::UnknownNetwork(network.to_string()))?;
        let rec = net
            .rec
            .addresses
            .get(service)
            .ok_or_else(|| AdminError::UnknownAddress(service.to_owned()))?;
        Ok(net.address_info(rec, unix(now)))
    }

    /// Changes a service address's wake and idle settings. A change of
    /// what members see (the address becomes wakeable or not, its wake
    /// timeout) is pushed ([`MapChange::AddressUpsert`]); the rest is only
    /// stored. Nothing changes on error.
    pub fn set_address(
        &mut self,
        network: NetworkId,
        service: &str,
        settings: &AddressSettings,
        now: SystemTime,
    ) -> Result<(AddressInfo, Vec<StoreOp>, Vec<Change>), AdminError> {
        let log_cap = self.log_cap;
        let net = self
            .networks
            .get_mut(&network)
            .ok_or_else(|| AdminError::UnknownNetwork(network.to_string()))?;
        let old = net
            .rec
            .addresses
            .get(service)
            .ok_or_else(|| AdminError::UnknownAddress(service.to_owned()))?;
        let new = apply_settings(old, settings, unix(now))?;
        if new == *old {
            return Ok((net.address_info(old, unix(now)), vec![], vec![]));
        }
        let pushed = new.address != old.address;
        let address = new.address.clone();
        net.rec.addresses.insert(service.to_owned(), new);
        let (ops, changes) = if pushed {
            let (change, op) = net.record(vec![MapChange::AddressUpsert(address)], None, log_cap);
            (vec![op], vec![change])
        } else {
            (vec![StoreOp::PutNetwork(net.rec.clone())], vec![])
        };
        let info = net.address_info(&net.rec.addresses[service], unix(now));
        Ok((info, ops, changes))
    }

    /// A member asks to wake `service` of its network. The first request
    /// (and the first after the wake timeout, with still no instance
    /// online) records the wake in the address's record and returns the
    /// hook to run; one within the timeout finds it recorded and does
    /// nothing. A request counts as a flow (the service is not idle).
    /// Refused, with nothing changed: an unknown network or service, a
    /// service without a wake hook, or one with an online instance.
    pub fn request_wake(
        &mut self,
        network: NetworkId,
        service: &str,
        now: SystemTime,
    ) -> Result<(Wake, Vec<StoreOp>), WakeError> {
        let now = unix(now);
        let net = self
            .networks
            .get_mut(&network)
            .ok_or(WakeError::UnknownNetwork(network))?;
        let online = net.online_of(service);
        let rec = net
            .rec
            .addresses
            .get(service)
            .ok_or_else(|| WakeError::UnknownService(service.to_owned()))?;
        let (Some(hook), Some(timeout)) = (rec.wake.clone(), rec.address.wake_timeout_secs) else {
            return Err(WakeError::NotWakeable(service.to_owned()));
        };
        if online > 0 {
            return Err(WakeError::Online {
                service: service.to_owned(),
                online,
            });
        }
        if let Some(since) = rec.waking_since.filter(|t| now < t + u64::from(timeout)) {
            return Ok((Wake::Waking(since), vec![]));
        }
        let mut rec = rec.clone();
        rec.waking_since = Some(now);
        rec.last_flow = Some(now);
        rec.idle_since = None;
        let job = net.hook_job(&rec, HookKind::Wake, hook);
        net.rec.addresses.insert(service.to_owned(), rec);
        Ok((Wake::Run(job), vec![StoreOp::PutNetwork(net.rec.clone())]))
    }

    /// Members reported flows to `services` of `network` at `now`: each
    /// stops being idle, and its stored `last_flow` moves to `now` when it
    /// is older than [`AddressRecord::flow_granularity`]. Returns the
    /// network's write, if anything changed (services without an address
    /// are skipped).
    pub fn note_flows(
        &mut self,
        network: NetworkId,
        services: &[String],
        now: SystemTime,
    ) -> Vec<StoreOp> {
        let now = unix(now);
        let Some(net) = self.networks.get_mut(&network) else {
            return vec![];
        };
        let mut changed = false;
        for s in services {
            let Some(rec) = net.rec.addresses.get_mut(s) else {
                continue;
            };
            let stale = rec
                .last_flow
                .is_none_or(|t| now >= t.saturating_add(rec.flow_granularity()));
            if stale || rec.idle_since.is_some() {
                rec.last_flow = Some(rec.last_flow.map_or(now, |t| t.max(now)));
                rec.idle_since = None;
                changed = true;
            }
        }
        if changed {
            vec![StoreOp::PutNetwork(net.rec.clone())]
        } else {
            vec![]
        }
    }

    /// Whether [`Registry::note_flows`] would write anything (a read, so
    /// that a report that changes nothing takes no write path).
    pub fn flows_need_write(
        &self,
        network: NetworkId,
        services: &[String],
        now: SystemTime,
    ) -> bool {
        let now = unix(now);
        let Some(net) = self.networks.get(&network) else {
            return false;
        };
        services.iter().any(|s| {
            net.rec.addresses.get(s).is_some_and(|rec| {
                rec.idle_since.is_some()
                    || rec
                        .last_flow
                        .is_none_or(|t| now >= t.saturating_add(rec.flow_granularity()))
            })
        })
    }

    /// Marks idle every watched service with no flow for its `idle-after`
    /// (at most `limit` networks' writes): its `idle_since` is set, and
    /// its idle hook, if any, is returned to run (once per idle period).
    pub fn idle_sweep(&mut self, now: SystemTime, limit: usize) -> (Vec<HookJob>, Vec<StoreOp>) {
        let now = unix(now);
        let (mut jobs, mut ops) = (Vec::new(), Vec::new());
        for net in self.networks.values_mut() {
            if ops.len() >= limit {
                break;
            }
            let due: Vec<String> = net
                .rec
                .addresses
                .values()
                .filter(|r| turned_idle(r, now))
                .map(|r| r.address.service.clone())
                .collect();
            if due.is_empty() {
                continue;
            }
            for service in due {
                let Some(rec) = net.rec.addresses.get_mut(&service) else {
                    continue;
                };
                rec.idle_since = Some(now);
                let rec = rec.clone();
                if let Some(hook) = rec.idle_hook.clone() {
                    jobs.push(net.hook_job(&rec, HookKind::Idle, hook));
                }
            }
            ops.push(StoreOp::PutNetwork(net.rec.clone()));
        }
        (jobs, ops)
    }

    /// Every watched service (`idle-after` set) with whether it is idle,
    /// by network id, for metrics; at most `limit`.
    pub fn idle_states(&self, limit: usize) -> Vec<(String, String, bool)> {
        let mut out: Vec<(String, String, bool)> = self
            .networks
            .iter()
            .flat_map(|(id, n)| {
                n.rec
                    .addresses
                    .values()
                    .filter(|r| r.idle_after_secs.is_some())
                    .map(move |r| {
                        (
                            id.to_string(),
                            r.address.service.clone(),
                            r.idle_since.is_some(),
                        )
                    })
            })
            .collect();
        out.sort();
        out.truncate(limit);
        out
    }

    /// Whether `service` is a service of `network`: it has an address or a
    /// member (what a traffic report may name).
    pub fn has_service(&self, network: NetworkId, service: &str) -> bool {
        self.networks.get(&network).is_some_and(|n| {
            n.rec.addresses.contains_key(service) || n.catalog.service_app(service).is_some()
        })
    }
}

/// Whether a watched, not yet idle address has had no flow for its
/// `idle-after` at `now`. The stored `last_flow` may be up to
/// [`AddressRecord::flow_granularity`] older than the last flow (it is
/// written that coarsely), so it counts as that much later: a service is
/// never judged idle early, at most that late.
fn turned_idle(r: &AddressRecord, now: u64) -> bool {
    let Some(after) = r.idle_after_secs else {
        return false;
    };
    if r.idle_since.is_some() {
        return false;
    }
    let flow = r.last_flow.map(|t| t.saturating_add(r.flow_granularity()));
    let since = [flow, r.watch_since, r.waking_since]
        .into_iter()
        .flatten()
        .max();
    since.is_some_and(|t| now >= t.saturating_add(u64::from(after)))
}
