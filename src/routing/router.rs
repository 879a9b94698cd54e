//! The router: which endpoints a message goes to.
//!
//! It owns the compiled routes and one [`Endpoint`] per sink. Evaluation is pure: every route is
//! tested, and when several matching routes point at the same endpoint the message is enqueued
//! there once, with the best (lowest) priority and that route's TTL, as edgeHub does.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use tokio::sync::Notify;

use crate::{
    model::identity::{DeviceId, ModuleId},
    model::message::Message,
    routing::condition::ConditionSet,
    routing::route::{Route, Sink},
    store::queue::{Endpoint, MemoryQueue, QueueStore},
};

/// Where one message goes, and how.
#[derive(Clone)]
pub struct Target {
    pub endpoint: Arc<Endpoint>,
    pub priority: u32,
    /// Absolute expiry in ms since the epoch; `None` = never.
    pub expires_ms: Option<i64>,
}

type ReadyMap = Arc<Mutex<HashMap<ModuleId, Arc<Notify>>>>;

fn ready_of(map: &ReadyMap, module: &ModuleId) -> Arc<Notify> {
    map.lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(module.clone())
        .or_default()
        .clone()
}

/// Makes the queue of an endpoint, given its id (memory or the durable store).
pub type QueueFactory = dyn Fn(&str) -> Arc<dyn QueueStore> + Send + Sync;

/// In-memory queues of `capacity` messages.
pub fn memory_queues(capacity: usize) -> Box<QueueFactory> {
    Box::new(move |_| Arc::new(MemoryQueue::new(capacity)))
}

/// The endpoint id of `$upstream`.
pub const UPSTREAM_ENDPOINT: &str = "iothub";

/// The sink an endpoint id stands for (`iothub`, or `{device}/{module}/{input}`).
pub fn sink_of(endpoint_id: &str) -> Option<Sink> {
    if endpoint_id == UPSTREAM_ENDPOINT {
        return Some(Sink::Upstream);
    }
    let mut parts = endpoint_id.splitn(3, '/');
    let (_device, module, input) = (parts.next()?, parts.next()?, parts.next()?);
    Some(Sink::ModuleInput {
        module: ModuleId::parse(module).ok()?,
        input: input.to_owned(),
    })
}

/// One route as [`Router::route`] walks it: what it needs, packed together.
struct Planned {
    /// Index into `Router::prefixes`.
    prefix: usize,
    /// Index into `Router::sinks`.
    sink: usize,
    /// Number of the route's condition in `Router::conditions`.
    condition: Option<usize>,
    priority: u32,
    time_to_live_secs: u32,
}

/// Whether a message from `source` matches a route's `prefix` (lower-cased, ending in `/`):
/// whether `source`, without its trailing slashes and with one `/` added, starts with
/// `prefix`, ignoring ASCII case.
fn under(source: &str, prefix: &str) -> bool {
    let s = source.trim_end_matches('/').as_bytes();
    let p = prefix.as_bytes();
    match p.split_last() {
        // The prefix ends with the added `/`.
        Some((b'/', head)) if head.len() == s.len() => s.eq_ignore_ascii_case(head),
        _ => s.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p)),
    }
}

/// Routes plus the endpoints they feed.
pub struct Router {
    endpoints: BTreeMap<Sink, Arc<Endpoint>>,
    /// Per module: the wake-up shared by all of its input endpoints. Shared by every generation
    /// of the router, so a link waiting on it is woken by endpoints a reload adds.
    module_ready: Arc<Mutex<HashMap<ModuleId, Arc<Notify>>>>,
    global_ttl_secs: Option<u64>,
    /// The routes, best priority first.
    plan: Vec<Planned>,
    /// Every route's condition, sharing lookups: a property or body path that many routes
    /// test is read once per message.
    conditions: ConditionSet,
    /// Distinct source prefixes (lower-cased, one trailing `/`).
    prefixes: Vec<String>,
    /// Distinct sinks with their endpoints.
    sinks: Vec<Arc<Endpoint>>,
    /// Bumped by every rebuild, so link tasks know to fetch their endpoints again.
    pub generation: u64,
}

