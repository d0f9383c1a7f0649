//! Private DNS answers, on the wire (hickory-proto): a query's bytes in, a
//! response's bytes out, or "forward this upstream". Pure: the sidecar's DNS
//! driver owns the sockets and the upstream forwarding.
//!
//! Names in our zones (`internal.`, `private-network.internal.`, `warp.`,
//! and override hostnames) are answered authoritatively from a
//! [`NameIndex`]:
//! - A records with the configured TTL (30 s by default);
//! - at each zone apex, its SOA and NS records ([`NAMESERVER`] names this
//!   server; it answers the server's own address when known);
//! - NODATA (NOERROR, no answer, the zone's SOA in the authority section) for
//!   other types of existing names and for names that exist only as parents
//!   of others (RFC 8020);
//! - NXDOMAIN with the SOA for names that do not exist, so that resolvers
//!   cache the negative answer no longer than the TTL;
//! - BADVERS (extended RCODE 16, RFC 6891) for EDNS versions other than 0.
//!
//! Every other name is forwarded. Because the index is rebuilt on every
//! network-map change, an answer changes the moment the change arrives.

use std::net::IpAddr;
use std::str::FromStr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::names::{normalize, zone_of, Lookup, NameIndex};

/// Default TTL of our answers (seed 003), in seconds.
pub const DEFAULT_TTL: u32 = 30;

/// The name of this server in the NS and SOA records of our zones. It cannot
/// collide with a member's name (instance names are one label under
/// `internal.`), and it answers the server's own address.
pub const NAMESERVER: &str = "ns.ist-mesh.internal.";
/// The SOA's responsible-person mailbox (`hostmaster@ist-mesh.internal`).
const HOSTMASTER: &str = "hostmaster.ist-mesh.internal.";
/// SOA expire: meaningless without secondaries, but a conventional value.
const SOA_EXPIRE: i32 = 86_400;

/// Largest UDP response we send without EDNS (RFC 1035).
const UDP_BASE_SIZE: usize = 512;
/// Largest UDP payload we use even if a client offers more (DNS flag day 2020).
const UDP_MAX_SIZE: usize = 1232;

/// The EDNS version we implement (RFC 6891).
const EDNS_VERSION: u8 = 0;

/// How the query arrived: it bounds the response size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP: 512 bytes, or the client's EDNS size up to 1232; larger answers
    /// are sent truncated (TC) so the client retries over TCP.
    Udp,
    /// TCP: up to 65535 bytes.
    Tcp,
}

/// What the answering server says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authority {
    /// TTL of every record, and the SOA's negative-caching time. Default
    /// [`DEFAULT_TTL`].
    pub ttl: u32,
    /// The address the server listens on, answered for [`NAMESERVER`] (and
    /// given as glue with NS answers). `None`: the name exists but has no
    /// address (e.g. when listening on a wildcard address).
    pub address: Option<IpAddr>,
}

impl Default for Authority {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            address: None,
        }
    }
}

/// A response ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The wire bytes.
    pub bytes: Vec<u8>,
    /// Its (extended, 12-bit) RCODE, for counting; see [`rcode_label`].
    pub rcode: u16,
}

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Send this response back.
    Respond(Response),
    /// Not our name: relay the query, unchanged, to the upstream resolvers.
    Forward,
    /// Not worth an answer (a response, or too short to hold a header).
    Drop,
}

/// The conventional name of an RCODE, as metrics label it (`NOERROR`,
/// `NXDOMAIN`, `BADVERS`, ...; `OTHER` for codes we never send).
pub fn rcode_label(rcode: u16) -> &'static str {
    match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        16 => "BADVERS",
        _ => "OTHER",
    }
}

/// Every label [`rcode_label`] gives, in RCODE order.
pub const RCODE_LABELS: [&str; 8] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS", "OTHER",
];

