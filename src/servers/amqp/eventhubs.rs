//! The Event Hubs-compatible endpoint (`builtInEndpoint`, standalone mode): what the Event Hubs
//! SDKs (`@azure/event-hubs`, `azure-eventhub`) use to read the event log on the AMQPS port.
//!
//! * `$cbs`: a service-policy token (`sb://{host}/{eventHub}…`, or IoT Hub's service token)
//!   grants its entity path on the connection ([`ServiceGrants`]); a link attaches when a
//!   grant's path is a prefix of its own (`{eventHub}` covers every group and partition).
//! * `$management` (request and response links, client sender and receiver): `READ` of
//!   `com.microsoft:eventhub` and `com.microsoft:partition`. The reply goes out on a response
//!   link of the same session: the one whose target address or name is the request's
//!   `reply-to`, else the newest.
//! * `{eventHub}/ConsumerGroups/{group}/Partitions/{p}` (client receiver, absolute or relative
//!   address): the partition's events from the start the `apache.org:selector-filter:string`
//!   filter names, pre-settled, as the client grants credit; new events as they come. Owner
//!   levels (`com.microsoft:epoch`) follow `core::readers`; a stolen reader detaches with
//!   `amqp:link:stolen`.
//!
//! Bounds: partition readers per connection ([`MAX_READERS_PER_CONNECTION`]), grants per
//! connection ([`MAX_GRANTS`]), filter strings ([`MAX_FILTER_LEN`]), management requests (the
//! `$cbs` links' message size), events read ahead of the credit ([`READ_BATCH`]).

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use fe2o3_amqp::{
    acceptor::LinkEndpoint,
    link::{delivery::DeliveryInfo, Receiver, Sender},
    types::{
        definitions::{AmqpError, Fields},
        messaging::{
            annotations::OwnedKey, AmqpValue, ApplicationProperties, Body, Data, Message,
            MessageAnnotations, MessageId, Properties,
        },
        primitives::{Array, Binary, SimpleValue, Symbol, Timestamp, Value},
    },
    Sendable,
};
use serde_amqp::primitives::OrderedMap;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{amqp_error, clip, custom_condition, links::LinkStop, CLOSE_WAIT};
use crate::{
    config::BuiltInEndpoint,
    core::HubCore,
    model::address::{path_of, ClientRole},
    model::message::{CONNECTION_DEVICE_ID, CONNECTION_MODULE_ID, ENQUEUED_TIME},
    model::sas::now_secs,
    store::log::{Event, EventLog},
};

/// Partition readers one connection may hold.
pub const MAX_READERS_PER_CONNECTION: usize = 64;
/// Service grants one connection may hold (one per distinct entity path).
pub const MAX_GRANTS: usize = 64;
/// Longest selector filter accepted.
pub const MAX_FILTER_LEN: usize = 512;
/// Events read from the log at a time for one reader (and at most [`READ_BATCH_BYTES`]).
pub const READ_BATCH: usize = 256;
pub const READ_BATCH_BYTES: usize = 1024 * 1024;
/// Replies waiting for a `$management` response link of the session.
const REPLY_QUEUE: usize = 16;
/// How long a reply waits for a response link to attach.
const REPLY_WAIT: Duration = Duration::from_secs(10);

const SELECTOR_FILTER: &str = "apache.org:selector-filter:string";
const SELECTOR_FILTER_CODE: u64 = 0x0000_468C_0000_0004;
const EPOCH: &str = "com.microsoft:epoch";
const STOLEN: &str = "amqp:link:stolen";
const ARGUMENT_ERROR: &str = "com.microsoft:argument-error";

// ---------------------------------------------------------------------------------------------
// Grants

struct Grant {
    scope: String,
    expiry: u64,
    links: LinkStop,
}

/// The service-policy grants of one connection, and its partition readers.
#[derive(Default)]
pub(crate) struct ServiceGrants {
    grants: Mutex<Vec<Grant>>,
    readers: AtomicUsize,
}

/// Whether `scope` (lower-cased) covers the entity `path`: equal, or a prefix ending at a `/`.
fn covers(scope: &str, path: &str) -> bool {
    let path = path.to_ascii_lowercase();
    scope.is_empty()
        || path == scope
        || (path.starts_with(scope) && path.as_bytes().get(scope.len()) == Some(&b'/'))
}

