//! The OpenAPI 3.1 document of the admin API, hand-written next to the
//! routes it describes. Every operation lists every status it can answer;
//! every error is the shared `Error` schema (`{"error": "..."}`).

use serde_json::{json, Map, Value};

/// Statuses and what they mean, each a shared response with the `Error` body.
const ERRORS: [(&str, &str, &str); 12] = [
    (
        "400",
        "BadRequest",
        "invalid input (name, range, expiry, binding, query), or malformed JSON",
    ),
    (
        "401",
        "Unauthorized",
        "missing, wrong, revoked or expired bearer token",
    ),
    (
        "403",
        "Forbidden",
        "the token's role does not allow this (a viewer changing anything, an operator changing a network itself or API tokens, a tenant token reading backups); a network outside the token's tenant answers 404 instead",
    ),
    (
        "404",
        "NotFound",
        "no such network, member, token, service address or route; also a network outside the token's tenant (it does not exist for that token)",
    ),
    (
        "405",
        "MethodNotAllowed",
        "this path does not take this method (see the `Allow` header)",
    ),
    (
        "408",
        "RequestTimeout",
        "the request body did not arrive in time",
    ),
    (
        "409",
        "Conflict",
        "the name is taken (or looks like a taken one), or the network still has members",
    ),
    (
        "413",
        "PayloadTooLarge",
        "the request body is larger than the limit",
    ),
    (
        "415",
        "UnsupportedMediaType",
        "the body is not `application/json`",
    ),
    (
        "422",
        "UnprocessableEntity",
        "the JSON has a field of the wrong type, or an unknown field",
    ),
    (
        "500",
        "InternalError",
        "the store could not commit; nothing changed",
    ),
    ("503", "NotReady", "the store does not take writes"),
];