/// The RCODE of a response's bytes: the header's 4 bits (the extended bits
/// of an OPT record are not looked for; upstream answers are counted by
/// their header). `None` without a header.
pub fn rcode_of(response: &[u8]) -> Option<u16> {
    response.get(3).map(|b| u16::from(b & 0x0f))
}

/// Answers one DNS message from `index`.
pub fn handle(
    query: &[u8],
    index: &NameIndex,
    authority: &Authority,
    transport: Transport,
) -> Reply {
    let request = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => return formerr_from_header(query),
    };
    if request.message_type() != MessageType::Query {
        return Reply::Drop;
    }
    let mut response = response_to(&request);
    if request
        .extensions()
        .as_ref()
        .is_some_and(|e| e.version() != EDNS_VERSION)
    {
        response.add_queries(request.queries().iter().cloned());
        response.set_response_code(ResponseCode::BADVERS);
        return encode(response, &request, transport);
    }
    if request.op_code() != OpCode::Query {
        response.set_response_code(ResponseCode::NotImp);
        return encode(response, &request, transport);
    }
    let [question] = request.queries() else {
        response.set_response_code(ResponseCode::FormErr);
        return encode(response, &request, transport);
    };
    let qname = question.name();
    let key = normalize(&qname.to_ascii());
    let lookup =
        own_lookup(&key, authority).unwrap_or_else(|| OwnLookup::Index(index.lookup(&key)));
    if lookup == OwnLookup::Index(Lookup::NotOurs) {
        return Reply::Forward;
    }
    response.add_query(question.clone());
    response.set_authoritative(true);
    if !matches!(question.query_class(), DNSClass::IN | DNSClass::ANY) {
        response.set_response_code(ResponseCode::Refused);
        return encode(response, &request, transport);
    }
    let zone = zone_name(&key, qname);
    let soa = soa_record(&zone, authority.ttl, index.generation());
    let qtype = question.query_type();
    let any = qtype == RecordType::ANY;
    let mut answers: Vec<Record> = Vec::new();
    match lookup {
        OwnLookup::Index(Lookup::Found(ips)) if any || qtype == RecordType::A => {
            answers.extend(
                ips.iter()
                    .map(|ip| record(qname, authority.ttl, RData::A(A(*ip)))),
            );
        }
        OwnLookup::Server(Some(ip)) if any || qtype == record_type_of(ip) => {
            answers.push(record(qname, authority.ttl, address_rdata(ip)));
        }
        OwnLookup::Index(Lookup::NxDomain | Lookup::NotOurs) => {
            response.set_response_code(ResponseCode::NXDomain);
        }
        _ => {}
    }
    if key == normalize(&zone.to_ascii()) {
        if any || qtype == RecordType::SOA {
            answers.push(soa.clone());
        }
        if any || qtype == RecordType::NS {
            answers.push(ns_record(&zone, authority.ttl));
            if let Some(ip) = authority.address {
                response.add_additional(nameserver_record(authority.ttl, ip));
            }
        }
    }
    if answers.is_empty() {
        // NODATA or NXDOMAIN: the SOA tells how long to cache the absence.
        response.add_name_server(soa);
    }
    response.add_answers(answers);
    encode(response, &request, transport)
}

/// A lookup result that also covers the server's own name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnLookup<'a> {
    /// A name of the index.
    Index(Lookup<'a>),
    /// [`NAMESERVER`]: the server's address, if known.
    Server(Option<IpAddr>),
}

/// [`NAMESERVER`] and its parent, which exist whatever the map holds (an
/// instance named `ist-mesh` keeps its own records).
fn own_lookup<'a>(key: &str, authority: &Authority) -> Option<OwnLookup<'a>> {
    if key == NAMESERVER {
        return Some(OwnLookup::Server(authority.address));
    }
    let parent = NAMESERVER.split_once('.').map(|(_, p)| p);
    (Some(key) == parent).then_some(OwnLookup::Index(Lookup::Empty))
}

fn record_type_of(ip: IpAddr) -> RecordType {
    match ip {
        IpAddr::V4(_) => RecordType::A,
        IpAddr::V6(_) => RecordType::AAAA,
    }
}