impl ServiceGrants {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Grant>> {
        self.grants.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a grant (a renewal of the same path moves its expiry); `false` when the
    /// connection holds its maximum of grants.
    pub(crate) fn grant(&self, root: &CancellationToken, scope: String, expiry: u64) -> bool {
        let mut grants = self.lock();
        if let Some(g) = grants.iter_mut().find(|g| g.scope == scope) {
            g.expiry = g.expiry.max(expiry);
            return true;
        }
        if grants.len() >= MAX_GRANTS {
            return false;
        }
        grants.push(Grant {
            scope,
            expiry,
            links: LinkStop::new(root.child_token()),
        });
        true
    }

    /// The stop signal of a new link on `path` when an unexpired grant covers it.
    fn link_stop(&self, path: &str, now: u64) -> Option<LinkStop> {
        let skew = crate::model::sas::MAX_CLOCK_SKEW_SECS;
        self.lock()
            .iter()
            .find(|g| g.expiry.saturating_add(skew) >= now && covers(&g.scope, path))
            .map(|g| g.links.child())
    }

    /// The earliest expiry among the grants, for the connection's grant watcher.
    pub(crate) fn earliest_expiry(&self) -> Option<u64> {
        self.lock().iter().map(|g| g.expiry).min()
    }

    /// Whether an unexpired grant covers the whole hub (the service role).
    pub(crate) fn whole_hub(&self, now: u64) -> bool {
        let skew = crate::model::sas::MAX_CLOCK_SKEW_SECS;
        self.lock()
            .iter()
            .any(|g| g.scope.is_empty() && g.expiry.saturating_add(skew) >= now)
    }