/// The responses of one operation: `ok` (status, description, schema or
/// `None` for no body) plus the listed error statuses.
fn responses(ok: (&str, &str, Option<Value>), errors: &[&str]) -> Value {
    let mut out = Map::new();
    let (status, description, schema) = ok;
    let mut success = json!({ "description": description });
    if let Some(schema) = schema {
        success["content"] = json!({"application/json": {"schema": schema}});
    }
    out.insert(status.into(), success);
    for code in errors {
        let (_, name, _) = ERRORS
            .iter()
            .find(|(c, _, _)| c == code)
            .expect("a listed status");
        out.insert(
            (*code).into(),
            json!({"$ref": format!("#/components/responses/{name}")}),
        );
    }
    Value::Object(out)
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn array_of(name: &str) -> Value {
    json!({"type": "array", "items": schema_ref(name)})
}

/// Unix time in seconds.
fn unix_seconds(what: &str) -> Value {
    json!({"type": "integer", "format": "int64", "minimum": 0, "description": format!("{what}, Unix time in seconds")})
}

/// A network's `expire-after`.
fn expire_after() -> Value {
    json!({"type": ["integer", "null"], "format": "int64", "minimum": 1, "description": "seconds an offline member is kept before it expires and its address is released; null: the keyserver's default (`expire-after-secs`, 24 h)"})
}

/// `expire_after` in a request body.
fn expire_text() -> Value {
    json!({"type": ["string", "null"], "description": "how long an offline member is kept before it expires (`90s`, `1h`, `7d`; 1 s to 3650 days); null or empty: the keyserver's default"})
}

/// A tenant name in a request body.
fn tenant_text(what: &str) -> Value {
    json!({"type": ["string", "null"], "pattern": "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", "description": what})
}

/// The shared schemas.
fn schemas() -> Value {
    let network_id = json!({"type": "string", "pattern": "^pn-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
        "description": "`pn-` followed by a UUID (lowercase, hyphenated)"});
    let label = json!({"type": "string", "pattern": "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", "maxLength": 63});
    let mut schemas = json!({
        "Error": {"type": "object", "properties": {"error": {"type": "string", "description": "what went wrong"},
            "rule": {"type": "string", "description": "service-group routes only: the seed-002 rule broken: `port-80-requires-http`, `port-80-forbids-tls`, `port-443-requires-http`, `port-443-requires-tls`, `redirect-only-on-port-80`, `other-ports-require-tls`, `other-ports-forbid-http`, `udp-takes-no-handlers`, `udp-requires-ip`, `udp-port-taken`, `port-range`, `port-twice`, `protocol`, `handler-name`, `handler-twice`, `ip`, `no-ports`, `too-many-ports`, `limit-range`, `soft-above-hard`, `wake`, `wake-timeout`, `name`, `fqdn`, `too-many-names`, `name-twice`"},
            "port": {"type": "integer", "format": "int64", "description": "service-group routes only: the published port the rule is about, when it is about one"}},
            "required": ["error"], "additionalProperties": false},
        "NetworkId": network_id,
        "Network": {"type": "object", "required": ["id", "name", "range", "generation", "created", "members"], "properties": {
            "id": schema_ref("NetworkId"),
            "name": {"type": "string", "minLength": 1, "maxLength": 64},
            "range": {"type": "string", "format": "cidr", "description": "IPv4 prefix, /16 to /30, e.g. `10.240.0.0/22`"},
            "generation": {"type": "integer", "format": "int64", "minimum": 0, "description": "network-map generation"},
            "created": unix_seconds("creation time"),
            "expire_after": expire_after(),
            "service_range": {"type": ["string", "null"], "format": "cidr", "description": "where service addresses come from; null: the default, the block of the same size after `range` (`10.240.4.0/22` for `10.240.0.0/22`)"},
            "addresses": {"type": "object", "additionalProperties": schema_ref("ServiceAddress"), "description": "every service's own address (its VIP), by service name: what `<service>.warp` and `WARP_IST_*` give; kept while the network exists"},
            "tenant": {"type": "string", "description": "the tenant the network belongs to (absent: none; only global tokens see it)"},
            "members": {"type": "integer", "format": "int64", "minimum": 0}}},
        "NewNetwork": {"type": "object", "required": ["id", "name", "range", "generation", "created"], "properties": {
            "id": schema_ref("NetworkId"),
            "name": {"type": "string"},
            "range": {"type": "string", "format": "cidr"},
            "generation": {"type": "integer", "format": "int64", "minimum": 0},
            "created": unix_seconds("creation time"),
            "expire_after": expire_after(),
            "service_range": {"type": ["string", "null"], "format": "cidr"},
            "tenant": {"type": "string"},
            "addresses": {"type": "object", "additionalProperties": schema_ref("ServiceAddress")}}},
        "Member": {"type": "object", "required": ["public_key", "ip", "endpoints", "service", "app_id", "process_type", "index", "instance", "runner", "ports", "state", "joined", "last_seen"], "properties": {
            "public_key": {"type": "string", "format": "byte", "description": "WireGuard public key, base64 (44 characters)"},
            "ip": {"type": "string", "format": "ipv4"},
            "endpoints": {"type": "array", "items": {"type": "string", "description": "underlay `ip:port` (IPv6 as `[ip]:port`)"}},
            "service": {"type": "string", "minLength": 1, "maxLength": 128},
            "app_id": label.clone(),
            "process_type": label.clone(),
            "index": {"type": "integer", "format": "int32", "minimum": 1},
            "instance": label,
            "runner": {"type": "string", "maxLength": 128},
            "ports": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 65535}, "description": "ports the instance serves"},
            "state": {"type": "string", "enum": ["online", "offline"], "description": "online while heartbeats arrive; offline after a graceful stop or `offline-after` of silence (address, index and name kept; invisible to peers' names and peer lists)"},
            "joined": unix_seconds("join time"),
            "last_seen": unix_seconds("last contact"),
            "offline_since": {"type": ["integer", "null"], "format": "int64", "minimum": 0, "description": "when the member went offline, Unix time in seconds; it expires `expire-after` later (`ephemeral-after` if ephemeral)"},
            "ephemeral": {"type": "boolean", "description": "freed `ephemeral-after` after going offline; while offline a new instance of its type takes its slot over"}}},
        "NameEntry": {"type": "object", "required": ["name", "kind", "alias", "answers"], "properties": {
            "name": {"type": "string", "description": "the private name, lowercase, with the trailing dot"},
            "kind": {"type": "string", "enum": ["instance", "app", "type", "numbered", "warp"],
                "description": "`<instance>.internal.`, `<app>.<pn>.private-network.internal.` (web members), `<type>.<app>.<pn>…`, `<n>.<type>.<app>.<pn>…` (the n-th), `<encoded-service>.warp.` (seed 004)"},
            "alias": {"type": "boolean", "description": "a seed-003 name spelled with the service's `.warp` label for the app id or the network's name for its id (the sidecars serve both spellings)"},
            "service": {"type": "string", "description": "`.warp` names only: the service named"},
            "answers": {"type": "array", "description": "the A records members' DNS answers now (private addresses; a userspace-mode sidecar answers its own loopback stand-ins for them)",
                "items": {"type": "object", "required": ["ip"], "properties": {
                    "ip": {"type": "string", "format": "ipv4"}, "instance": {"type": "string", "description": "the online member holding the address (absent for a service address)"},
                    "service_address": {"type": "string", "description": "for a service address: the service whose own address it is"}}}}}},
        "NameListing": {"type": "object", "required": ["network", "name", "generation", "names", "warnings"], "properties": {
            "network": schema_ref("NetworkId"),
            "name": {"type": "string", "description": "the network's name"},
            "generation": {"type": "integer", "format": "int64", "minimum": 0, "description": "the map generation the names were computed from"},
            "names": {"type": "array", "items": schema_ref("NameEntry"), "description": "every name of the online members: instance names, seed-003 names (ids, then aliases), `.warp` names; offline members are not named"},
            "warnings": {"type": "array", "items": {"type": "string"}, "description": "why a service has no `.warp` name (two services encoding to one hostname or variable)"}}},
        "MemberDetail": {"description": "a `Member` plus these (its `names` with their answers, where the listing has name strings)", "allOf": [schema_ref("Member"),
            {"type": "object", "required": ["network", "generation", "names"], "properties": {
                "network": schema_ref("NetworkId"),
                "generation": {"type": "integer", "format": "int64", "minimum": 0, "description": "the map generation `names` were computed from"},
                "names": {"type": "array", "items": schema_ref("NameEntry"), "description": "every name that answers this member now; empty while it is offline"}}}]},
        "Token": {"type": "object", "required": ["id", "network", "uses_left", "expires", "service", "process_type"], "properties": {
            "id": {"type": "string", "pattern": "^tk-[0-9a-f]{12}$"},
            "network": schema_ref("NetworkId"),
            "uses_left": {"type": "integer", "format": "int64", "minimum": 0},
            "expires": unix_seconds("expiry"),
            "service": {"type": ["string", "null"], "maxLength": 128},
            "process_type": {"type": ["string", "null"]},
            "token": {"type": "string", "pattern": "^istm1\\.", "description": "the join token, only in the creation answer"},
            "service_group": {"type": ["string", "null"], "description": "service group its members are attached to"},
            "ephemeral": {"type": "boolean", "description": "every member joining with it is ephemeral"}}},
        "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
        "ServicePort": {"type": "object", "required": ["port"], "additionalProperties": false, "properties": {
            "port": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 65535, "description": "external port on the gateways"},
            "destination_port": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 65535, "description": "internal port common to the instances; default: `port`"},
            "protocol": {"type": "string", "enum": ["tcp", "udp"], "default": "tcp"},
            "handlers": {"type": "array", "items": {"type": "string", "enum": ["tls", "http", "redirect"]},
                "description": "seed 002: port 80 must have http and not tls; 443 must have http and tls; redirect only on 80; other TCP ports must have tls and not http; UDP ports none"},
            "ip": {"type": ["string", "null"], "description": "the gateway address a UDP port is served on (required for UDP)"}}},
        "Wake": {"type": "object", "additionalProperties": false, "description": "exactly one of command and url",
            "properties": {"command": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 64},
                "url": {"type": "string", "pattern": "^http://"}}},
        "NewService": {"type": "object", "required": ["name", "ports"], "additionalProperties": false, "properties": {
            "name": {"type": "string", "pattern": "^[a-z0-9]([a-z0-9-]{0,52}[a-z0-9])?$", "description": "unique in the network"},
            "fqdn": {"type": "string", "description": "default `<name>-<8 random letters>.<service-domain>`"},
            "ports": {"type": "array", "items": schema_ref("ServicePort"), "minItems": 1, "maxItems": 32, "description": "also accepted as `services` (seed 002's name)"},
            "soft_limit": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 65535, "default": 1},
            "hard_limit": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 65535, "default": 65535, "description": "at least soft_limit"},
            "instances": {"type": "array", "items": {"type": "string"}, "description": "members to attach now (instance names or public keys)"},
            "wake": schema_ref("Wake"),
            "wake_timeout_secs": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 3600, "default": 30}}},
        "ServicePatch": {"type": "object", "additionalProperties": false, "properties": {
            "ports": {"type": "array", "items": schema_ref("ServicePort"), "minItems": 1, "maxItems": 32},
            "soft_limit": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 65535},
            "hard_limit": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 65535},
            "wake": {"type": ["object", "null"], "oneOf": [schema_ref("Wake"), {"type": "null"}]},
            "wake_timeout_secs": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 3600}}},
        "Service": {"type": "object", "required": ["network", "name", "fqdn", "names", "ports", "soft_limit", "hard_limit", "persistent", "instances", "wake_timeout_secs", "created", "live_connections", "queued_connections", "gateways"], "properties": {
            "network": schema_ref("NetworkId"),
            "name": {"type": "string"},
            "fqdn": {"type": "string"},
            "ports": {"type": "array", "items": schema_ref("ServicePort")},
            "soft_limit": {"type": "integer", "format": "int32"},
            "hard_limit": {"type": "integer", "format": "int32"},
            "persistent": {"type": "boolean", "description": "true: made through the API or CLI, survives its instances; false: owned by `owner` (made by its `--publish`), deleted when it leaves or expires"},
            "owner": {"type": ["string", "null"]},
            "instances": {"type": "array", "items": {"type": "object", "properties": {"instance": {"type": "string"}, "state": {"type": "string", "enum": ["online", "offline"]}}}},
            "wake": {"type": ["object", "null"], "oneOf": [{"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}}}, {"type": "object", "properties": {"url": {"type": "string"}}}, {"type": "null"}]},
            "wake_timeout_secs": {"type": "integer", "format": "int32"},
            "created": unix_seconds("creation time")}}
    });
    // Live connections per service group, from the gateways' reports
    // (macro calls of their own, for the same recursion limit).
    // A group's own names (macro calls of their own, as below).
    schemas["NewService"]["properties"]["names"] = json!({"type": "array", "items": {"type": "string"}, "maxItems": 16, "description": "names the group answers to beside its fqdn (its own domains; `Host` and SNI pick the group by any of them); each unique across every network's groups"});
    schemas["ServicePatch"]["properties"]["names"] = json!({"type": "array", "items": {"type": "string"}, "maxItems": 16, "description": "replaces the names beside the fqdn; `[]` removes them"});
    schemas["Service"]["properties"]["names"] = json!({"type": "array", "items": {"type": "string"}, "description": "names beside the fqdn, sorted"});
    let service = &mut schemas["Service"]["properties"];
    service["live_connections"] = json!({"type": "integer", "format": "int64", "minimum": 0, "description": "connections the online gateways hold open to the group's instances, summed from their latest reports (sent every 10 s at most, when changed; 0 when none reported)"});
    service["queued_connections"] = json!({"type": "integer", "format": "int64", "minimum": 0, "description": "connections waiting at the online gateways for an instance (past the soft limit, or for a wake), summed"});
    service["gateways"] = json!({"type": "array", "description": "each online gateway's latest report for this group", "items": {"type": "object", "required": ["instance", "open", "queued", "reported"], "properties": {
        "instance": {"type": "string"},
        "open": {"type": "integer", "format": "int32", "minimum": 0},
        "queued": {"type": "integer", "format": "int32", "minimum": 0},
        "reported": unix_seconds("when the report arrived")}}});
    // A macro call of its own: one more in the literal above passes
    // serde_json's recursion limit.
    schemas["ServiceAddress"] = json!({"type": "object", "required": ["service", "ip"], "properties": {
        "service": {"type": "string"},
        "ip": {"type": "string", "format": "ipv4"},
        "wake_timeout_secs": {"type": ["integer", "null"], "minimum": 1, "maximum": 65535, "description": "scale to zero: how long a new flow is held while the service is woken; null: not wakeable"},
        "ports": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 65535}, "maxItems": 256, "description": "every port the service's instances announced while the address existed (sorted): where members expect the service also at zero instances"}},
        "description": "in a network's `addresses`, the stored record also carries the fields of `ServiceAddressDetail` (settings and state)"});
    address_schemas(&mut schemas);
    member_schemas(&mut schemas);
    schemas
}

