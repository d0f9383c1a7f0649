//! Private DNS answers, on the wire (hickory-proto): a query's bytes in, a
//! response's bytes out, or "forward this upstream". Pure: the sidecar's DNS
//! driver owns the sockets and the upstream forwarding.
//!
//! Names in our zones (`.internal`, `.warp`, and override hostnames) are
//! answered authoritatively from a [`NameIndex`]: A records with the
//! configured TTL (30 s by default), NODATA for other types, NXDOMAIN for
//! names that do not exist, with an SOA record so that resolvers cache the
//! negative answer no longer than the TTL. Every other name is forwarded.
//! Because the index is rebuilt on every network-map change, an answer
//! changes the moment the change arrives.

use std::net::Ipv4Addr;
use std::str::FromStr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::names::{Lookup, NameIndex};

/// Default TTL of our answers (seed 003), in seconds.
pub const DEFAULT_TTL: u32 = 30;

/// Largest UDP response we send without EDNS (RFC 1035).
const UDP_BASE_SIZE: usize = 512;
/// Largest UDP payload we use even if a client offers more (DNS flag day 2020).
const UDP_MAX_SIZE: usize = 1232;

/// How the query arrived: it bounds the response size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP: 512 bytes, or the client's EDNS size up to 1232; larger answers
    /// are sent truncated (TC) so the client retries over TCP.
    Udp,
    /// TCP: up to 65535 bytes.
    Tcp,
}

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Send these bytes back.
    Respond(Vec<u8>),
    /// Not our name: relay the query, unchanged, to the upstream resolvers.
    Forward,
    /// Not worth an answer (a response, or too short to hold a header).
    Drop,
}

/// Answers one DNS message from `index`.
pub fn handle(query: &[u8], index: &NameIndex, ttl: u32, transport: Transport) -> Reply {
    let request = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => return formerr_from_header(query),
    };
    if request.message_type() != MessageType::Query {
        return Reply::Drop;
    }
    let mut response = response_to(&request);
    if request.op_code() != OpCode::Query {
        response.set_response_code(ResponseCode::NotImp);
        return encode(response, &request, transport);
    }
    let [question] = request.queries() else {
        response.set_response_code(ResponseCode::FormErr);
        return encode(response, &request, transport);
    };
    let qname = question.name();
    let lookup = index.lookup(&qname.to_ascii());
    if lookup == Lookup::NotOurs {
        return Reply::Forward;
    }
    response.add_query(question.clone());
    response.set_authoritative(true);
    let class_ok = matches!(question.query_class(), DNSClass::IN | DNSClass::ANY);
    match lookup {
        _ if !class_ok => {
            response.set_response_code(ResponseCode::Refused);
        }
        Lookup::Found(ips) if matches!(question.query_type(), RecordType::A | RecordType::ANY) => {
            for ip in ips {
                response.add_answer(a_record(qname, ttl, *ip));
            }
        }
        Lookup::Found(_) => {
            response.add_name_server(soa_record(qname, ttl));
        }
        Lookup::NxDomain | Lookup::NotOurs => {
            response.set_response_code(ResponseCode::NXDomain);
            response.add_name_server(soa_record(qname, ttl));
        }
    }
    encode(response, &request, transport)
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
    m.to_vec().map_or(Reply::Drop, Reply::Respond)
}

fn a_record(name: &Name, ttl: u32, ip: Ipv4Addr) -> Record {
    Record::from_rdata(name.clone(), ttl, RData::A(A(ip)))
}

/// The SOA of the zone `name` is in (`internal.`, `warp.`, or the name's
/// parent for override hostnames), with the TTL as negative-cache time.
fn soa_record(name: &Name, ttl: u32) -> Record {
    let zone = ["internal.", "warp."]
        .into_iter()
        .filter_map(|z| Name::from_str(z).ok())
        .find(|z| z.zone_of(name))
        .unwrap_or_else(|| name.base_name());
    let mname = Name::from_str("ns.ist-mesh.internal.").unwrap_or_else(|_| Name::root());
    let rname = Name::from_str("hostmaster.ist-mesh.internal.").unwrap_or_else(|_| Name::root());
    let soa = SOA::new(mname, rname, 1, ttl as i32, ttl as i32, 86_400, ttl);
    Record::from_rdata(zone, ttl, RData::SOA(soa))
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
        response.set_edns(edns);
    }
    let Ok(bytes) = response.to_vec() else {
        return Reply::Drop;
    };
    if bytes.len() <= limit {
        return Reply::Respond(bytes);
    }
    // Too big: the header and question only, with TC, so the client retries over TCP.
    let mut truncated = response.truncate();
    truncated.set_truncated(true);
    truncated.to_vec().map_or(Reply::Drop, Reply::Respond)
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
        match handle(q, idx, DEFAULT_TTL, t) {
            Reply::Respond(bytes) => Message::from_vec(&bytes).unwrap(),
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
                30,
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
        assert_eq!(handle(&[], &idx, 30, Transport::Udp), Reply::Drop);
        assert_eq!(handle(&[1, 2, 3], &idx, 30, Transport::Udp), Reply::Drop);
        // A valid header followed by garbage: FORMERR with the same id.
        let mut bad = query("api.warp.", RecordType::A, false);
        bad.truncate(15);
        let r = answer(&bad, &idx, Transport::Udp);
        assert_eq!((r.id(), r.response_code()), (4242, ResponseCode::FormErr));
        // A response is never answered (no loops).
        let mut resp = query("api.warp.", RecordType::A, false);
        resp[2] |= 0x80;
        assert_eq!(handle(&resp, &idx, 30, Transport::Udp), Reply::Drop);
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
}