impl Router {
    /// A router for `routes`; `extra` sinks get endpoints even without a route (queues that
    /// still hold messages from before a restart).
    pub fn new(
        device: &DeviceId,
        routes: Vec<Route>,
        global_ttl_secs: Option<u64>,
        queues: &QueueFactory,
        extra: &[Sink],
    ) -> Self {
        Self::build(device, routes, global_ttl_secs, queues, None, extra)
    }

    /// A router for new routes that keeps every endpoint (and so every queued message) of
    /// `previous`: an endpoint no route feeds any more still drains what it holds.
    pub fn rebuild(
        previous: &Router,
        device: &DeviceId,
        routes: Vec<Route>,
        global_ttl_secs: Option<u64>,
        queues: &QueueFactory,
    ) -> Self {
        Self::build(device, routes, global_ttl_secs, queues, Some(previous), &[])
    }

    fn build(
        device: &DeviceId,
        routes: Vec<Route>,
        global_ttl_secs: Option<u64>,
        queues: &QueueFactory,
        previous: Option<&Router>,
        extra: &[Sink],
    ) -> Self {
        let mut endpoints = previous.map(|p| p.endpoints.clone()).unwrap_or_default();
        let module_ready = previous.map(|p| p.module_ready.clone()).unwrap_or_default();
        let sinks = routes
            .iter()
            .map(|r| r.statement.sink.clone())
            .chain(extra.iter().cloned());
        for sink in sinks {
            if endpoints.contains_key(&sink) {
                continue;
            }
            let endpoint = match &sink {
                Sink::Upstream => {
                    let id = UPSTREAM_ENDPOINT.to_owned();
                    Endpoint::new(id.clone(), None, queues(&id), Arc::new(Notify::new()))
                }
                Sink::ModuleInput { module, input } => {
                    let id = format!("{device}/{module}/{input}");
                    let ready = ready_of(&module_ready, module);
                    Endpoint::new(id.clone(), Some(input.clone()), queues(&id), ready)
                }
            };
            endpoints.insert(sink, Arc::new(endpoint));
        }
        // Best priority first (stable: among equals the first configured wins), so the first
        // route that matches a sink decides its priority and TTL and later ones can be skipped.
        let mut routes = routes;
        routes.sort_by_key(|r| r.priority);
        let mut prefixes: Vec<String> = Vec::new();
        let mut sink_ids: Vec<Sink> = Vec::new();
        let mut sinks = Vec::new();
        let mut conditions = Vec::new();
        let mut plan = Vec::with_capacity(routes.len());
        for r in &routes {
            let p = match prefixes
                .iter()
                .position(|x| *x == r.statement.source_prefix)
            {
                Some(i) => i,
                None => {
                    prefixes.push(r.statement.source_prefix.clone());
                    prefixes.len() - 1
                }
            };
            let k = match sink_ids.iter().position(|x| *x == r.statement.sink) {
                Some(i) => i,
                None => {
                    sink_ids.push(r.statement.sink.clone());
                    sinks.push(endpoints[&r.statement.sink].clone());
                    sink_ids.len() - 1
                }
            };
            let condition = r.statement.condition.as_ref().map(|c| {
                conditions.push(c);
                conditions.len() - 1
            });
            plan.push(Planned {
                prefix: p,
                sink: k,
                condition,
                priority: r.priority,
                time_to_live_secs: r.time_to_live_secs,
            });
        }
        let conditions = ConditionSet::new(&conditions);
        Self {
            endpoints,
            module_ready,
            global_ttl_secs,
            plan,
            conditions,
            prefixes,
            sinks,
            generation: previous.map_or(0, |p| p.generation + 1),
        }
    }