/// The schemas of members' reported paths (`PathSummary`, the listing's
/// `MemberListed`) and `MemberDetail`'s `paths` (macro calls of their own:
/// serde_json's recursion limit).
fn member_schemas(schemas: &mut Value) {
    let rtt = json!({"type": ["integer", "null"], "format": "int32", "minimum": 0});
    schemas["PathSummary"] = json!({"type": "object", "required": ["reported", "direct", "relay", "none", "rtt_micros"], "description": "how a member reaches its peers, from its last traffic report to this keyserver replica", "properties": {
        "reported": unix_seconds("when the report arrived"),
        "direct": {"type": "integer", "format": "int64", "minimum": 0, "description": "peers reached on a direct path that answers probes"},
        "relay": {"type": "integer", "format": "int64", "minimum": 0, "description": "peers reached through the relay"},
        "none": {"type": "integer", "format": "int64", "minimum": 0, "description": "peers with no working path (none chosen yet, or blind)"},
        "rtt_micros": {"type": ["integer", "null"], "format": "int32", "minimum": 0, "description": "median round trip measured to its peers, microseconds"}}});
    schemas["MemberListed"] = json!({"description": "a `Member` as `GET …/members` lists it: every field of `Member` plus these", "allOf": [schema_ref("Member"),
        {"type": "object", "required": ["dns_names"], "properties": {
            "dns_names": {"type": "array", "items": {"type": "string"}, "description": "the names that answer it now, aliases left out (instance name, seed-003 names by id, `.warp` names); empty while it is offline; `GET …/members/{member}` has every one with its answers in `names`"},
            "path": schema_ref("PathSummary")}}]});
    let peer = json!({"type": "object", "required": ["peer", "relay", "working", "rtt_micros"], "properties": {
        "peer": {"type": "string", "description": "the peer's public key"},
        "instance": {"type": "string", "description": "the peer's instance name, while it is a member"},
        "relay": {"type": "boolean"}, "working": {"type": "boolean"}, "rtt_micros": rtt}});
    let dns_names = schemas["MemberListed"]["allOf"][1]["properties"]["dns_names"].clone();
    if let Some(props) = schemas["MemberDetail"]["allOf"][1]["properties"].as_object_mut() {
        props.insert("dns_names".into(), dns_names);
        props.insert("path".into(), schema_ref("PathSummary"));
        props.insert("peer_paths".into(), json!({"type": "array", "items": peer, "description": "its path to each peer, as it last reported (absent: none reported)"}));
    }
}

