//! Metric names, descriptions and the small helpers that record them.
//!
//! Names and labels follow edgeHub (`edgehub_*`, counters end in `_total`, summaries with
//! quantiles 0.1/0.5/0.9/0.99) so existing dashboards keep working. Every series carries the
//! common labels `iothub`, `edge_device` and `instance_number`. Labels are bounded: identities
//! and endpoint ids, never message ids.

use std::sync::OnceLock;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::model::message::Message;

pub const MESSAGES_RECEIVED: &str = "edgehub_messages_received_total";
pub const MESSAGES_SENT: &str = "edgehub_messages_sent_total";
pub const MESSAGES_DROPPED: &str = "edgehub_messages_dropped_total";
pub const MESSAGES_UNACK: &str = "edgehub_messages_unack_total";
pub const MESSAGE_SIZE: &str = "edgehub_message_size_bytes";
pub const MESSAGE_SEND_DURATION: &str = "edgehub_message_send_duration_seconds";
pub const MESSAGE_PROCESS_DURATION: &str = "edgehub_message_process_duration_seconds";
pub const QUEUE_LENGTH: &str = "edgehub_queue_length";
pub const CONNECT_SUCCESS: &str = "edgehub_client_connect_success_total";
pub const CONNECT_FAILED: &str = "edgehub_client_connect_failed_total";
pub const DISCONNECT: &str = "edgehub_client_disconnect_total";
pub const CONNECTED_CLIENTS: &str = "edgehub_connected_clients";
pub const OPEN_CONNECTIONS: &str = "edgehub_open_connections";
pub const BYTES_RECEIVED: &str = "edgehub_bytes_received_total";
pub const BYTES_SENT: &str = "edgehub_bytes_sent_total";
pub const INVALID_ROUTES: &str = "edgehub_invalid_routes";
pub const C2D_RECEIVED: &str = "edgehub_c2d_messages_received_total";
pub const C2D_DELIVERED: &str = "edgehub_c2d_messages_delivered_total";
pub const C2D_SETTLED: &str = "edgehub_c2d_messages_settled_total";
pub const C2D_REFUSED: &str = "edgehub_c2d_messages_refused_total";
pub const C2D_FEEDBACK: &str = "edgehub_c2d_feedback_records_total";
pub const C2D_QUEUE_LENGTH: &str = "edgehub_c2d_queue_length";

pub const DROP_NO_ROUTE: &str = "no_route";
pub const DROP_TTL: &str = "ttl_expiry";
pub const DROP_REJECTED: &str = "rejected_by_module";
pub const DROP_OVERFLOW: &str = "overflow";
pub const DROP_UPSTREAM_REJECTED: &str = "rejected_upstream";
pub const DROP_UPSTREAM_UNKNOWN: &str = "unknown_origin";

/// `reason` of `edgehub_messages_unack_total`: why a message was refused (see `IngestError`).
pub const UNACK_QUEUE_FULL: &str = "queue_full";
pub const UNACK_STORE_FULL: &str = "store_full";
pub const UNACK_STORE_BUSY: &str = "store_busy";
pub const UNACK_CLOSED: &str = "closed";
pub const UNACK_STORAGE: &str = "storage";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and describes every series. Later calls (several
/// hubs in one test process) reuse the first recorder and its common labels.
pub fn install(iothub: &str, edge_device: &str) -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .add_global_label("iothub", iothub)
                .add_global_label("edge_device", edge_device)
                .add_global_label("instance_number", uuid::Uuid::new_v4().to_string())
                .set_quantiles(&[0.1, 0.5, 0.9, 0.99])
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is already installed, in which case nothing we
            // record would reach this handle; say so rather than serve an empty page silently.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            handle
        })
        .clone()
}