    /// Whether the connection holds no service grant.
    pub(crate) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Ends the grants whose token expired: their links detach with
    /// `amqp:unauthorized-access`.
    pub(crate) fn expire(&self, now: u64) {
        let skew = crate::model::sas::MAX_CLOCK_SKEW_SECS;
        self.lock().retain(|g| {
            let live = g.expiry.saturating_add(skew) >= now;
            if !live {
                g.links.stop_with(amqp_error(
                    AmqpError::UnauthorizedAccess,
                    "the service token has expired; put a new token and reattach",
                ));
            }
            live
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes

/// What an attach is for on the Event Hubs endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Node {
    /// `$management`, client sender.
    Requests,
    /// `$management`, client receiver.
    Replies,
    /// A partition, client receiver; `path` is the entity path the grant must cover.
    Partition {
        group: String,
        partition: u32,
        path: String,
    },
    /// Under the event hub, but no such group or partition (or the wrong role).
    Unknown(String),
}

/// Classifies an attach when the hub has a built-in endpoint and the address is one of its
/// nodes; `None` leaves it to the device-side classification.
pub(super) fn classify(
    address: Option<&str>,
    role: ClientRole,
    eh: Option<&BuiltInEndpoint>,
) -> Option<Node> {
    let eh = eh?;
    let path = path_of(address?).trim_matches('/');
    if path.eq_ignore_ascii_case("$management") {
        return Some(match role {
            ClientRole::Sender => Node::Requests,
            ClientRole::Receiver => Node::Replies,
        });
    }
    let segs: Vec<&str> = path.split('/').collect();
    if !segs[0].eq_ignore_ascii_case(&eh.name) {
        return None;
    }
    let unknown = || Some(Node::Unknown(clip(path).into_owned()));
    match (segs.as_slice(), role) {
        ([_, cg_kw, group, p_kw, partition], ClientRole::Receiver)
            if cg_kw.eq_ignore_ascii_case("ConsumerGroups")
                && p_kw.eq_ignore_ascii_case("Partitions") =>
        {
            let Some(group) = eh.consumer_group(group) else {
                return unknown();
            };
            match partition.parse::<u32>() {
                Ok(p) if p < eh.partition_count && partition.len() <= 3 => Some(Node::Partition {
                    group: group.to_owned(),
                    partition: p,
                    path: path.to_owned(),
                }),
                _ => unknown(),
            }
        }
        _ => unknown(),
    }
}

/// What the attach asked for, read before the acceptor takes it.
pub(super) struct Opening {
    node: Node,
    /// The selector filter's text, or why it was refused.
    filter: Result<Option<String>, String>,
    owner_level: Option<i64>,
    name: String,
    /// The client's target address (a response link's `reply-to`).
    target: Option<String>,
}

impl Opening {
    pub(super) fn of(attach: &fe2o3_amqp::types::performatives::Attach, node: Node) -> Self {
        let filter = attach
            .source
            .as_ref()
            .and_then(|s| s.filter.as_ref())
            .map_or(Ok(None), selector_filter);
        let owner_level = attach.properties.as_ref().and_then(owner_level);
        let target = attach.target.as_ref().and_then(|t| match t.as_ref() {
            fe2o3_amqp::types::messaging::TargetArchetype::Target(t) => t.address.clone(),
            #[allow(unreachable_patterns)]
            _ => None,
        });
        Self {
            node,
            filter,
            owner_level,
            name: attach.name.clone(),
            target,
        }
    }
}

fn owner_level(props: &Fields) -> Option<i64> {
    match props.get(&Symbol::from(EPOCH))? {
        Value::Long(n) => Some(*n),
        Value::Int(n) => Some(i64::from(*n)),
        Value::Uint(n) => Some(i64::from(*n)),
        Value::Ulong(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

/// The selector filter's text: a described string whose descriptor is the filter's code (JS)
/// or name (Python).
fn selector_filter(
    filters: &fe2o3_amqp::types::messaging::FilterSet,
) -> Result<Option<String>, String> {
    let Some(v) = filters.get(&Symbol::from(SELECTOR_FILTER)) else {
        return Ok(None);
    };
    let inner = match v {
        Value::Described(d) => {
            let ok = match &d.descriptor {
                serde_amqp::descriptor::Descriptor::Code(c) => *c == SELECTOR_FILTER_CODE,
                serde_amqp::descriptor::Descriptor::Name(n) => n.0 == SELECTOR_FILTER,
            };
            if !ok {
                return Err("the selector filter has an unknown descriptor".into());
            }
            &d.value
        }
        other => other,
    };
    match inner {
        Value::String(s) if s.len() <= MAX_FILTER_LEN => Ok(Some(s.clone())),
        Value::String(_) => Err(format!(
            "the selector filter is longer than {MAX_FILTER_LEN} bytes"
        )),
        _ => Err("the selector filter must be a string".into()),
    }
}

/// Where a reader starts, from its filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Start {
    /// The first event kept (no filter, or offset `-1`).
    Earliest,
    /// Events appended after the attach (`@latest`).
    Latest,
    /// From this sequence number on.
    Sequence(u64),
    /// From the first event enqueued at or after this time (ms).
    Time(i64),
}

/// Parses `amqp.annotation.x-opt-{offset|sequence-number|enqueued-time} (>|>=) '<value>'`.
pub(super) fn parse_filter(filter: &str) -> Result<Start, String> {
    let bad = || format!("unsupported selector filter {:?}", clip(filter));
    let rest = filter
        .trim()
        .strip_prefix("amqp.annotation.")
        .ok_or_else(bad)?;
    let (field, rest) = rest
        .split_once(|c: char| c.is_whitespace() || c == '>')
        .ok_or_else(bad)?;
    let rest = rest.trim_start();
    let rest = if filter.contains(&format!("{field}>")) {
        // `field>` split at the `>`: put it back.
        format!(">{rest}")
    } else {
        rest.to_owned()
    };
    let (inclusive, value) = if let Some(v) = rest.strip_prefix(">=") {
        (true, v)
    } else if let Some(v) = rest.strip_prefix('>') {
        (false, v)
    } else {
        return Err(bad());
    };
    let value = value
        .trim()
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .ok_or_else(bad)?;
    let after = |n: i64| -> u64 {
        let n = if inclusive { n } else { n.saturating_add(1) };
        u64::try_from(n.max(0)).unwrap_or(0)
    };
    match field {
        "x-opt-offset" => match value {
            "-1" => Ok(Start::Earliest),
            "@latest" => Ok(Start::Latest),
            v => v
                .parse::<i64>()
                .map(|n| Start::Sequence(after(n)))
                .map_err(|_| bad()),
        },
        "x-opt-sequence-number" => value
            .parse::<i64>()
            .map(|n| Start::Sequence(after(n)))
            .map_err(|_| bad()),
        "x-opt-enqueued-time" => value
            .parse::<i64>()
            .map(|ms| Start::Time(if inclusive { ms } else { ms.saturating_add(1) }))
            .map_err(|_| bad()),
        _ => Err(bad()),
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions: `$management` response links

struct ReplyLink {
    id: u64,
    name: String,
    target: Option<String>,
    tx: mpsc::Sender<Message<Body<Value>>>,
}

/// The `$management` response links of one session.
#[derive(Default)]
pub(super) struct SessionNodes {
    replies: Mutex<Vec<ReplyLink>>,
    attached: Notify,
    next: std::sync::atomic::AtomicU64,
}

impl SessionNodes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ReplyLink>> {
        self.replies.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The response link for `reply_to`: target address, then link name, then the newest.
    fn route(&self, reply_to: Option<&str>) -> Option<mpsc::Sender<Message<Body<Value>>>> {
        let links = self.lock();
        let by = |f: &dyn Fn(&ReplyLink) -> bool| links.iter().rev().find(|l| f(l));
        reply_to
            .and_then(|r| by(&|l| l.target.as_deref() == Some(r)).or_else(|| by(&|l| l.name == r)))
            .or_else(|| links.last())
            .map(|l| l.tx.clone())
    }

    async fn reply(&self, reply_to: Option<&str>, msg: Message<Body<Value>>) -> bool {
        let deadline = tokio::time::Instant::now() + REPLY_WAIT;
        loop {
            let attached = self.attached.notified();
            if let Some(tx) = self.route(reply_to) {
                return tokio::time::timeout_at(deadline, tx.send(msg))
                    .await
                    .is_ok_and(|r| r.is_ok());
            }
            if tokio::time::timeout_at(deadline, attached).await.is_err() {
                return false;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Admission

/// A link of the endpoint, ready to run.
pub(super) enum Task {
    Requests {
        nodes: Arc<SessionNodes>,
    },
    Replies {
        nodes: Arc<SessionNodes>,
        name: String,
        target: Option<String>,
    },
    Reader(Box<ReaderTask>),
}

pub(super) struct ReaderTask {
    log: Arc<EventLog>,
    partition: u8,
    start: Start,
    reader: crate::core::readers::Reader,
    conn: Arc<super::ConnState>,
}

/// Checks an attach against the grants, the filter and the readers; the error is the
/// condition the link is refused with.
pub(super) fn admit(
    opening: Opening,
    conn: &Arc<super::ConnState>,
    core: &HubCore,
    nodes: &Arc<SessionNodes>,
) -> Result<(Task, LinkStop), fe2o3_amqp::types::definitions::Error> {
    let (Some(eh), Some(log)) = (core.settings.built_in_endpoint.as_ref(), core.log.as_ref())
    else {
        return Err(amqp_error(AmqpError::NotFound, "no built-in endpoint"));
    };
    let now = now_secs();
    let unauthorized = |what: &str| {
        amqp_error(
            AmqpError::UnauthorizedAccess,
            format!("{what}: this connection holds no valid service token for it"),
        )
    };
    match opening.node {
        Node::Unknown(path) => Err(amqp_error(
            AmqpError::NotFound,
            // Event Hubs' wording, which the SDKs turn into a not-found error they do not retry.
            format!(
                "The messaging entity '{path}' could not be found (consumer groups: {}).",
                eh.consumer_groups.join(", ")
            ),
        )),
        Node::Requests | Node::Replies => {
            let stop = conn
                .services
                .link_stop(&eh.name, now)
                .or_else(|| {
                    conn.services
                        .link_stop(&format!("{}/$management", eh.name), now)
                })
                .ok_or_else(|| unauthorized("$management"))?;
            let task = match opening.node {
                Node::Requests => Task::Requests {
                    nodes: nodes.clone(),
                },
                _ => Task::Replies {
                    nodes: nodes.clone(),
                    name: opening.name,
                    target: opening.target,
                },
            };
            Ok((task, stop))
        }
        Node::Partition {
            group,
            partition,
            path,
        } => {
            let stop = conn
                .services
                .link_stop(&path, now)
                .ok_or_else(|| unauthorized(&path))?;
            let filter = opening
                .filter
                .map_err(|e| amqp_error(custom_condition(ARGUMENT_ERROR), e))?;
            let start = match filter {
                Some(f) => {
                    parse_filter(&f).map_err(|e| amqp_error(custom_condition(ARGUMENT_ERROR), e))?
                }
                None => Start::Earliest,
            };
            let readers = &conn.services.readers;
            if readers.fetch_add(1, Ordering::AcqRel) >= MAX_READERS_PER_CONNECTION {
                readers.fetch_sub(1, Ordering::AcqRel);
                return Err(amqp_error(
                    AmqpError::ResourceLimitExceeded,
                    format!(
                        "at most {MAX_READERS_PER_CONNECTION} partition readers per connection"
                    ),
                ));
            }
            let reader = match core.readers.join(&group, partition, opening.owner_level) {
                Ok(r) => r,
                Err(e) => {
                    readers.fetch_sub(1, Ordering::AcqRel);
                    let condition = match e {
                        crate::core::readers::JoinError::Quota => {
                            AmqpError::ResourceLimitExceeded.into()
                        }
                        crate::core::readers::JoinError::Owned { .. } => custom_condition(STOLEN),
                    };
                    return Err(amqp_error(condition, e.to_string()));
                }
            };
            Ok((
                Task::Reader(Box::new(ReaderTask {
                    log: log.clone(),
                    partition: partition as u8,
                    start,
                    reader,
                    conn: conn.clone(),
                })),
                stop,
            ))
        }
    }
}

impl Task {
    pub(super) async fn run(self, link: LinkEndpoint, core: Arc<HubCore>, stop: LinkStop) {
        match (self, link) {
            (Task::Requests { nodes }, LinkEndpoint::Receiver(rx)) => {
                requests(rx, nodes, core, stop).await
            }
            (
                Task::Replies {
                    nodes,
                    name,
                    target,
                },
                LinkEndpoint::Sender(tx),
            ) => replies(tx, nodes, name, target, stop).await,
            (Task::Reader(r), LinkEndpoint::Sender(tx)) => {
                let conn = r.conn.clone();
                read_partition(tx, *r, stop).await;
                conn.services.readers.fetch_sub(1, Ordering::AcqRel);
            }
            (_, link) => {
                super::refuse(link, amqp_error(AmqpError::NotAllowed, "wrong link role")).await
            }
        }
    }
}

async fn close_sender(
    tx: Sender,
    stop: &LinkStop,
    error: Option<fe2o3_amqp::types::definitions::Error>,
) {
    let error = error.or_else(|| stop.is_cancelled().then(|| stop.error()));
    let _ = match error {
        Some(e) => tokio::time::timeout(CLOSE_WAIT, tx.close_with_error(e)).await,
        None => tokio::time::timeout(CLOSE_WAIT, tx.close()).await,
    };
}

// ---------------------------------------------------------------------------------------------
// `$management`

async fn requests(mut rx: Receiver, nodes: Arc<SessionNodes>, core: Arc<HubCore>, stop: LinkStop) {
    loop {
        let delivery = tokio::select! {
            _ = stop.cancelled() => break,
            d = rx.recv::<Body<Value>>() => d,
        };
        let Ok(delivery) = delivery else { return };
        let info = DeliveryInfo::from(&delivery);
        let request = delivery.message();
        let reply_to = request.properties.as_ref().and_then(|p| p.reply_to.clone());
        let reply = management(request, &core);
        let _ = rx.accept(info).await;
        if !nodes.reply(reply_to.as_deref(), reply).await {
            debug!("no $management response link took the reply in time; reply dropped");
        }
    }
    let _ = match stop.is_cancelled() {
        true => tokio::time::timeout(CLOSE_WAIT, rx.close_with_error(stop.error())).await,
        false => tokio::time::timeout(CLOSE_WAIT, rx.close()).await,
    };
}

async fn replies(
    mut tx: Sender,
    nodes: Arc<SessionNodes>,
    name: String,
    target: Option<String>,
    stop: LinkStop,
) {
    let (reply_tx, mut reply_rx) = mpsc::channel(REPLY_QUEUE);
    let id = nodes.next.fetch_add(1, Ordering::Relaxed);
    nodes.lock().push(ReplyLink {
        id,
        name,
        target,
        tx: reply_tx,
    });
    nodes.attached.notify_waiters();
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            _ = tx.on_detach() => {
                nodes.lock().retain(|l| l.id != id);
                return;
            }
            m = reply_rx.recv() => m,
        };
        let Some(msg) = msg else { break };
        let sendable = Sendable::builder().message(msg).settled(true).build();
        match tokio::time::timeout(Duration::from_secs(60), tx.send(sendable)).await {
            Ok(Ok(_)) => {}
            _ => break,
        }
    }
    nodes.lock().retain(|l| l.id != id);
    close_sender(tx, &stop, None).await;
}

fn app_text(m: &Message<Body<Value>>, key: &str) -> Option<String> {
    match m.application_properties.as_ref()?.0.get(key)? {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

/// The answer to one `$management` request.
fn management(request: &Message<Body<Value>>, core: &HubCore) -> Message<Body<Value>> {
    let correlation = request
        .properties
        .as_ref()
        .and_then(|p| p.message_id.clone());
    let answer = |status: i32, description: &str, condition: Option<&str>, body: Option<Value>| {
        management_reply(correlation.clone(), status, description, condition, body)
    };
    let (Some(eh), Some(log)) = (core.settings.built_in_endpoint.as_ref(), core.log.as_ref())
    else {
        return answer(404, "no built-in endpoint", Some("amqp:not-found"), None);
    };
    if app_text(request, "operation").as_deref() != Some("READ") {
        return answer(400, "only READ is served", Some("amqp:not-allowed"), None);
    }
    if !app_text(request, "name").is_some_and(|n| n.eq_ignore_ascii_case(&eh.name)) {
        return answer(404, "no such event hub", Some("amqp:not-found"), None);
    }
    match app_text(request, "type").as_deref() {
        Some("com.microsoft:eventhub") => answer(
            200,
            "OK",
            None,
            Some(eventhub_properties(eh, log.created_ms())),
        ),
        Some("com.microsoft:partition") => {
            let info = app_text(request, "partition")
                .and_then(|p| p.parse::<u8>().ok())
                .filter(|p| u32::from(*p) < eh.partition_count)
                .and_then(|p| Some((p, log.info(p)?)));
            match info {
                Some((p, info)) => answer(
                    200,
                    "OK",
                    None,
                    Some(partition_properties(&eh.name, p, &info)),
                ),
                None => answer(404, "no such partition", Some("amqp:not-found"), None),
            }
        }
        _ => answer(400, "unknown type", Some("amqp:not-allowed"), None),
    }
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    let mut m = OrderedMap::new();
    for (k, v) in entries {
        m.insert(Value::String(k.to_owned()), v);
    }
    Value::Map(m)
}

fn eventhub_properties(eh: &BuiltInEndpoint, created_ms: i64) -> Value {
    let ids: Vec<Value> = (0..eh.partition_count)
        .map(|p| Value::String(p.to_string()))
        .collect();
    map(vec![
        ("name", Value::String(eh.name.clone())),
        ("type", Value::String("com.microsoft:eventhub".into())),
        (
            "created_at",
            Value::Timestamp(Timestamp::from_milliseconds(created_ms)),
        ),
        ("partition_count", Value::Int(eh.partition_count as i32)),
        ("partition_ids", Value::Array(Array::from(ids))),
    ])
}

fn partition_properties(name: &str, p: u8, info: &crate::store::log::PartitionInfo) -> Value {
    let last = info.last.map_or(-1, |n| n as i64);
    map(vec![
        ("name", Value::String(name.to_owned())),
        ("type", Value::String("com.microsoft:partition".into())),
        ("partition", Value::String(p.to_string())),
        ("begin_sequence_number", Value::Long(info.begin as i64)),
        ("last_enqueued_sequence_number", Value::Long(last)),
        ("last_enqueued_offset", Value::String(last.to_string())),
        (
            "last_enqueued_time_utc",
            Value::Timestamp(Timestamp::from_milliseconds(info.last_enqueued_ms)),
        ),
        ("is_partition_empty", Value::Bool(info.empty)),
    ])
}

fn management_reply(
    correlation: Option<MessageId>,
    status: i32,
    description: &str,
    condition: Option<&str>,
    body: Option<Value>,
) -> Message<Body<Value>> {
    let mut app = OrderedMap::new();
    app.insert("status-code".to_owned(), SimpleValue::Int(status));
    app.insert(
        "status-description".to_owned(),
        SimpleValue::String(description.to_owned()),
    );
    if let Some(c) = condition {
        app.insert(
            "error-condition".to_owned(),
            SimpleValue::Symbol(Symbol::from(c)),
        );
    }
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            correlation_id: correlation,
            ..Default::default()
        }),
        application_properties: Some(ApplicationProperties(app)),
        body: Body::Value(AmqpValue(body.unwrap_or(Value::Null))),
        footer: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Partition readers

/// The event as the Event Hubs SDKs read it: IoT Hub's system annotations, the properties,
/// application properties and body the device sent.
pub(super) fn event_message(e: &Event) -> Message<Body<Value>> {
    let msg = &e.msg;
    let mut ann = msg.annotations.clone();
    let sym = |s: &str| OwnedKey::Symbol(Symbol::from(s));
    let device = msg.from.device().to_string();
    ann.insert(sym("x-opt-sequence-number"), Value::Long(e.sequence as i64));
    ann.insert(sym("x-opt-offset"), Value::String(e.offset()));
    ann.insert(
        sym("x-opt-enqueued-time"),
        Value::Timestamp(Timestamp::from_milliseconds(e.enqueued_ms)),
    );
    ann.insert(sym("x-opt-partition-key"), Value::String(device.clone()));
    ann.insert(sym(CONNECTION_DEVICE_ID), Value::String(device));
    if let Some(m) = msg.from.module() {
        ann.insert(sym(CONNECTION_MODULE_ID), Value::String(m.to_string()));
    }
    ann.insert(
        sym("iothub-connection-auth-method"),
        Value::String(
            r#"{"scope":"device","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}"#
                .into(),
        ),
    );
    ann.insert(
        sym(ENQUEUED_TIME),
        Value::Timestamp(Timestamp::from_milliseconds(msg.enqueued_ms)),
    );
    ann.insert(
        sym("iothub-message-source"),
        Value::String("Telemetry".into()),
    );
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: Some(MessageAnnotations(ann)),
        properties: msg.properties.clone(),
        application_properties: (!msg.application_properties.is_empty())
            .then(|| ApplicationProperties(msg.application_properties.clone())),
        body: Body::Data(vec![Data(Binary::from(msg.body.clone()))].into()),
        footer: None,
    }
}

async fn read_partition(mut tx: Sender, r: ReaderTask, stop: LinkStop) {
    let ReaderTask {
        log,
        partition,
        start,
        reader,
        ..
    } = r;
    let Some(mut tail) = log.watch(partition) else {
        return;
    };
    let begin = || log.info(partition).map_or(0, |i| i.begin);
    let mut next = match start {
        Start::Earliest => begin(),
        Start::Latest => *tail.borrow(),
        Start::Sequence(n) => n.max(begin()),
        Start::Time(ms) => {
            let log = log.clone();
            match tokio::task::spawn_blocking(move || log.first_at_or_after(partition, ms)).await {
                Ok(Ok(n)) => n,
                _ => {
                    let e = amqp_error(AmqpError::InternalError, "reading the event log failed");
                    return close_sender(tx, &stop, Some(e)).await;
                }
            }
        }
    };
    let stolen = || {
        amqp_error(
            custom_condition(STOLEN),
            "a reader with a higher or equal owner level took this partition over",
        )
    };
    let mut batch: VecDeque<Event> = VecDeque::new();
    loop {
        if batch.is_empty() {
            let end = *tail.borrow_and_update();
            if next >= end {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = reader.stolen.cancelled() => return close_sender(tx, &stop, Some(stolen())).await,
                    _ = tx.on_detach() => return,
                    changed = tail.changed() => if changed.is_err() { break },
                }
                continue;
            }
            let log2 = log.clone();
            let read = tokio::task::spawn_blocking(move || {
                log2.read(partition, next, READ_BATCH, READ_BATCH_BYTES)
            })
            .await;
            match read {
                Ok(Ok(events)) if events.is_empty() => {
                    // Removed by retention meanwhile: go on from what is kept.
                    next = next.max(begin()).max(end);
                    continue;
                }
                Ok(Ok(events)) => batch.extend(events),
                _ => {
                    let e = amqp_error(AmqpError::InternalError, "reading the event log failed");
                    return close_sender(tx, &stop, Some(e)).await;
                }
            }
        }
        let Some(event) = batch.pop_front() else {
            continue;
        };
        let sendable = Sendable::builder()
            .message(event_message(&event))
            .settled(true)
            .build();
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = reader.stolen.cancelled() => return close_sender(tx, &stop, Some(stolen())).await,
            sent = tx.send(sendable) => {
                if let Err(e) = sent {
                    debug!(error = ?e, "event delivery failed");
                    return;
                }
            }
        }
        next = event.sequence + 1;
    }
    close_sender(tx, &stop, None).await;
}

#[cfg(test)]
mod tests;