/// The schemas of service addresses' settings and state and of the
/// service graph (issue 19), each its own `json!` call (see above).
fn address_schemas(schemas: &mut Value) {
    let hook =
        || json!({"type": ["object", "null"], "oneOf": [schema_ref("Wake"), {"type": "null"}]});
    let secs = |what: &str| json!({"type": ["integer", "null"], "format": "int64", "minimum": 0, "description": format!("{what}, Unix time in seconds")});
    schemas["ServiceAddressPatch"] = json!({"type": "object", "additionalProperties": false,
        "description": "every field optional; a field left out stays as it is",
        "properties": {
            "wake": {"type": ["object", "null"], "oneOf": [schema_ref("Wake"), {"type": "null"}], "description": "the wake hook (command: only on a keyserver started with --allow-wake-commands; url: an HTTP POST); null: not wakeable. Setting it makes the pushed address's wake_timeout_secs non-null"},
            "wake_timeout_secs": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 3600, "description": "how long members hold a new flow while the service wakes, and how long before a new wake request may run the hook again; default 30; needs a wake hook"},
            "idle_after_secs": {"type": ["integer", "null"], "minimum": 1, "maximum": 2_592_000, "description": "seconds without a new flow after which the service is reported idle; null: not watched"},
            "idle_hook": {"type": ["object", "null"], "oneOf": [schema_ref("Wake"), {"type": "null"}], "description": "also accepted as `idle`: the hook run once when the service turns idle; needs idle_after_secs"}}});
    schemas["ServiceAddressDetail"] = json!({"description": "a `ServiceAddress` plus its settings and state", "allOf": [schema_ref("ServiceAddress"),
        {"type": "object", "required": ["online", "waking", "idle"], "properties": {
            "wake": hook(),
            "idle_after_secs": {"type": ["integer", "null"], "minimum": 1},
            "idle_hook": hook(),
            "waking_since": secs("when the wake hook last started"),
            "last_flow": secs("the last flow to the service from members' traffic reports or wake requests"),
            "watch_since": secs("when idle_after_secs was set"),
            "idle_since": secs("since when the service is idle"),
            "online": {"type": "integer", "format": "int64", "minimum": 0, "description": "online instances"},
            "waking": {"type": "boolean", "description": "a wake started within the wake timeout and no instance is online yet"},
            "idle": {"type": "boolean", "description": "no flow for idle_after_secs"}}}]});
    schemas["TrafficGraph"] = json!({"type": "object", "required": ["network", "name", "generation", "services", "edges", "idle", "reporters"], "properties": {
        "network": schema_ref("NetworkId"),
        "name": {"type": "string"},
        "generation": {"type": "integer", "format": "int64", "minimum": 0},
        "services": {"type": "array", "items": {"type": "object", "required": ["service", "instances", "wakeable", "waking", "idle"], "properties": {
            "service": {"type": "string"},
            "address": {"type": ["string", "null"], "format": "ipv4"},
            "instances": {"type": "array", "items": {"type": "string"}, "description": "online instances"},
            "wakeable": {"type": "boolean"}, "waking": {"type": "boolean"}, "idle": {"type": "boolean"},
            "idle_since": secs("since when it is idle"),
            "last_flow": secs("the last flow to it known here")}}},
        "edges": {"type": "array", "items": schema_ref("TrafficEdge")},
        "idle": {"type": "array", "items": {"type": "string"}, "description": "the idle services"},
        "reporters": {"type": "integer", "format": "int64", "minimum": 0, "description": "members whose reports are summed (those connected to this keyserver replica)"}}});
    let counter = |what: &str| json!({"type": "integer", "format": "int64", "minimum": 0, "description": what});
    schemas["TrafficEdge"] = json!({"type": "object", "required": ["source", "destination", "reporters", "opened", "active", "refused", "held", "bytes_sent", "bytes_received", "connect_count", "connect_micros", "connect_buckets"], "properties": {
        "source": {"type": "string"}, "destination": {"type": "string"},
        "reporters": counter("members of the source service whose reports are summed"),
        "opened": counter("flows that reached an instance"),
        "active": counter("flows open now"),
        "refused": counter("flows refused (no instance, or the wake timed out)"),
        "held": counter("flows held while the service was woken"),
        "bytes_sent": counter("bytes source to destination"),
        "bytes_received": counter("bytes destination to source"),
        "connect_count": counter("flows whose connect time was measured"),
        "connect_micros": counter("sum of connect times, microseconds"),
        "connect_buckets": {"type": "array", "items": {"type": "integer", "format": "int64", "minimum": 0}, "minItems": 6, "maxItems": 6, "description": "connect times under 1, 10, 100, 1000, 10000 ms, and slower"}}});
}

