//! Link addresses: which feature and which identity a link attach is for.
//!
//! The hub decides everything about a link from its address and the client's role: the same
//! path `/devices/{d}/modules/{m}/messages/events` is a module's output when the client sends
//! and its inputs when the client receives. Addresses may be relative (`/devices/…`, Node) or
//! absolute (`amqps://host:5671/devices/…`, C#); path keywords match case-insensitively
//! (`deviceBound` vs `devicebound`) and ids are URL-decoded.

use percent_encoding::percent_decode_str;

use crate::model::identity::{DeviceId, Identity, ModuleId};

/// The role the *client* plays on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRole {
    Sender,
    Receiver,
}

/// What a link is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    /// `$cbs`: put-token requests (client sender) and responses (client receiver).
    Cbs,
    /// Telemetry or module outputs sent by the client.
    Events(Identity),
    /// Messages routed to a module's inputs, sent by the hub.
    ModuleInputs(Identity),
    /// Cloud-to-device messages for a device.
    C2d(Identity),
    /// A C2D link asked for by a module: modules cannot receive cloud-to-device messages.
    ModuleC2d(Identity),
    /// Twin requests from the client.
    TwinRequests(Identity),
    /// Twin responses and desired-property pushes to the client.
    TwinResponses(Identity),
    /// Method responses from the client.
    MethodResponses(Identity),
    /// Method requests to the client.
    MethodRequests(Identity),
    /// C2D messages from the service (`/messages/devicebound`, the service sends).
    ServiceC2d,
    /// Feedback records to the service (`/messages/servicebound/feedback`).
    ServiceFeedback,
}

impl LinkKind {
    /// The identity whose token the link needs; `None` for `$cbs`.
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            LinkKind::Cbs | LinkKind::ServiceC2d | LinkKind::ServiceFeedback => None,
            LinkKind::Events(i)
            | LinkKind::ModuleInputs(i)
            | LinkKind::C2d(i)
            | LinkKind::ModuleC2d(i)
            | LinkKind::TwinRequests(i)
            | LinkKind::TwinResponses(i)
            | LinkKind::MethodResponses(i)
            | LinkKind::MethodRequests(i) => Some(i),
        }
    }

    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            LinkKind::Cbs => "cbs",
            LinkKind::Events(_) => "events",
            LinkKind::ModuleInputs(_) => "inputs",
            LinkKind::C2d(_) | LinkKind::ModuleC2d(_) => "c2d",
            LinkKind::TwinRequests(_) | LinkKind::TwinResponses(_) => "twin",
            LinkKind::MethodResponses(_) | LinkKind::MethodRequests(_) => "methods",
            LinkKind::ServiceC2d => "service-c2d",
            LinkKind::ServiceFeedback => "service-feedback",
        }
    }

    /// Whether the link needs a service token (a `servicePolicies` policy) on the connection.
    pub fn is_service(&self) -> bool {
        matches!(self, LinkKind::ServiceC2d | LinkKind::ServiceFeedback)
    }
}

/// Why an address was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("the link has no address")]
    Missing,
    #[error("no such node: {0:?}")]
    NotFound(String),
}

/// Strips `amqps://host[:port]` (any scheme, any case) and a query string, leaving the path.
pub fn path_of(address: &str) -> &str {
    let a = address.trim();
    let a = match a.find("://") {
        Some(i) => {
            let rest = &a[i + 3..];
            match rest.find('/') {
                Some(j) => &rest[j..],
                None => "",
            }
        }
        None => a,
    };
    a.split('?').next().unwrap_or(a)
}