    /// The endpoints a message goes to (deduplicated).
    pub fn route(&self, msg: &Message) -> Vec<Target> {
        let source = msg.source_path();
        let view = crate::routing::view::RoutingView::new(msg);
        let slots = self.conditions.slots(&view);
        // One scratch array for two tables: per distinct source prefix, 0 = not checked yet,
        // 1 = matches, 2 = does not; per sink, 0 = not taken, else 1 + the route that took it.
        let mut scratch = vec![0usize; self.prefixes.len() + self.sinks.len()];
        let (prefix_match, chosen) = scratch.split_at_mut(self.prefixes.len());
        let mut taken = 0;
        for (i, r) in self.plan.iter().enumerate() {
            if chosen[r.sink] != 0 {
                // A route with a better or equal priority already took this sink.
                continue;
            }
            let p = r.prefix;
            if prefix_match[p] == 0 {
                prefix_match[p] = if under(&source, &self.prefixes[p]) {
                    1
                } else {
                    2
                };
            }
            if prefix_match[p] != 1 {
                continue;
            }
            if let Some(c) = r.condition {
                if !self.conditions.matches(c, &slots) {
                    continue;
                }
            }
            chosen[r.sink] = i + 1;
            taken += 1;
            if taken == chosen.len() {
                break;
            }
        }
        let mut targets = Vec::with_capacity(taken);
        for (&c, endpoint) in chosen.iter().zip(&self.sinks) {
            let Some(r) = c.checked_sub(1).and_then(|i| self.plan.get(i)) else {
                continue;
            };
            let ttl = if r.time_to_live_secs > 0 {
                Some(u64::from(r.time_to_live_secs))
            } else {
                self.global_ttl_secs
            };
            let expires_ms = ttl.map(|t| {
                msg.enqueued_ms
                    .saturating_add((t as i64).saturating_mul(1000))
            });
            targets.push(Target {
                endpoint: endpoint.clone(),
                priority: r.priority,
                expires_ms,
            });
        }
        targets
    }

    /// A module's input endpoints and their shared wake-up; empty when no route feeds it.
    pub fn module_inputs(&self, module: &ModuleId) -> (Vec<Arc<Endpoint>>, Arc<Notify>) {
        let eps = self
            .endpoints
            .iter()
            .filter(|(s, _)| matches!(s, Sink::ModuleInput { module: m, .. } if m == module))
            .map(|(_, e)| e.clone())
            .collect();
        let ready = ready_of(&self.module_ready, module);
        (eps, ready)
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.endpoints.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{model::identity::Identity, routing::route::parse_statement};

    fn route(name: &str, text: &str, priority: u32, ttl: u32) -> Route {
        Route {
            name: name.into(),
            statement: parse_statement(text).unwrap(),
            priority,
            time_to_live_secs: ttl,
        }
    }

    fn msg(module: &str, output: Option<&str>) -> Message {
        Message {
            body: vec![],
            properties: None,
            application_properties: Default::default(),
            annotations: Default::default(),
            from: Identity::Module(
                DeviceId::parse("d").unwrap(),
                ModuleId::parse(module).unwrap(),
            ),
            output: output.map(str::to_owned),
            enqueued_ms: 1_000,
            twin_change: false,
            id: crate::model::message::next_id(),
        }
    }

    #[test]
    fn one_copy_per_endpoint_with_the_best_priority() {
        let b = "BrokeredEndpoint(\"/modules/b/inputs/in1\")";
        let r = Router::new(
            &DeviceId::parse("d").unwrap(),
            vec![
                route("all", &format!("FROM /* INTO {b}"), 5, 10),
                route("a", &format!("FROM /messages/modules/a/* INTO {b}"), 1, 0),
                route(
                    "up",
                    "FROM /messages/modules/a/outputs/* INTO $upstream",
                    9,
                    0,
                ),
            ],
            Some(60),
            &memory_queues(10),
            &[],
        );
        let t = r.route(&msg("a", Some("o")));
        assert_eq!(t.len(), 2);
        let to_b = t.iter().find(|t| t.endpoint.id == "d/b/in1").unwrap();
        assert_eq!(to_b.priority, 1);
        assert_eq!(
            to_b.expires_ms,
            Some(61_000),
            "route TTL 0 falls back to the global TTL"
        );

        let t = r.route(&msg("a", None));
        assert_eq!(t.len(), 1, "no output: outputs/* does not match");
        let t = r.route(&msg("c", None));
        assert_eq!(
            (t.len(), t[0].priority, t[0].expires_ms),
            (1, 5, Some(11_000))
        );

        let (inputs, ready_b) = r.module_inputs(&ModuleId::parse("b").unwrap());
        assert_eq!(inputs.len(), 1);
        assert!(r.module_inputs(&ModuleId::parse("a").unwrap()).0.is_empty());

        // A rebuild keeps the old endpoints (their queues) and the modules' wake-ups.
        let c = "BrokeredEndpoint(\"/modules/b/inputs/in2\")";
        let r2 = Router::rebuild(
            &r,
            &DeviceId::parse("d").unwrap(),
            vec![route("c", &format!("FROM /* INTO {c}"), 0, 0)],
            None,
            &memory_queues(10),
        );
        let (inputs2, ready_b2) = r2.module_inputs(&ModuleId::parse("b").unwrap());
        assert_eq!(inputs2.len(), 2);
        assert!(inputs2.iter().any(|e| Arc::ptr_eq(e, &inputs[0])));
        assert!(Arc::ptr_eq(&ready_b, &ready_b2));
        assert_eq!(r2.generation, r.generation + 1);
        assert_eq!(
            r2.route(&msg("a", Some("o"))).len(),
            1,
            "only the new routes apply"
        );
    }
}

/// The router against a naive model on random route tables and messages.
#[cfg(test)]
mod model {
    use super::*;
    use crate::{model::identity::Identity, routing::route::parse_statement};