/// The paths of service addresses and the service graph (issue 19).
fn address_paths(paths: &mut Map<String, Value>, net: &Value) {
    let service = json!({"name": "service", "in": "path", "required": true, "description": "service name, percent-encoded", "schema": {"type": "string"}});
    let body = json!({"required": true, "content": {"application/json": {"schema": schema_ref("ServiceAddressPatch")}}});
    paths.insert("/v1/networks/{net}/addresses".into(), json!({
        "get": {"summary": "every service address with its wake and idle settings and state", "parameters": [net],
            "responses": responses(("200", "service addresses by service", Some(array_of("ServiceAddressDetail"))), &["401", "404", "405"])}}));
    paths.insert("/v1/networks/{net}/addresses/{service}".into(), json!({
        "get": {"summary": "one service address", "parameters": [net, service],
            "responses": responses(("200", "the address", Some(schema_ref("ServiceAddressDetail"))), &["401", "404", "405"])},
        "patch": {"summary": "scale to zero: the wake hook and timeout, idle-after and the idle hook (a change of what members see is pushed)", "parameters": [net, service],
            "requestBody": body,
            "responses": responses(("200", "the address", Some(schema_ref("ServiceAddressDetail"))), &["400", "401", "404", "405", "408", "413", "415", "422", "500", "503"])}}));
    paths.insert("/v1/networks/{net}/traffic".into(), json!({
        "get": {"summary": "the service graph: services with their address, online instances and idle state, and the traffic per pair of services from members' reports", "parameters": [net],
            "responses": responses(("200", "the graph", Some(schema_ref("TrafficGraph"))), &["401", "404", "405"])}}));
}

/// The responses of a service-group operation: like [`responses`], with
/// 400 as the `ServiceRuleError` response (an `Error` with `rule` and `port`).
fn service_responses(ok: (&str, &str, Option<Value>), errors: &[&str], rules: bool) -> Value {
    let mut out = responses(ok, errors);
    if rules {
        out["400"] = json!({"$ref": "#/components/responses/ServiceRuleError"});
    }
    out
}