fn address_rdata(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(a) => RData::A(A(a)),
        IpAddr::V6(a) => RData::AAAA(AAAA(a)),
    }
}

/// A response header mirroring the request's id, opcode and RD bit. RA is
/// set: what is not ours is forwarded.
fn response_to(request: &Message) -> Message {
    let mut m = Message::new();
    m.set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true);
    m
}

/// FORMERR for a message that does not parse, if at least its header does.
fn formerr_from_header(query: &[u8]) -> Reply {
    // A header is 12 bytes; QR is the top bit of byte 2.
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return Reply::Drop;
    }
    let id = u16::from_be_bytes([query[0], query[1]]);
    let m = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
    m.to_vec().map_or(Reply::Drop, |bytes| {
        Reply::Respond(Response {
            bytes,
            rcode: u16::from(ResponseCode::FormErr),
        })
    })
}

fn record(name: &Name, ttl: u32, rdata: RData) -> Record {
    Record::from_rdata(name.clone(), ttl, rdata)
}

fn name(text: &str) -> Name {
    Name::from_str(text).unwrap_or_else(|_| Name::root())
}

/// The apex of the zone `key` is in (`private-network.internal.`,
/// `internal.`, `warp.`), or for override hostnames outside them the name's
/// parent; spelled as the client spelled it where it is the name itself.
fn zone_name(key: &str, qname: &Name) -> Name {
    match zone_of(key) {
        Some(zone) if zone == key => qname.clone(),
        Some(zone) => name(zone),
        None => qname.base_name(),
    }
}

/// The zone's SOA: this server as primary, `serial` (the map generation,
/// modulo 2^32) as serial, the TTL as refresh, retry and negative-cache time.
fn soa_record(zone: &Name, ttl: u32, serial: u64) -> Record {
    let t = i32::try_from(ttl).unwrap_or(i32::MAX);
    let soa = SOA::new(
        name(NAMESERVER),
        name(HOSTMASTER),
        serial as u32,
        t,
        t,
        SOA_EXPIRE,
        ttl,
    );
    record(zone, ttl, RData::SOA(soa))
}

fn ns_record(zone: &Name, ttl: u32) -> Record {
    record(zone, ttl, RData::NS(NS(name(NAMESERVER))))
}

fn nameserver_record(ttl: u32, ip: IpAddr) -> Record {
    record(&name(NAMESERVER), ttl, address_rdata(ip))
}

/// Serializes `response`, echoing EDNS and truncating to the transport's size.
fn encode(mut response: Message, request: &Message, transport: Transport) -> Reply {
    let limit = match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => match request.extensions() {
            Some(edns) => usize::from(edns.max_payload()).clamp(UDP_BASE_SIZE, UDP_MAX_SIZE),
            None => UDP_BASE_SIZE,
        },
    };
    if request.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_MAX_SIZE as u16);
        edns.set_version(EDNS_VERSION);
        response.set_edns(edns);
    }
    let rcode = u16::from(response.response_code());
    let Ok(bytes) = response.to_vec() else {
        return Reply::Drop;
    };
    if bytes.len() <= limit {
        return Reply::Respond(Response { bytes, rcode });
    }
    // Too big: the header and question only, with TC, so the client retries over TCP.
    let mut truncated = response.truncate();
    truncated.set_truncated(true);
    truncated.to_vec().map_or(Reply::Drop, |bytes| {
        Reply::Respond(Response { bytes, rcode })
    })
}

/// SERVFAIL for `query` (its id, opcode, RD bit and question), for when no
/// upstream answers. `None` if the query does not parse.
pub fn servfail_for(query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let mut response = response_to(&request);
    response.set_response_code(ResponseCode::ServFail);
    response.add_queries(request.queries().iter().cloned());
    response.to_vec().ok()
}