/// How often [`upkeep`] drains the recorded samples.
pub const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Drains the samples of every summary into its quantile sketch every [`UPKEEP_EVERY`] until
/// `stop`, on the blocking pool (a second of a busy hub's samples is a few hundred thousand).
/// The exporter keeps each recorded value until a render or an upkeep takes it: a hub that
/// nobody scrapes would otherwise hold every message's latencies and size, about 60 bytes per
/// message, for as long as it runs. Each hub runs one.
pub async fn upkeep(handle: PrometheusHandle, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let h = handle.clone();
        if tokio::task::spawn_blocking(move || h.run_upkeep())
            .await
            .is_err()
        {
            tracing::warn!("draining the metrics' samples failed");
        }
        UPKEEPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

static UPKEEPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many runs of [`upkeep`] this process has completed.
pub fn upkeeps() -> u64 {
    UPKEEPS.load(std::sync::atomic::Ordering::Relaxed)
}

fn describe() {
    describe_counter!(MESSAGES_RECEIVED, "Messages received from clients");
    describe_counter!(
        MESSAGES_SENT,
        "Messages delivered to an endpoint and acknowledged"
    );
    describe_counter!(MESSAGES_DROPPED, "Messages dropped, by reason");
    describe_counter!(
        MESSAGES_UNACK,
        "Messages that could not be stored and were not acknowledged"
    );
    describe_histogram!(MESSAGE_SIZE, Unit::Bytes, "Size of received messages");
    describe_histogram!(
        MESSAGE_SEND_DURATION,
        Unit::Seconds,
        "Time from send to acknowledgement"
    );
    describe_histogram!(
        MESSAGE_PROCESS_DURATION,
        Unit::Seconds,
        "Time a message spent in the hub"
    );
    describe_gauge!(QUEUE_LENGTH, "Messages held per endpoint and priority");
    describe_counter!(CONNECT_SUCCESS, "Successful client authentications");
    describe_counter!(CONNECT_FAILED, "Failed client authentications");
    describe_counter!(DISCONNECT, "Client disconnections");
    describe_gauge!(CONNECTED_CLIENTS, "Authenticated clients connected");
    describe_gauge!(
        REGISTRY_IDENTITIES,
        "Identities (devices and modules) in the service API's registry, besides the config file's"
    );
    describe_gauge!(OPEN_CONNECTIONS, "Open client connections, by protocol");
    describe_counter!(
        MQTT_REFUSED,
        "MQTT packets refused: the connection closed or the message dropped, by reason"
    );
    describe_counter!(
        BYTES_RECEIVED,
        Unit::Bytes,
        "Message bytes received from clients"
    );
    describe_counter!(
        BYTES_SENT,
        Unit::Bytes,
        "Message bytes delivered to clients"
    );
    describe_gauge!(
        INVALID_ROUTES,
        "Configured routes that are invalid and not running"
    );
    describe_counter!(
        C2D_RECEIVED,
        "Cloud-to-device messages queued for a device, by source (service, upstream)"
    );
    describe_counter!(
        C2D_DELIVERED,
        "Cloud-to-device deliveries to devices (a redelivery counts again)"
    );
    describe_counter!(
        C2D_SETTLED,
        "Cloud-to-device messages settled, by outcome (completed, abandoned, rejected, expired, delivery_count_exceeded)"
    );
    describe_counter!(
        C2D_REFUSED,
        "Cloud-to-device messages refused, by reason (device_not_found, queue_full, too_large, storage)"
    );
    describe_counter!(
        C2D_FEEDBACK,
        "Feedback records written for the service, or dropped with a full feedback queue, by result"
    );
    describe_gauge!(
        C2D_QUEUE_LENGTH,
        "Cloud-to-device messages held for devices (queued or delivered, not settled)"
    );
    describe_counter!(DIRECT_METHODS, "Direct method calls");
    describe_histogram!(
        DIRECT_METHOD_DURATION,
        Unit::Seconds,
        "Direct method call duration"
    );
    describe_counter!(GET_TWIN, "Twin reads");
    describe_histogram!(GET_TWIN_DURATION, Unit::Seconds, "Twin read duration");
    describe_counter!(REPORTED_PROPERTIES, "Reported-property updates");
    describe_histogram!(
        REPORTED_PROPERTIES_DURATION,
        Unit::Seconds,
        "Reported-property update duration"
    );
    describe_gauge!(
        PROCESS_RSS,
        Unit::Bytes,
        "Resident memory of the hub process"
    );
    describe_gauge!(
        STORE_HELD_BYTES,
        Unit::Bytes,
        "Bytes of queued messages held against storeLimits.maxSizeBytes"
    );
    describe_gauge!(STORE_LIMIT_BYTES, Unit::Bytes, "storeLimits.maxSizeBytes");
    describe_counter!(OFFLINE_COUNT, "Times the upstream connection was lost");
    describe_histogram!(
        OFFLINE_DURATION,
        Unit::Seconds,
        "How long the upstream was away, per outage"
    );
    describe_counter!(OPERATION_RETRY, "Upstream operations retried");
    describe_gauge!(UPSTREAM_CONNECTED, "1 while the upstream connection is up");
    describe_gauge!(
        STORE_BYTES,
        Unit::Bytes,
        "Bytes the message and twin store takes on disk"
    );
}

fn output_label(msg: &Message) -> String {
    msg.output.clone().unwrap_or_default()
}

pub fn dropped(reason: &'static str, msg: &Message) {
    counter!(MESSAGES_DROPPED, "reason" => reason, "from" => msg.from.to_string(), "from_route_output" => output_label(msg))
        .increment(1);
}

pub fn unacked(reason: &'static str, msg: &Message) {
    counter!(MESSAGES_UNACK, "reason" => reason, "from" => msg.from.to_string(), "from_route_output" => output_label(msg))
        .increment(1);
}

pub fn queue_length_gauge(endpoint: &str, priority: u32) -> metrics::Gauge {
    gauge!(QUEUE_LENGTH, "endpoint" => endpoint.to_owned(), "priority" => priority.to_string())
}

pub fn c2d_queue_length(n: usize) {
    gauge!(C2D_QUEUE_LENGTH).set(n as f64);
}

pub fn c2d_refused(reason: &'static str) {
    counter!(C2D_REFUSED, "reason" => reason).increment(1);
}

pub fn connect_success(id: &str) {
    counter!(CONNECT_SUCCESS, "id" => id.to_owned()).increment(1);
}

pub fn connect_failed(id: &str, reason: &'static str) {
    counter!(CONNECT_FAILED, "id" => id.to_owned(), "reason" => reason).increment(1);
}

pub fn disconnected(id: &str) {
    counter!(DISCONNECT, "id" => id.to_owned()).increment(1);
}

/// Creates the unlabelled gauges at 0 (without changing one that has a value), so that a
/// scrape right after start shows them: alerts on an absent series see nothing.
pub fn start_gauges(upstream: bool) {
    for protocol in [PROTOCOL_AMQP, PROTOCOL_MQTT, PROTOCOL_MQTT_WS] {
        gauge!(OPEN_CONNECTIONS, "protocol" => protocol).increment(0.0);
    }
    for name in [
        CONNECTED_CLIENTS,
        INVALID_ROUTES,
        STORE_BYTES,
        STORE_HELD_BYTES,
    ] {
        gauge!(name).increment(0.0);
    }
    if upstream {
        gauge!(UPSTREAM_CONNECTED).increment(0.0);
    }
}

pub fn connected_clients(n: usize) {
    gauge!(CONNECTED_CLIENTS).set(n as f64);
}

/// `protocol` label values of [`OPEN_CONNECTIONS`].
pub const PROTOCOL_AMQP: &str = "amqp";
/// AMQP over WebSockets on the HTTPS listener.
pub const PROTOCOL_AMQP_WS: &str = "amqpws";
pub const PROTOCOL_MQTT: &str = "mqtt";
/// MQTT over WebSockets on the HTTPS listener.
pub const PROTOCOL_MQTT_WS: &str = "mqttws";

pub fn open_connections(protocol: &'static str, delta: f64) {
    gauge!(OPEN_CONNECTIONS, "protocol" => protocol).increment(delta);
}

/// MQTT packets refused (the connection closed, or the message dropped), by reason.
pub const MQTT_REFUSED: &str = "edgehub_mqtt_refused_total";

pub fn mqtt_refused(id: &str, reason: &'static str) {
    counter!(MQTT_REFUSED, "id" => id.to_owned(), "reason" => reason).increment(1);
}

pub fn invalid_routes(n: usize) {
    gauge!(INVALID_ROUTES).set(n as f64);
}

pub const PROCESS_RSS: &str = "edgehub_process_resident_memory_bytes";

/// Refreshes process gauges just before a scrape.
pub fn process_gauges() {
    if let Some(rss) = resident_bytes() {
        gauge!(PROCESS_RSS).set(rss as f64);
    }
}

/// Resident set size from `/proc/self/statm` (Linux); `None` elsewhere.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Per-link cache of the handles `received` records into, so the hot path does not build
/// label sets and look them up in the registry for every message.
#[derive(Default)]
pub struct ReceivedCache {
    by_output: std::collections::HashMap<Option<String>, ReceivedHandles>,
    /// The handles of the last message's output: a link's messages mostly share one, and
    /// this finds them without an allocation or a hash.
    last: Option<(Option<String>, ReceivedHandles)>,
}

type ReceivedHandles = (metrics::Counter, metrics::Histogram, metrics::Counter);

impl ReceivedCache {
    pub fn record(&mut self, msg: &Message) {
        let hit = matches!(&self.last, Some((o, _)) if *o == msg.output);
        if !hit {
            let handles = self
                .by_output
                .entry(msg.output.clone())
                .or_insert_with(|| {
                    let id = msg.from.to_string();
                    (
                        counter!(MESSAGES_RECEIVED, "id" => id.clone(), "route_output" => output_label(msg)),
                        histogram!(MESSAGE_SIZE, "id" => id.clone()),
                        counter!(BYTES_RECEIVED, "id" => id),
                    )
                })
                .clone();
            self.last = Some((msg.output.clone(), handles));
        }
        if let Some((_, (count, size, bytes))) = &self.last {
            count.increment(1);
            size.record(msg.size() as f64);
            bytes.increment(msg.body.len() as u64);
        }
    }
}

type SentKey = (
    crate::model::identity::Identity,
    Option<String>,
    String,
    u32,
);

/// `edgehub_messages_sent_total`, `edgehub_bytes_sent_total`, and the send and process
/// duration histograms of one key.
#[derive(Clone)]
struct SentHandles {
    sent: metrics::Counter,
    bytes: metrics::Counter,
    send: metrics::Histogram,
    process: metrics::Histogram,
}

/// Per-link cache of the handles `sent` records into.
#[derive(Default)]
pub struct SentCache {
    by_key: std::collections::HashMap<SentKey, SentHandles>,
    /// The last message's key and handles: a link's messages mostly share one key, and this
    /// finds it without an allocation or a hash.
    last: Option<(SentKey, SentHandles)>,
}

impl SentCache {
    pub fn record(&mut self, msg: &Message, to: &str, input: &str, priority: u32, send_secs: f64) {
        let hit = matches!(&self.last, Some(((from, output, i, p), _))
            if *p == priority && i == input && *output == msg.output && *from == msg.from);
        if !hit {
            let key: SentKey = (
                msg.from.clone(),
                msg.output.clone(),
                input.to_owned(),
                priority,
            );
            let handles = self
                .by_key
                .entry(key.clone())
                .or_insert_with(|| {
                    let from = msg.from.to_string();
                    let p = priority.to_string();
                    SentHandles {
                        sent: counter!(MESSAGES_SENT, "from" => from.clone(), "to" => to.to_owned(), "from_route_output" => output_label(msg),
                            "to_route_input" => input.to_owned(), "priority" => p.clone()),
                        bytes: counter!(BYTES_SENT, "id" => to.to_owned()),
                        send: histogram!(MESSAGE_SEND_DURATION, "from" => from.clone(), "to" => to.to_owned(),
                            "from_route_output" => output_label(msg), "to_route_input" => input.to_owned()),
                        process: histogram!(MESSAGE_PROCESS_DURATION, "from" => from, "to" => to.to_owned(), "priority" => p),
                    }
                })
                .clone();
            self.last = Some((key, handles));
        }
        if let Some((_, h)) = &self.last {
            h.sent.increment(1);
            h.bytes.increment(msg.body.len() as u64);
            h.send.record(send_secs);
            let waited = (crate::model::message::now_ms() - msg.enqueued_ms).max(0) as f64 / 1000.0;
            h.process.record(waited);
        }
    }
}

pub const DIRECT_METHODS: &str = "edgehub_direct_methods_total";
pub const DIRECT_METHOD_DURATION: &str = "edgehub_direct_method_duration_seconds";

pub fn direct_method(from: &str, to: &str, secs: f64) {
    counter!(DIRECT_METHODS, "from" => from.to_owned(), "to" => to.to_owned()).increment(1);
    histogram!(DIRECT_METHOD_DURATION, "from" => from.to_owned(), "to" => to.to_owned())
        .record(secs);
}

pub const GET_TWIN: &str = "edgehub_gettwin_total";
pub const GET_TWIN_DURATION: &str = "edgehub_gettwin_duration_seconds";
pub const REPORTED_PROPERTIES: &str = "edgehub_reported_properties_total";
pub const REPORTED_PROPERTIES_DURATION: &str =
    "edgehub_reported_properties_update_duration_seconds";

/// A twin read served by this hub (`source="edge_hub"`; the upstream will add `"upstream"`).
pub fn twin_get(id: &str, secs: f64) {
    counter!(GET_TWIN, "source" => "edge_hub", "id" => id.to_owned()).increment(1);
    histogram!(GET_TWIN_DURATION, "source" => "edge_hub", "id" => id.to_owned()).record(secs);
}

/// A reported-properties update stored by this hub (`target="edge_hub"`).
pub fn twin_reported(id: &str, secs: f64) {
    counter!(REPORTED_PROPERTIES, "target" => "edge_hub", "id" => id.to_owned()).increment(1);
    histogram!(REPORTED_PROPERTIES_DURATION, "target" => "edge_hub", "id" => id.to_owned())
        .record(secs);
}

pub const STORE_BYTES: &str = "edgehub_store_bytes";

pub const STORE_HELD_BYTES: &str = "edgehub_store_held_bytes";
pub const STORE_LIMIT_BYTES: &str = "edgehub_store_limit_bytes";

/// Disk used by the store, bytes held against `storeLimits.maxSizeBytes`, and that limit.
pub fn store_bytes(disk: u64, held: u64, limit: Option<u64>) {
    gauge!(STORE_BYTES).set(disk as f64);
    gauge!(STORE_HELD_BYTES).set(held as f64);
    if let Some(l) = limit {
        gauge!(STORE_LIMIT_BYTES).set(l as f64);
    }
}

pub const OFFLINE_COUNT: &str = "edgehub_offline_count_total";
pub const OFFLINE_DURATION: &str = "edgehub_offline_duration_seconds";
pub const OPERATION_RETRY: &str = "edgehub_operation_retry_total";
pub const UPSTREAM_CONNECTED: &str = "edgehub_upstream_connected";

/// The upstream went away (`id` is this hub's `$edgeHub` identity, as edgeHub labels it).
pub fn went_offline(id: &str) {
    counter!(OFFLINE_COUNT, "id" => id.to_owned()).increment(1);
    gauge!(UPSTREAM_CONNECTED).set(0.0);
}

/// The upstream is back after `secs` offline.
pub fn back_online(id: &str, offline_secs: Option<f64>) {
    if let Some(s) = offline_secs {
        histogram!(OFFLINE_DURATION, "id" => id.to_owned()).record(s);
    }
    gauge!(UPSTREAM_CONNECTED).set(1.0);
}

/// An upstream operation failed and will be tried again.
pub fn retry(id: &str, operation: &'static str) {
    counter!(OPERATION_RETRY, "id" => id.to_owned(), "operation" => operation).increment(1);
}

/// A reported-properties patch delivered upstream (`target="upstream"`).
pub fn twin_reported_upstream(id: &str, secs: f64) {
    counter!(REPORTED_PROPERTIES, "target" => "upstream", "id" => id.to_owned()).increment(1);
    histogram!(REPORTED_PROPERTIES_DURATION, "target" => "upstream", "id" => id.to_owned())
        .record(secs);
}

/// A twin read from upstream (`source="upstream"`).
pub fn twin_get_upstream(id: &str, secs: f64) {
    counter!(GET_TWIN, "source" => "upstream", "id" => id.to_owned()).increment(1);
    histogram!(GET_TWIN_DURATION, "source" => "upstream", "id" => id.to_owned()).record(secs);
}

pub const REGISTRY_IDENTITIES: &str = "edgehub_registry_identities";

/// Identities now held by the service API's registry.
pub fn registry_identities(n: usize) {
    gauge!(REGISTRY_IDENTITIES).set(n as f64);
}