/// The paths of service groups (seed 002), under `prefix`
/// (`/v1/networks/{net}` or the seed-shaped `` with `?network=`).
fn service_paths(paths: &mut Map<String, Value>, prefix: &str, first: &[Value]) {
    let name =
        json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string"}});
    let member = json!({"name": "member", "in": "path", "required": true, "description": "instance name or public key", "schema": {"type": "string"}});
    let with = |extra: &[Value]| -> Value {
        let mut all: Vec<Value> = first.to_vec();
        all.extend_from_slice(extra);
        Value::Array(all)
    };
    let body = |schema: Value| json!({"required": true, "content": {"application/json": {"schema": schema}}});
    let write = ["401", "404", "405", "408", "413", "415", "422", "500"];
    paths.insert(format!("{prefix}/services"), json!({
        "get": {"summary": "list service groups", "parameters": with(&[]),
            "responses": service_responses(("200", "service groups by name", Some(array_of("Service"))), &["400", "401", "404", "405"], false)},
        "post": {"summary": "create a persistent service group (seed 002)", "parameters": with(&[]),
            "requestBody": body(schema_ref("NewService")),
            "responses": service_responses(("201", "created", Some(schema_ref("Service"))), &["401", "404", "405", "408", "409", "413", "415", "422", "500"], true)}
    }));
    paths.insert(format!("{prefix}/services/{{name}}"), json!({
        "get": {"summary": "one service group (with `persistent`)", "parameters": with(std::slice::from_ref(&name)),
            "responses": service_responses(("200", "the group", Some(schema_ref("Service"))), &["401", "404", "405"], false)},
        "patch": {"summary": "change ports, handlers, limits or the wake hook", "parameters": with(std::slice::from_ref(&name)),
            "requestBody": body(schema_ref("ServicePatch")),
            "responses": service_responses(("200", "the group", Some(schema_ref("Service"))), &write, true)},
        "delete": {"summary": "delete a service group", "parameters": with(std::slice::from_ref(&name)),
            "responses": service_responses(("204", "deleted", None), &["401", "404", "405", "500"], false)}
    }));
    paths.insert(format!("{prefix}/services/{{name}}/instances/{{member}}"), json!({
        "put": {"summary": "attach an instance", "parameters": with(&[name.clone(), member.clone()]),
            "responses": service_responses(("200", "the group", Some(schema_ref("Service"))), &["401", "404", "405", "500"], false)},
        "delete": {"summary": "detach an instance", "parameters": with(&[name, member]),
            "responses": service_responses(("200", "the group", Some(schema_ref("Service"))), &["401", "404", "405", "500"], false)}
    }));
}