/// The upstream resolvers of a `resolv.conf` text: its `nameserver` lines,
/// port 53, in order. Malformed lines and comments are skipped; IPv6 zone
/// suffixes (`fe80::1%eth0`) are not supported and skipped.
pub fn parse_resolv_conf(text: &str) -> Vec<std::net::SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let ip: std::net::IpAddr = words.next()?.parse().ok()?;
            Some(std::net::SocketAddr::new(ip, 53))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ist::config::Overrides;
    use crate::ist::table::IstTable;
    use crate::netmap::tests::{empty_map, member};
    use hickory_proto::op::Query;

    fn index(n: u8) -> NameIndex {
        let mut map = empty_map();
        for i in 1..=n {
            let m = member(&format!("api-{i}"), "api", "web", u32::from(i), i);
            map.members.insert(m.public_key, m);
        }
        NameIndex::build(
            &map,
            &IstTable::build(map.services(), &Overrides::default()),
        )
    }

    fn query(name: &str, rtype: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(4242).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(4096);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn answer(q: &[u8], idx: &NameIndex, t: Transport) -> Message {
        match handle(q, idx, &Authority::default(), t) {
            Reply::Respond(r) => Message::from_vec(&r.bytes).unwrap(),
            other => panic!("expected a response, got {other:?}"),
        }
    }

    #[test]
    fn a_records_with_ttl_and_case_preserved() {
        let idx = index(2);
        let r = answer(
            &query("API.warp.", RecordType::A, false),
            &idx,
            Transport::Udp,
        );
        assert_eq!(r.id(), 4242);
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert!(r.authoritative() && r.recursion_desired());
        let ips: Vec<String> = r.answers().iter().map(|a| a.data().to_string()).collect();
        assert_eq!(ips, ["10.240.0.1", "10.240.0.2"]);
        let names: Vec<(u32, String)> = r
            .answers()
            .iter()
            .map(|a| (a.ttl(), a.name().to_string()))
            .collect();
        assert_eq!(
            names,
            [(30, "API.warp.".to_string()), (30, "API.warp.".to_string())]
        );
    }

    #[test]
    fn nxdomain_nodata_and_forward() {
        let idx = index(1);
        let r = answer(
            &query("ghost.internal.", RecordType::A, false),
            &idx,
            Transport::Udp,
        );
        assert_eq!(r.response_code(), ResponseCode::NXDomain);
        assert_eq!(r.name_servers()[0].record_type(), RecordType::SOA);
        assert_eq!(r.name_servers()[0].name().to_ascii(), "internal.");
        let r = answer(
            &query("api-1.internal.", RecordType::AAAA, false),
            &idx,
            Transport::Udp,
        );
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert!(r.answers().is_empty());
        assert_eq!(
            handle(
                &query("example.com.", RecordType::A, false),
                &idx,
                &Authority::default(),
                Transport::Udp
            ),
            Reply::Forward
        );
    }

    #[test]
    fn big_answers_truncate_on_udp_and_fit_on_tcp() {
        let idx = index(200);
        let q = query("api.warp.", RecordType::A, false);
        let r = answer(&q, &idx, Transport::Udp);
        assert!(r.truncated() && r.answers().is_empty());
        let r = answer(
            &query("api.warp.", RecordType::A, true),
            &idx,
            Transport::Udp,
        );
        assert!(r.truncated(), "200 A records exceed 1232 bytes");
        let r = answer(&q, &idx, Transport::Tcp);
        assert!(!r.truncated());
        assert_eq!(r.answers().len(), 200);
        // 60 records fit in EDNS's 1232 bytes, not in 512.
        let idx = index(60);
        let r = answer(
            &query("api.warp.", RecordType::A, true),
            &idx,
            Transport::Udp,
        );
        assert_eq!(r.answers().len(), 60);
        assert!(r.extensions().is_some());
    }

    #[test]
    fn resolv_conf() {
        let text = "# comment\nsearch example.com\nnameserver 192.0.2.53\nnameserver  2001:db8::53 # x\n;nameserver 1.1.1.1\nnameserver bogus\nnameserver fe80::1%eth0\nnameserver\n";
        let got: Vec<String> = parse_resolv_conf(text)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(got, ["192.0.2.53:53", "[2001:db8::53]:53"]);
    }

    #[test]
    fn malformed_input() {
        let idx = index(1);
        assert_eq!(
            handle(&[], &idx, &Authority::default(), Transport::Udp),
            Reply::Drop
        );
        assert_eq!(
            handle(&[1, 2, 3], &idx, &Authority::default(), Transport::Udp),
            Reply::Drop
        );
        // A valid header followed by garbage: FORMERR with the same id.
        let mut bad = query("api.warp.", RecordType::A, false);
        bad.truncate(15);
        let r = answer(&bad, &idx, Transport::Udp);
        assert_eq!((r.id(), r.response_code()), (4242, ResponseCode::FormErr));
        // A response is never answered (no loops).
        let mut resp = query("api.warp.", RecordType::A, false);
        resp[2] |= 0x80;
        assert_eq!(
            handle(&resp, &idx, &Authority::default(), Transport::Udp),
            Reply::Drop
        );
        // Two questions: FORMERR.
        let mut m = Message::from_vec(&query("api.warp.", RecordType::A, false)).unwrap();
        m.add_query(Query::query(
            Name::from_str("x.warp.").unwrap(),
            RecordType::A,
        ));
        let r = answer(&m.to_vec().unwrap(), &idx, Transport::Udp);
        assert_eq!(r.response_code(), ResponseCode::FormErr);
        // Another opcode: NOTIMP.
        let mut m = Message::from_vec(&query("api.warp.", RecordType::A, false)).unwrap();
        m.set_op_code(OpCode::Status);
        let r = answer(&m.to_vec().unwrap(), &idx, Transport::Udp);
        assert_eq!(r.response_code(), ResponseCode::NotImp);
    }

    fn answer_with(q: &[u8], idx: &NameIndex, auth: &Authority) -> (Message, u16) {
        match handle(q, idx, auth, Transport::Udp) {
            Reply::Respond(r) => (Message::from_vec(&r.bytes).unwrap(), r.rcode),
            other => panic!("expected a response, got {other:?}"),
        }
    }

    const PN: &str = "pn-ad0fd6a1-d05e-40ea-bf63-c4f8a75a9d8c";

    #[test]
    fn soa_and_ns_at_every_apex() {
        let idx = index(1);
        let auth = Authority {
            ttl: 45,
            address: Some("127.0.0.77".parse().unwrap()),
        };
        for zone in ["internal.", "warp.", "private-network.internal."] {
            let (r, rcode) = answer_with(&query(zone, RecordType::SOA, false), &idx, &auth);
            assert_eq!(rcode, 0);
            assert!(r.authoritative());
            let [soa] = r.answers() else {
                panic!("{zone}: {:?}", r.answers())
            };
            assert_eq!(soa.name().to_ascii(), zone);
            let Some(RData::SOA(data)) = soa.data().clone().into() else {
                panic!("not an SOA");
            };
            assert_eq!(data.mname().to_ascii(), NAMESERVER);
            assert_eq!((data.minimum(), soa.ttl()), (45, 45));
            let (r, _) = answer_with(&query(zone, RecordType::NS, false), &idx, &auth);
            let ns: Vec<String> = r.answers().iter().map(|a| a.data().to_string()).collect();
            assert_eq!(ns, [NAMESERVER]);
            // Glue: the server's own address.
            assert_eq!(r.additionals()[0].data().to_string(), "127.0.0.77");
            // A at the apex: NODATA with the SOA.
            let (r, rcode) = answer_with(&query(zone, RecordType::A, false), &idx, &auth);
            assert_eq!(rcode, 0);
            assert!(r.answers().is_empty());
            assert_eq!(r.name_servers()[0].record_type(), RecordType::SOA);
        }
        // The server's own name answers its address; its parent exists.
        let (r, _) = answer_with(&query(NAMESERVER, RecordType::A, false), &idx, &auth);
        assert_eq!(r.answers()[0].data().to_string(), "127.0.0.77");
        let (r, rcode) = answer_with(
            &query("ist-mesh.internal.", RecordType::A, false),
            &idx,
            &auth,
        );
        assert_eq!((rcode, r.answers().len()), (0, 0));
    }

    #[test]
    fn nodata_for_parents_nxdomain_below_them() {
        let idx = index(2);
        let auth = Authority::default();
        // A parent-only name (the network id) and a name with A records
        // (the app): both NODATA for AAAA.
        for name in [
            format!("{PN}.private-network.internal."),
            format!("API.{PN}.private-network.internal."),
        ] {
            let (r, rcode) = answer_with(&query(&name, RecordType::AAAA, false), &idx, &auth);
            assert_eq!(rcode, 0, "{name}");
            assert!(r.answers().is_empty());
            let soa = &r.name_servers()[0];
            assert_eq!(
                (soa.record_type(), soa.name().to_ascii()),
                (RecordType::SOA, "private-network.internal.".to_string())
            );
        }
        let (r, rcode) = answer_with(
            &query(
                &format!("{PN}.private-network.internal."),
                RecordType::A,
                false,
            ),
            &idx,
            &auth,
        );
        assert_eq!((rcode, r.answers().len()), (0, 0));
        let (r, rcode) = answer_with(
            &query(
                &format!("9.web.api.{PN}.private-network.internal."),
                RecordType::A,
                false,
            ),
            &idx,
            &auth,
        );
        assert_eq!(rcode, 3);
        assert_eq!(
            r.name_servers()[0].name().to_ascii(),
            "private-network.internal."
        );
    }

    #[test]
    fn edns_versions_other_than_0_get_badvers() {
        let idx = index(1);
        let mut m = Message::from_vec(&query("api.warp.", RecordType::A, true)).unwrap();
        let mut e = Edns::new();
        e.set_version(1);
        m.set_edns(e.clone());
        let (r, rcode) = answer_with(&m.to_vec().unwrap(), &idx, &Authority::default());
        assert_eq!(rcode, 16);
        assert_eq!(rcode_label(rcode), "BADVERS");
        // hickory names code 16 BADSIG when parsing (same number).
        assert_eq!(u16::from(r.response_code()), 16);
        assert_eq!(r.extensions().as_ref().map(|e| e.version()), Some(0));
        assert!(r.answers().is_empty());
        // Not forwarded either: we are the one speaking EDNS to the client.
        let mut m = Message::from_vec(&query("example.com.", RecordType::A, true)).unwrap();
        m.set_edns(e);
        let (_, rcode) = answer_with(&m.to_vec().unwrap(), &idx, &Authority::default());
        assert_eq!(rcode, 16);
        // Version 0 is answered normally.
        let (r, rcode) = answer_with(
            &query("api.warp.", RecordType::A, true),
            &idx,
            &Authority::default(),
        );
        assert_eq!((rcode, r.answers().len()), (0, 1));
    }

    #[test]
    fn rcodes_are_reported_and_labelled() {
        let idx = index(1);
        let auth = Authority::default();
        let (_, rcode) = answer_with(&query("ghost.warp.", RecordType::A, false), &idx, &auth);
        assert_eq!(rcode_label(rcode), "NXDOMAIN");
        let mut bad = query("api.warp.", RecordType::A, false);
        bad.truncate(15);
        let (_, rcode) = answer_with(&bad, &idx, &auth);
        assert_eq!(rcode_label(rcode), "FORMERR");
        assert_eq!(
            rcode_of(&servfail_for(&bad[..12]).unwrap_or_default()),
            None
        );
        let q = query("x.example.", RecordType::A, false);
        assert_eq!(rcode_of(&servfail_for(&q).unwrap()), Some(2));
        for code in 0..=20u16 {
            assert!(RCODE_LABELS.contains(&rcode_label(code)));
        }
    }
}