    /// A small deterministic generator (xorshift), so failures replay from the seed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[(self.next() % items.len() as u64) as usize]
        }
    }

    const SOURCES: &[&str] = &[
        "/*",
        "/messages/*",
        "/messages",
        "/messages/modules/*",
        "/messages/modules/a/*",
        "/messages/modules/A",
        "/messages/modules/b/*",
        "/messages/modules/a/outputs/*",
        "/messages/modules/a/outputs/o1",
        "/messages/modules/a/outputs/O2",
        "/messages/modules/ab/*",
        "/twinChangeNotifications",
    ];
    const SINKS: &[&str] = &[
        "$upstream",
        "BrokeredEndpoint(\"/modules/b/inputs/i1\")",
        "BrokeredEndpoint(\"/modules/b/inputs/i2\")",
        "BrokeredEndpoint(\"/modules/c/inputs/i1\")",
    ];

    /// The model: segment lists compared case-insensitively, the route's trailing `*` dropped.
    fn naive_matches(route_source: &str, message_source: &str) -> bool {
        let segs = |s: &str| -> Vec<String> {
            s.split('/')
                .filter(|x| !x.is_empty())
                .map(str::to_ascii_lowercase)
                .collect()
        };
        let mut r = segs(route_source);
        if r.last().map(String::as_str) == Some("*") {
            r.pop();
        }
        let m = segs(message_source);
        r.len() <= m.len() && r.iter().zip(&m).all(|(a, b)| a == b)
    }

    #[test]
    fn router_agrees_with_the_model() {
        let device = DeviceId::parse("d").unwrap();
        for seed in 1..=300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let n = 1 + rng.next() % 8;
            let mut routes = Vec::new();
            for _ in 0..n {
                let src = *rng.pick(SOURCES);
                let sink = *rng.pick(SINKS);
                let priority = (rng.next() % 10) as u32;
                let ttl = (rng.next() % 3) as u32 * 30;
                routes.push((src, sink, priority, ttl));
            }
            let table: Vec<Route> = routes
                .iter()
                .enumerate()
                .map(|(i, (src, sink, p, ttl))| Route {
                    name: format!("r{i}"),
                    statement: parse_statement(&format!("FROM {src} INTO {sink}")).unwrap(),
                    priority: *p,
                    time_to_live_secs: *ttl,
                })
                .collect();
            let router = Router::new(&device, table, Some(600), &memory_queues(100), &[]);
            for _ in 0..20 {
                let module = *rng.pick(&["a", "b", "ab"]);
                let output = *rng.pick(&[None, Some("o1"), Some("O2"), Some("x")]);
                let twin = rng.next() % 5 == 0;
                let msg = Message {
                    body: vec![],
                    properties: None,
                    application_properties: Default::default(),
                    annotations: Default::default(),
                    from: Identity::Module(device.clone(), ModuleId::parse(module).unwrap()),
                    output: output.map(str::to_owned),
                    enqueued_ms: 0,
                    twin_change: twin,
                    id: crate::model::message::next_id(),
                };
                let source = msg.source_path();
                // Model: per sink, the best priority among matching routes and its TTL.
                let mut want: BTreeMap<String, (u32, Option<i64>)> = BTreeMap::new();
                for (src, sink, p, ttl) in &routes {
                    if !naive_matches(src, &source) {
                        continue;
                    }
                    let id = parse_statement(&format!("FROM /x INTO {sink}"))
                        .unwrap()
                        .sink
                        .to_string();
                    let expiry = Some(if *ttl > 0 { *ttl as i64 } else { 600 } * 1000);
                    let e = want.entry(id).or_insert((*p, expiry));
                    if *p < e.0 {
                        *e = (*p, expiry);
                    }
                }
                let got: BTreeMap<String, (u32, Option<i64>)> = router
                    .route(&msg)
                    .into_iter()
                    .map(|t| {
                        let sink = router
                            .endpoints
                            .iter()
                            .find(|(_, e)| Arc::ptr_eq(e, &t.endpoint))
                            .map(|(s, _)| s.to_string())
                            .unwrap();
                        (sink, (t.priority, t.expires_ms))
                    })
                    .collect();
                assert_eq!(got, want, "seed {seed}, source {source}, routes {routes:?}");
            }
        }
    }

    const CONDITIONS: &[&str] = &[
        "alert = 'high'",
        "ALERT = 'high' OR alert = 'low'",
        "alert <> 'high'",
        "$alert = 'high'",
        "lower(alert) = 'high'",
        "$connectionModuleId = 'a'",
        "{$connectionModuleId} = 'a'",
        "$connectionModuleId = 'b' OR alert = 'low'",
        "as_number(seq) % 2 = 0",
        "as_number(seq) % 2 = 0 AND $connectionModuleId = 'a'",
        "NOT is_defined(alert)",
        "$body.t > 3",
        "$body.t > 3 AND $body.tags[0] = 'x'",
        "$body.T = 1",
        "{$body.t} = 9",
        "$body.n.m = 'deep'",
        "$body.list[1] = 2",
        "$body.n.* = 'deep'",
        "is_null($body.gone)",
    ];
    const APP: &[(&str, &str)] = &[
        ("alert", "high"),
        ("Alert", "low"),
        ("ALERT", "HIGH"),
        ("$alert", "high"),
        ("$connectionModuleId", "b"),
        ("seq", "4"),
        ("SEQ", "3"),
        ("$body.t", "9"),
    ];
    const BODIES: &[&str] = &[
        r#"{"t": 5, "tags": ["x", "y"], "n": {"m": "deep"}, "list": [1, 2]}"#,
        r#"{"t": 1, "T": 1, "tags": ["y"], "t": 4}"#,
        r#"{"tags": "x", "list": {"1": 2}, "n": {"m": "deep", "m": "shallow"}}"#,
        r#"[1]"#,
        r#"{"t": 5,"#,
    ];

    /// The router against the model on random routes with conditions: the model evaluates
    /// each route's condition alone, on a fresh view of the message.
    #[test]
    fn router_with_conditions_agrees_with_the_model() {
        use crate::routing::view::RoutingView;
        use fe2o3_amqp::types::{
            messaging::Properties,
            primitives::{SimpleValue, Symbol},
        };
        let device = DeviceId::parse("d").unwrap();
        // Conditions tested by the model that held and that did not.
        let mut outcomes = [0; 2];
        for seed in 1..=300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
            let n = 1 + rng.next() % 12;
            let mut routes = Vec::new();
            for _ in 0..n {
                let src = *rng.pick(&SOURCES[..SOURCES.len() - 1]);
                let sink = *rng.pick(SINKS);
                let condition = (rng.next() % 5 != 0).then(|| *rng.pick(CONDITIONS));
                let priority = (rng.next() % 4) as u32;
                routes.push((src, sink, condition, priority));
            }
            let statement = |(src, sink, condition, _): &(&str, &str, Option<&str>, u32)| {
                let text = match condition {
                    Some(c) => format!("FROM {src} WHERE {c} INTO {sink}"),
                    None => format!("FROM {src} INTO {sink}"),
                };
                parse_statement(&text).unwrap()
            };
            let table: Vec<Route> = routes
                .iter()
                .enumerate()
                .map(|(i, r)| Route {
                    name: format!("r{i}"),
                    statement: statement(r),
                    priority: r.3,
                    time_to_live_secs: 0,
                })
                .collect();
            let router = Router::new(&device, table, None, &memory_queues(100), &[]);
            for _ in 0..20 {
                let mut app = serde_amqp::primitives::OrderedMap::new();
                for (name, value) in APP {
                    if rng.next() % 3 == 0 {
                        app.insert((*name).to_owned(), SimpleValue::String((*value).into()));
                    }
                }
                let json = rng.next() % 4 != 0;
                let msg = Message {
                    body: rng.pick(BODIES).as_bytes().to_vec(),
                    properties: Some(Properties {
                        content_type: Some(Symbol::from(if json {
                            "Application/JSON"
                        } else {
                            "text/plain"
                        })),
                        content_encoding: Some(Symbol::from("UTF-8")),
                        ..Default::default()
                    }),
                    application_properties: app,
                    annotations: Default::default(),
                    from: Identity::Module(
                        device.clone(),
                        ModuleId::parse(if rng.next() % 2 == 0 { "a" } else { "b" }).unwrap(),
                    ),
                    output: Some("o1".to_owned()),
                    enqueued_ms: 0,
                    twin_change: false,
                    id: crate::model::message::next_id(),
                };
                let source = msg.source_path();
                let mut want: BTreeMap<String, u32> = BTreeMap::new();
                for r in &routes {
                    let s = statement(r);
                    if !naive_matches(r.0, &source) {
                        continue;
                    }
                    let taken = match &s.condition {
                        Some(c) => {
                            let holds = c.matches(&RoutingView::new(&msg));
                            outcomes[usize::from(holds)] += 1;
                            holds
                        }
                        None => true,
                    };
                    if taken {
                        let e = want.entry(s.sink.to_string()).or_insert(r.3);
                        *e = (*e).min(r.3);
                    }
                }
                let got: BTreeMap<String, u32> = router
                    .route(&msg)
                    .into_iter()
                    .map(|t| {
                        let sink = router
                            .endpoints
                            .iter()
                            .find(|(_, e)| Arc::ptr_eq(e, &t.endpoint))
                            .map(|(s, _)| s.to_string())
                            .unwrap();
                        (sink, t.priority)
                    })
                    .collect();
                assert_eq!(got, want, "seed {seed}, routes {routes:?}");
            }
        }
        assert!(outcomes.iter().all(|&n| n > 1_000), "{outcomes:?}");
    }
}