/// The OpenAPI document.
pub fn openapi_doc() -> Value {
    let net = json!({"name": "net", "in": "path", "required": true, "description": "network id (pn-<uuid>) or name, percent-encoded", "schema": {"type": "string"}});
    let member = json!({"name": "member", "in": "path", "required": true, "description": "public key or instance name, percent-encoded", "schema": {"type": "string"}});
    let token_id = json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^tk-[0-9a-f]{12}$"}});
    let force = json!({"name": "force", "in": "query", "required": false, "description": "also remove the network's members (each is revoked)", "schema": {"type": "boolean", "default": false}});
    let body = |schema: Value| json!({"required": true, "content": {"application/json": {"schema": schema}}});
    let mut error_responses = Map::new();
    for (_, name, description) in ERRORS {
        error_responses.insert(
            name.into(),
            json!({"description": description, "content": {"application/json": {"schema": schema_ref("Error")}}}),
        );
    }
    error_responses.insert(
        "ServiceRuleError".into(),
        json!({"description": "a seed-002 rule is broken (handler rules, port numbers, limits: soft_limit > hard_limit, ...), named with the port; or malformed JSON (then without `rule`)",
            "content": {"application/json": {"schema": schema_ref("Error")}}}),
    );
    let read = ["401", "405"];
    let read_one = ["401", "404", "405"];
    let write_body = [
        "400", "401", "404", "405", "408", "413", "415", "422", "500",
    ];
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {"title": "IST Mesh keyserver admin API", "version": "1",
            "description": "Every route but /healthz, /readyz and /metrics needs `Authorization: Bearer <token>`: the keyserver's admin token (a global admin) or an API token (`/v1/api-tokens`: role viewer, operator or admin, for one tenant's networks or all; a `gateway` credential is refused with 403); without one every other path, unknown ones included, answers 401. A network outside the token's tenant answers 404 like an unknown one, and listings leave it out; a change the role does not allow answers 403. Every change (POST, PUT, PATCH, DELETE), whatever its answer, is recorded in the audit trail (`/v1/audit`). Numbers without a fractional part are integers however they are written (`554.0`). Unknown paths answer 404. Every error is `{\"error\": \"...\"}` as application/json."},
        "servers": [{"url": "/", "description": "this keyserver (relative to where this document was fetched)"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
            "responses": error_responses
        },
        "paths": {
            "/healthz": {"get": {"summary": "the process is alive", "security": [],
                "responses": responses(("200", "alive", Some(schema_ref("Status"))), &["405"])}},
            "/readyz": {"get": {"summary": "the store takes writes", "security": [],
                "responses": responses(("200", "ready", Some(schema_ref("Status"))), &["405", "503"])}},
            "/v1/backup": {"get": {"summary": "every stored record (API tokens' hashes and the audit trail included), one consistent snapshot (restore with `keyserver restore`); global admins only",
                "responses": responses(("200", "backup document", Some(json!({"type": "object"}))), &["401", "403", "405", "503"])}},
            "/metrics": {"get": {"summary": "Prometheus metrics (text exposition 0.0.4)", "security": [],
                "responses": responses(("200", "metrics", None), &["405"])}},
            "/openapi.json": {"get": {"summary": "this document",
                "responses": responses(("200", "OpenAPI document", Some(json!({"type": "object"}))), &read)}},
            "/v1/networks": {
                "get": {"summary": "list networks",
                    "responses": responses(("200", "networks by name", Some(array_of("Network"))), &read)},
                "post": {"summary": "create a network",
                    "requestBody": body(json!({"type": "object", "additionalProperties": false, "required": ["name"], "properties": {
                        "name": {"type": "string", "minLength": 1, "maxLength": 64, "description": "unique, also under case folding and look-alike characters; no control, bidi or invisible characters; not `.`/`..`; not starting with `pn-`"},
                        "range": {"type": ["string", "null"], "format": "cidr", "default": "10.240.0.0/22", "description": "/16 to /30, not overlapping 0/8, 127/8, 169.254/16, 224/4, 240/4; null: the default"},
                        "expire_after": expire_text(),
                        "tenant": tenant_text("the tenant it belongs to; null: none (only global tokens see it); a tenant admin's networks always get its tenant (another is 403)")}})),
                    "responses": responses(("201", "created", Some(schema_ref("NewNetwork"))), &["400", "401", "405", "408", "409", "413", "415", "422", "500"])}
            },
            "/v1/networks/{net}": {
                "get": {"summary": "one network", "parameters": [net],
                    "responses": responses(("200", "the network", Some(schema_ref("Network"))), &read_one)},
                "patch": {"summary": "change a network's settings", "parameters": [net],
                    "requestBody": body(json!({"type": "object", "additionalProperties": false, "properties": {
                        "expire_after": expire_text(),
                        "tenant": tenant_text("move the network to this tenant; null: to none (global admins only, else 403)")}})),
                    "responses": responses(("200", "the network", Some(schema_ref("Network"))), &write_body)},
                "delete": {"summary": "delete a network with its tokens; refused (409) while it has members unless force", "parameters": [net, force],
                    "responses": responses(("200", "deleted", Some(json!({"type": "object", "properties": {
                        "deleted": {"type": "boolean"}, "network": schema_ref("NetworkId"),
                        "members_removed": {"type": "integer", "format": "int64", "minimum": 0}}}))),
                        &["400", "401", "404", "405", "409", "500"])}
            },
            "/v1/networks/{net}/members": {"get": {"summary": "members with IP, key, app, type, index, instance, endpoints, ports, last seen",
                "parameters": [net], "responses": responses(("200", "members by IP", Some(array_of("MemberListed"))), &read_one)}},
            "/v1/networks/{net}/names": {"get": {"summary": "every private name of the network with its current answer (seed 003's listing)",
                "parameters": [net], "responses": responses(("200", "the names", Some(schema_ref("NameListing"))), &read_one)}},
            "/v1/networks/{net}/members/{member}": {
                "get": {"summary": "one member of this network (by public key or instance name): slot, state, address, endpoints, runner, ports, times, and the names that answer it",
                    "parameters": [net, member],
                    "responses": responses(("200", "the member", Some(schema_ref("MemberDetail"))), &read_one)},
                "delete": {"summary": "remove (revoke) a member; pushed to every other member",
                    "parameters": [net, member],
                    "responses": responses(("200", "removed", Some(json!({"type": "object", "properties": {
                        "removed": {"type": "boolean"}, "generation": {"type": "integer", "format": "int64", "minimum": 0}}}))),
                        &["401", "404", "405", "500"])}
            },
            "/v1/networks/{net}/tokens": {
                "get": {"summary": "list tokens (never their secrets)", "parameters": [net],
                    "responses": responses(("200", "tokens", Some(array_of("Token"))), &read_one)},
                "post": {"summary": "create a join token (shown once)", "parameters": [net],
                    "requestBody": body(json!({"type": "object", "additionalProperties": false, "properties": {
                        "uses": {"type": ["integer", "null"], "format": "int64", "minimum": 1, "maximum": 4_294_967_295_u64, "default": 1, "description": "null: the default"},
                        "expires": {"type": ["string", "null"], "default": "1h", "description": "lifetime (`30m`, `1h`, `7d`), 1 s to 365 days; null or empty: the default"},
                        "service": {"type": ["string", "null"], "minLength": 1, "maxLength": 128, "description": "bind to this service; no control or bidi characters; null: no binding"},
                        "process_type": {"type": ["string", "null"], "pattern": "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", "description": "null: no binding"},
                        "service_group": {"type": ["string", "null"], "description": "attach members joining with it to this existing service group; null: none"},
                        "ephemeral": {"type": "boolean", "default": false, "description": "make every member joining with it ephemeral (freed soon after it goes offline), whatever the sidecar asks"}}})),
                    "responses": responses(("201", "created", Some(schema_ref("Token"))), &write_body)}
            },
            "/v1/networks/{net}/tokens/{id}": {"delete": {"summary": "delete a token", "parameters": [net, token_id],
                "responses": responses(("204", "deleted", None), &["401", "404", "405", "500"])}}
        }
    });
    if let Some(paths) = doc["paths"].as_object_mut() {
        access_paths(paths);
        address_paths(paths, &net);
        service_paths(paths, "/v1/networks/{net}", std::slice::from_ref(&net));
        let network = json!({"name": "network", "in": "query", "required": false,
            "description": "network id or name; default: the keyserver's only network (400 when it has several)",
            "schema": {"type": "string"}});
        service_paths(paths, "", &[network]);
        more_statuses(paths);
    }
    access_schemas(&mut doc["components"]["schemas"]);
    doc
}

/// Statuses every operation of a kind can answer: 403 for every change
/// (and the admin-only reads); 400 for the `/services` aliases (which
/// network, and an invalid query).
fn more_statuses(paths: &mut Map<String, Value>) {
    for (path, item) in paths.iter_mut() {
        let Some(ops) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in ops.iter_mut() {
            let public = op.get("security").is_some_and(|s| s == &json!([]));
            let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
                continue;
            };
            let mut add = |code: &str, name: &str| {
                if !responses.contains_key(code) {
                    responses.insert(
                        code.into(),
                        json!({"$ref": format!("#/components/responses/{name}")}),
                    );
                }
            };
            if !public && (method != "get" || path.starts_with("/v1/api-tokens")) {
                add("403", "Forbidden");
            }
            if path.starts_with("/services") {
                add("400", "BadRequest");
            }
        }
    }
}