fn decode_id(s: &str) -> Option<String> {
    // .NET encodes a space as '+'.
    let s = s.replace('+', " ");
    percent_decode_str(&s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// Classifies an attach by its address and the client's role.
pub fn classify(address: Option<&str>, role: ClientRole) -> Result<LinkKind, AddressError> {
    let address = address.ok_or(AddressError::Missing)?;
    let path = path_of(address);
    let not_found = || AddressError::NotFound(address.to_owned());
    let trimmed = path.trim_matches('/');
    if trimmed.eq_ignore_ascii_case("$cbs") {
        return Ok(LinkKind::Cbs);
    }
    // The service's nodes (C# writes `deviceBound` and `serviceBound`).
    match (trimmed.to_ascii_lowercase().as_str(), role) {
        ("messages/devicebound", ClientRole::Sender) => return Ok(LinkKind::ServiceC2d),
        ("messages/servicebound/feedback", ClientRole::Receiver) => {
            return Ok(LinkKind::ServiceFeedback)
        }
        _ => {}
    }
    let segs: Vec<&str> = trimmed.split('/').collect();
    if segs.len() < 3 || !segs[0].eq_ignore_ascii_case("devices") {
        return Err(not_found());
    }
    let device = decode_id(segs[1])
        .and_then(|d| DeviceId::parse(&d).ok())
        .ok_or_else(not_found)?;
    let (identity, rest) = if segs[2].eq_ignore_ascii_case("modules") && segs.len() >= 4 {
        let module = decode_id(segs[3])
            .and_then(|m| ModuleId::parse(&m).ok())
            .ok_or_else(not_found)?;
        (Identity::Module(device, module), &segs[4..])
    } else {
        (Identity::Device(device), &segs[2..])
    };
    let is_module = identity.module().is_some();
    let lower: Vec<String> = rest.iter().map(|s| s.to_ascii_lowercase()).collect();
    let lower: Vec<&str> = lower.iter().map(String::as_str).collect();
    use ClientRole::{Receiver, Sender};
    let kind = match (lower.as_slice(), role) {
        (["messages", "events"], Sender) => LinkKind::Events(identity),
        (["messages", "events"], Receiver) if is_module => LinkKind::ModuleInputs(identity),
        (["messages", "devicebound"], Receiver) if is_module => LinkKind::ModuleC2d(identity),
        (["messages", "devicebound"], Receiver) => LinkKind::C2d(identity),
        (["twin"], Sender) => LinkKind::TwinRequests(identity),
        (["twin"], Receiver) => LinkKind::TwinResponses(identity),
        (["methods", "devicebound"], Sender) => LinkKind::MethodResponses(identity),
        (["methods", "devicebound"], Receiver) => LinkKind::MethodRequests(identity),
        _ => return Err(not_found()),
    };
    Ok(kind)
}

/// The device a service's C2D message is for: its `to`, `/devices/{id}/messages/devicebound`
/// (the id URL-encoded by the SDKs; any case of the path; absolute or relative).
pub fn c2d_target(to: &str) -> Option<DeviceId> {
    match classify(Some(to), ClientRole::Receiver) {
        Ok(LinkKind::C2d(Identity::Device(d))) => Some(d),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ClientRole::{Receiver, Sender};

    fn m(d: &str, m: &str) -> Identity {
        Identity::Module(DeviceId::parse(d).unwrap(), ModuleId::parse(m).unwrap())
    }
    fn d(d: &str) -> Identity {
        Identity::Device(DeviceId::parse(d).unwrap())
    }

    #[test]
    fn service_nodes_and_c2d_targets() {
        assert_eq!(
            classify(Some("/messages/devicebound"), Sender),
            Ok(LinkKind::ServiceC2d)
        );
        assert_eq!(
            classify(Some("amqps://hub:5671/messages/deviceBound"), Sender),
            Ok(LinkKind::ServiceC2d)
        );
        assert_eq!(
            classify(Some("/messages/serviceBound/feedback"), Receiver),
            Ok(LinkKind::ServiceFeedback)
        );
        assert!(classify(Some("/messages/devicebound"), Receiver).is_err());
        assert!(classify(Some("/messages/servicebound/feedback"), Sender).is_err());
        assert_eq!(
            c2d_target("/devices/dev%2F1x/messages/devicebound").map(|d| d.to_string()),
            None,
            "an id with a slash is not a device id"
        );
        assert_eq!(
            c2d_target("/devices/leaf%3A1/messages/deviceBound"),
            Some(DeviceId::parse("leaf:1").unwrap())
        );
        assert_eq!(
            c2d_target("/devices/d1/modules/m1/messages/devicebound"),
            None
        );
        assert_eq!(c2d_target("/devices/d1/messages/events"), None);
        assert_eq!(c2d_target(""), None);
    }

    #[test]
    fn valid_addresses() {
        let cases: &[(&str, ClientRole, LinkKind)] = &[
            ("$cbs", Sender, LinkKind::Cbs),
            ("$cbs", Receiver, LinkKind::Cbs),
            ("amqps://gw/$cbs", Receiver, LinkKind::Cbs),
            (
                "/devices/d1/modules/m1/messages/events",
                Sender,
                LinkKind::Events(m("d1", "m1")),
            ),
            (
                "/devices/d1/modules/m1/messages/events",
                Receiver,
                LinkKind::ModuleInputs(m("d1", "m1")),
            ),
            (
                "/devices/d1/messages/events",
                Sender,
                LinkKind::Events(d("d1")),
            ),
            (
                "amqps://gw:5671/devices/d1/messages/deviceBound",
                Receiver,
                LinkKind::C2d(d("d1")),
            ),
            (
                "/devices/d1/modules/m1/messages/devicebound",
                Receiver,
                LinkKind::ModuleC2d(m("d1", "m1")),
            ),
            (
                "/devices/d1/modules/m1/twin",
                Sender,
                LinkKind::TwinRequests(m("d1", "m1")),
            ),
            (
                "/DEVICES/d1/MODULES/m1/TWIN",
                Receiver,
                LinkKind::TwinResponses(m("d1", "m1")),
            ),
            (
                "/devices/d1/modules/m1/methods/deviceBound",
                Sender,
                LinkKind::MethodResponses(m("d1", "m1")),
            ),
            (
                "amqps://h:5671/devices/d1/modules/m1/methods/devicebound",
                Receiver,
                LinkKind::MethodRequests(m("d1", "m1")),
            ),
            (
                "/devices/dev%2D1/modules/%24edgeHub/twin",
                Sender,
                LinkKind::TwinRequests(m("dev-1", "$edgeHub")),
            ),
            (
                "/devices/d%3A1/twin",
                Sender,
                LinkKind::TwinRequests(d("d:1")),
            ),
            (
                "/devices/d1/twin?api-version=2020-09-30",
                Sender,
                LinkKind::TwinRequests(d("d1")),
            ),
        ];
        for (addr, role, want) in cases {
            assert_eq!(
                classify(Some(addr), *role).as_ref(),
                Ok(want),
                "{addr} {role:?}"
            );
        }
    }

    #[test]
    fn unknown_addresses() {
        assert_eq!(classify(None, Sender), Err(AddressError::Missing));
        for addr in [
            "",
            "/",
            "/devices",
            "/devices/d1",
            "/devices/d1/messages",
            "/devices/d1/messages/devicebound", // a client cannot send on C2D
            "/devices/d1/messages/events/extra",
            "/things/d1/messages/events",
            "/devices/a%2Fb/messages/events",
            "/devices/d1/modules/m1/inputs/in1",
            "$management",
        ] {
            for role in [Sender, Receiver] {
                if addr == "/devices/d1/messages/devicebound" && role == Receiver {
                    continue;
                }
                assert!(
                    matches!(classify(Some(addr), role), Err(AddressError::NotFound(_))),
                    "{addr} {role:?}"
                );
            }
        }
        // A device has no inputs.
        assert!(classify(Some("/devices/d1/messages/events"), Receiver).is_err());
    }
}