/// The paths of API tokens and the audit trail ([`crate::auth`]).
fn access_paths(paths: &mut Map<String, Value>) {
    let id = json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^at-[0-9a-f]{12}$"}});
    let query = |name: &str, schema: Value, what: &str| json!({"name": name, "in": "query", "required": false, "description": what, "schema": schema});
    paths.insert("/v1/api-tokens".into(), json!({
        "get": {"summary": "the API tokens of the caller's scope (admins only; never their secrets)",
            "responses": responses(("200", "API tokens, oldest first", Some(array_of("ApiToken"))), &["401", "405"])},
        "post": {"summary": "create an API token (shown once); a tenant admin creates tokens of its tenant only",
            "requestBody": {"required": true, "content": {"application/json": {"schema": schema_ref("NewApiToken")}}},
            "responses": responses(("201", "created, with `token`", Some(schema_ref("ApiToken"))), &["400", "401", "405", "408", "413", "415", "422", "500", "503"])}}));
    paths.insert("/v1/api-tokens/{id}".into(), json!({
        "delete": {"summary": "revoke an API token of the caller's scope (at once: its next request answers 401)", "parameters": [id],
            "responses": responses(("204", "revoked", None), &["401", "404", "405", "500", "503"])}}));
    paths.insert("/v1/audit".into(), json!({
        "get": {"summary": "the audit trail: every change through the API or the CLI, whatever its result; a tenant token sees its tenant's entries only",
            "parameters": [
                query("network", json!({"type": "string"}), "only entries about this network (id, or its name at the time)"),
                query("since", json!({"type": "string"}), "from this time: Unix seconds or RFC 3339 (`2025-01-31T12:00:00Z`)"),
                query("until", json!({"type": "string"}), "before this time: Unix seconds or RFC 3339"),
                query("limit", json!({"type": "integer", "minimum": 1, "default": 100}), "at most this many: the latest")],
            "responses": responses(("200", "entries, oldest first", Some(array_of("AuditEntry"))), &["400", "401", "405"])}}));
}

/// The schemas of API tokens and the audit trail.
fn access_schemas(schemas: &mut Value) {
    let role = json!({"type": "string", "enum": ["viewer", "operator", "admin", "gateway"], "description": "viewer: reads; operator: also members, join tokens, service groups and service addresses of its networks; admin: also networks and API tokens of its scope; gateway: a gateway's credential (its `token` is `istg1.`, for `sidecar gateway --gateway-token-file`), refused by every admin route (403) and the console; over the control protocol it lists the networks of its scope that have service groups and gets a one-use join token for each"});
    schemas["NewApiToken"] = json!({"type": "object", "additionalProperties": false, "required": ["name", "role"], "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 64, "description": "who or what uses it; no control or bidi characters"},
        "role": role.clone(),
        "tenant": tenant_text("the tenant whose networks it reaches; null or absent: every network (global admins only); a tenant admin's tokens always get its tenant (another is 403)"),
        "expires": {"type": ["string", "null"], "description": "lifetime (`30d`, 1 s to 3650 days); null, absent or empty: until revoked"}}});
    schemas["ApiToken"] = json!({"type": "object", "required": ["id", "name", "role", "tenant", "created", "expires", "created_by"], "properties": {
        "id": {"type": "string", "pattern": "^at-[0-9a-f]{12}$"},
        "name": {"type": "string"},
        "role": role.clone(),
        "tenant": {"type": ["string", "null"], "description": "null: every network"},
        "created": unix_seconds("creation time"),
        "expires": {"type": ["integer", "null"], "format": "int64", "minimum": 0, "description": "expiry, Unix time in seconds; null: until revoked"},
        "created_by": {"type": "string", "description": "id of the token that created it (`admin`: the keyserver's admin token)"},
        "token": {"type": "string", "pattern": "^istk1\\.", "description": "the bearer secret, only in the creation answer"}}});
    schemas["AuditEntry"] = json!({"type": "object", "required": ["seq", "time_ms", "token", "token_name", "role", "method", "route", "path", "status"], "properties": {
        "seq": {"type": "integer", "format": "int64", "minimum": 1, "description": "position in the trail"},
        "time_ms": {"type": "integer", "format": "int64", "minimum": 0, "description": "when, Unix time in milliseconds"},
        "token": {"type": "string", "description": "the token's id (`admin`: the keyserver's admin token)"},
        "token_name": {"type": "string"},
        "role": role,
        "client": {"type": ["string", "null"], "description": "the client's address, `ip:port`"},
        "method": {"type": "string"},
        "route": {"type": "string", "description": "the route, as in this document (`/v1/networks/{net}/members/{member}`)"},
        "path": {"type": "string", "description": "the path as sent"},
        "network": {"type": ["string", "null"], "description": "the network concerned"},
        "network_name": {"type": ["string", "null"], "description": "its name then"},
        "tenant": {"type": ["string", "null"], "description": "whose entry it is (the network's tenant, or the token's)"},
        "target": {"type": ["string", "null"], "description": "what inside the network: member, token id, group, service, ..."},
        "status": {"type": "integer", "format": "int32", "minimum": 100, "maximum": 599, "description": "the answer's HTTP status"}}});
}
