//! 16-byte delivery tags on the hub's outgoing transfers.
//!
//! The Azure IoT C# SDK turns the delivery tag of every message it receives into the message's
//! lock token with `new Guid(tag)`, which takes exactly 16 bytes; IoT Hub and edgeHub send
//! GUID tags. fe2o3 numbers a link's deliveries with 4-byte tags and offers no way to choose
//! them, so this stream sits between fe2o3 and TLS and rewrites frames:
//!
//! * outgoing: each AMQP transfer frame that carries a delivery tag shorter than 16 bytes gets
//!   a 16-byte one: a random prefix of the connection, the link handle, then fe2o3's per-link
//!   counter, so that tags differ across links and connections as edgeHub's GUIDs do. The peer
//!   never sends tags back (dispositions name delivery ids), so fe2o3's own bookkeeping is
//!   unaffected;
//! * incoming: the peer's `open` is the only frame changed: its max-frame-size is lowered by
//!   [`HEADROOM`], so a full transfer frame that fe2o3 builds still fits after its tag grows,
//!   and its idle-time-out is halved, so fe2o3's keep-alives arrive well inside the peer's limit;
//! * incoming: a `disposition` from the peer as receiver that gives a terminal outcome without
//!   settling (the C# SDK's complete/abandon/reject, and every receiver in rcv-settle-mode
//!   `second`) is settled before fe2o3 sees it, and the hub answers it with a settled `accepted`
//!   disposition for the same deliveries, as edgeHub does. The C# SDK waits for that answer
//!   (`CompleteAsync` hangs until its timeout without it) and requires it to be `accepted`;
//!   fe2o3 answers only in rcv-settle-mode `second`, and then with the peer's own outcome. The
//!   answer goes on the hub's channel of the session, learnt from the hub's outgoing `begin`.
//!
//! Protocol headers, SASL frames, empty (heartbeat) frames and every other frame pass through
//! byte for byte; performatives are decoded and encoded with serde_amqp.
//!
//! The same stream guards the hub against what the peer sends ([`Guard`]): each incoming frame
//! is checked before fe2o3 reads it, its size on its header alone. A frame the hub does not
//! accept ends the stream for fe2o3 after a `close` with the condition has been written (the
//! hub's protocol header and `open` first, if fe2o3 has not sent them yet), so the socket is
//! dropped at once. Invariant: the stream holds at most one incomplete incoming frame, of at
//! most the hub's max-frame-size.

use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll, Waker},
};

use bytes::{Buf, BytesMut};
use fe2o3_amqp::types::{
    definitions::{DeliveryTag, ErrorCondition, Role},
    messaging::{Accepted, DeliveryState},
    performatives::{
        Attach, Begin, Close, Detach, Disposition, Flow, MaxFrameSize, Open, Transfer,
    },
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The tag length the SDKs expect.
pub const TAG_LEN: usize = 16;
/// Bytes a rewritten transfer may grow by (12 for the tag, 6 if its list encoding widens), with
/// margin.
pub const HEADROOM: u32 = 64;
/// Bytes written by fe2o3 and not yet sent before `poll_write` pushes back.
const MAX_BUFFERED: usize = 1 << 20;

const TRANSFER: u64 = 0x14;
const OPEN: u64 = 0x10;
const DISPOSITION: u64 = 0x15;

/// One unit at the head of a byte stream.
enum Unit {
    /// A protocol header (`AMQP` + 4 bytes) or a frame that passes through unchanged.
    Pass(usize),
    /// An AMQP frame whose performative has this descriptor code: (frame length, code).
    Frame(usize, u64),
    /// Not complete yet.
    Incomplete,
}

fn next_unit(buf: &[u8]) -> std::io::Result<Unit> {
    if buf.len() < 8 {
        return Ok(Unit::Incomplete);
    }
    if &buf[..4] == b"AMQP" {
        return Ok(Unit::Pass(8));
    }
    let size = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if size < 8 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame size {size} is below the minimum of 8"),
        ));
    }
    if buf.len() < size {
        return Ok(Unit::Incomplete);
    }
    let doff = buf[4] as usize * 4;
    let is_amqp = buf[5] == 0;
    if !is_amqp || doff < 8 || doff >= size {
        // SASL frames, empty frames and anything odd: not ours to change.
        return Ok(Unit::Pass(size));
    }
    Ok(match descriptor(&buf[doff..size]) {
        Some(code) => Unit::Frame(size, code),
        None => Unit::Pass(size),
    })
}

/// The symbolic names of the performatives, by numeric code from 0x10.
const PERFORMATIVE_NAMES: [&[u8]; 9] = [
    b"amqp:open:list",
    b"amqp:begin:list",
    b"amqp:attach:list",
    b"amqp:flow:list",
    b"amqp:transfer:list",
    b"amqp:disposition:list",
    b"amqp:detach:list",
    b"amqp:end:list",
    b"amqp:close:list",
];

/// The numeric descriptor of a performative (`0x00` then a small ulong, a ulong or the
/// symbolic name as a sym8).
fn descriptor(body: &[u8]) -> Option<u64> {
    match body {
        [0x00, 0x53, code, ..] => Some(u64::from(*code)),
        [0x00, 0x80, rest @ ..] if rest.len() >= 8 => {
            Some(u64::from_be_bytes(rest[..8].try_into().ok()?))
        }
        [0x00, 0xa3, n, rest @ ..] => {
            let name = rest.get(..usize::from(*n))?;
            let i = PERFORMATIVE_NAMES.iter().position(|p| *p == name)?;
            Some(0x10 + i as u64)
        }
        _ => None,
    }
}

/// The length of the performative at the start of a frame body (descriptor and list).
fn performative_len(body: &[u8]) -> Option<usize> {
    let descriptor = match body.get(1)? {
        0x53 => 3,
        0x80 => 10,
        0xa3 => 3 + usize::from(*body.get(2)?),
        _ => return None,
    };
    let list = body.get(descriptor..)?;
    let len = match list.first()? {
        0x45 => 1,
        0xc0 => 2 + *list.get(1)? as usize,
        0xd0 => 5 + u32::from_be_bytes(list.get(1..5)?.try_into().ok()?) as usize,
        _ => return None,
    };
    let total = descriptor + len;
    (total <= body.len()).then_some(total)
}

/// Rebuilds a frame with a new performative, keeping its header fields and payload.
fn rebuild(frame: &[u8], performative: &[u8], payload: &[u8], out: &mut Vec<u8>) {
    let doff = frame[4] as usize * 4;
    let size = doff + performative.len() + payload.len();
    out.extend_from_slice(&(size as u32).to_be_bytes());
    out.extend_from_slice(&frame[4..doff]);
    out.extend_from_slice(performative);
    out.extend_from_slice(payload);
}

/// Appends `frame` to `out`, with its delivery tag widened when it is a transfer with a short
/// tag. A frame that does not decode is passed on as it is (fe2o3 wrote it; the peer judges).
///
/// fe2o3's tags are a per-link counter from 0; the wide tag is a random prefix drawn when the
/// link attached (`prefix` of its handle), the link handle, then that counter, so that tags
/// (and the C# SDK's lock tokens made of them) differ across links, across attaches of a link on
/// the same handle and across connections, as edgeHub's GUIDs do.
fn widen_transfer(frame: &[u8], out: &mut Vec<u8>, prefix: impl Fn(u32) -> [u8; 8]) {
    let doff = frame[4] as usize * 4;
    let body = &frame[doff..];
    let Some(plen) = performative_len(body) else {
        out.extend_from_slice(frame);
        return;
    };
    let Ok(mut transfer) = serde_amqp::from_slice::<Transfer>(&body[..plen]) else {
        out.extend_from_slice(frame);
        return;
    };
    let short = transfer
        .delivery_tag
        .as_ref()
        .is_some_and(|t| t.len() < TAG_LEN);
    if !short {
        out.extend_from_slice(frame);
        return;
    }
    if let Some(tag) = transfer.delivery_tag.take() {
        let mut wide = Vec::with_capacity(TAG_LEN);
        if tag.len() <= 4 {
            wide.extend_from_slice(&prefix(transfer.handle.0));
            wide.extend_from_slice(&transfer.handle.0.to_be_bytes());
        }
        wide.resize(TAG_LEN - tag.len(), 0);
        wide.extend_from_slice(&tag);
        transfer.delivery_tag = Some(DeliveryTag::from(wide));
    }
    match serde_amqp::to_vec(&transfer) {
        Ok(p) => rebuild(frame, &p, &body[plen..], out),
        Err(_) => out.extend_from_slice(frame),
    }
}

/// The idle-time-out fe2o3 is shown for a peer that announced `millis`: half of it.
///
/// fe2o3 sends its empty keep-alive frames once per announced period, with no margin, and
/// uAMQP (the C SDK) closes at exactly the period it announced ("No frame received for the
/// idle timeout"), while the spec only asks peers to announce half their real limit. Halving
/// what fe2o3 sees makes the hub's keep-alives arrive well inside the peer's limit whatever the
/// peer announced. 0 (no timeout) stays 0.
fn keepalive_period(millis: u32) -> u32 {
    if millis == 0 {
        0
    } else {
        (millis / 2).max(1)
    }
}

/// Appends the peer's `open` frame with its max-frame-size lowered by [`HEADROOM`] and its
/// idle-time-out halved (see [`keepalive_period`]).
fn adjust_peer_open(frame: &[u8], out: &mut Vec<u8>) {
    let doff = frame[4] as usize * 4;
    let body = &frame[doff..];
    let decoded = performative_len(body).and_then(|plen| {
        serde_amqp::from_slice::<Open>(&body[..plen])
            .ok()
            .map(|o| (plen, o))
    });
    let Some((plen, mut open)) = decoded else {
        out.extend_from_slice(frame);
        return;
    };
    let max = open.max_frame_size.0;
    // 512 is the smallest max-frame-size a peer may announce; leave such a peer alone.
    if max >= 512 + HEADROOM {
        open.max_frame_size = MaxFrameSize(max - HEADROOM);
    }
    open.idle_time_out = open.idle_time_out.map(keepalive_period);
    match serde_amqp::to_vec(&open) {
        Ok(p) => rebuild(frame, &p, &body[plen..], out),
        Err(_) => out.extend_from_slice(frame),
    }
}

/// Moves every complete unit of `raw` to `out`; each AMQP frame goes through `f` (frame,
/// descriptor code, out), which appends it, changed or not.
fn process_with(
    raw: &mut Vec<u8>,
    out: &mut Vec<u8>,
    mut f: impl FnMut(&[u8], u64, &mut Vec<u8>),
) -> std::io::Result<()> {
    let mut at = 0;
    let result = loop {
        match next_unit(&raw[at..]) {
            Err(e) => break Err(e),
            Ok(Unit::Incomplete) => break Ok(()),
            Ok(Unit::Pass(n)) => {
                out.extend_from_slice(&raw[at..at + n]);
                at += n;
            }
            Ok(Unit::Frame(n, c)) => {
                f(&raw[at..at + n], c, out);
                at += n;
            }
        }
    };
    raw.drain(..at);
    result
}

/// [`process_with`] rewriting only the frames with `code`, by `f`; returns whether one was seen.
#[cfg(test)]
fn process(
    raw: &mut Vec<u8>,
    out: &mut Vec<u8>,
    code: u64,
    f: fn(&[u8], &mut Vec<u8>),
) -> std::io::Result<bool> {
    let mut seen = false;
    process_with(raw, out, |frame, c, out| {
        if c == code {
            f(frame, out);
            seen = true;
        } else {
            out.extend_from_slice(frame);
        }
    })?;
    Ok(seen)
}

/// The channel a frame was sent on.
fn channel(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[6], frame[7]])
}

/// Learns from the hub's outgoing `begin` which of its channels answers the peer's channel.
fn note_begin(frame: &[u8], channels: &mut HashMap<u16, u16>) {
    let doff = frame[4] as usize * 4;
    let body = &frame[doff..];
    let begin =
        performative_len(body).and_then(|plen| serde_amqp::from_slice::<Begin>(&body[..plen]).ok());
    if let Some(remote) = begin.and_then(|b| b.remote_channel) {
        channels.insert(remote, channel(frame));
    }
}

/// An AMQP frame (data offset 2, type 0) carrying `performative` on `channel`.
fn amqp_frame(channel: u16, performative: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&((8 + performative.len()) as u32).to_be_bytes());
    out.extend_from_slice(&[2, 0]);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(performative);
}

/// Appends the peer's `disposition` to `out`, settled when it is an unsettled terminal outcome
/// of the peer as receiver; then the hub's settled `accepted` answer goes to `replies`. Any
/// other disposition, or one on a session whose channel is unknown, passes unchanged.
fn settle_disposition(
    frame: &[u8],
    out: &mut Vec<u8>,
    channels: &HashMap<u16, u16>,
    replies: &mut Vec<u8>,
) {
    let doff = frame[4] as usize * 4;
    let body = &frame[doff..];
    let decoded = performative_len(body).and_then(|plen| {
        serde_amqp::from_slice::<Disposition>(&body[..plen])
            .ok()
            .map(|d| (plen, d))
    });
    let Some((plen, mut d)) = decoded else {
        out.extend_from_slice(frame);
        return;
    };
    let ours = channels.get(&channel(frame)).copied();
    let wanted = d.role == Role::Receiver
        && !d.settled
        && d.state.as_ref().is_some_and(DeliveryState::is_terminal);
    let (true, Some(ours)) = (wanted, ours) else {
        out.extend_from_slice(frame);
        return;
    };
    d.settled = true;
    let answer = Disposition {
        role: Role::Sender,
        first: d.first,
        last: d.last,
        settled: true,
        state: Some(DeliveryState::Accepted(Accepted {})),
        batchable: false,
    };
    match (serde_amqp::to_vec(&d), serde_amqp::to_vec(&answer)) {
        (Ok(settled), Ok(answer)) => {
            rebuild(frame, &settled, &body[plen..], out);
            amqp_frame(ours, &answer, replies);
        }
        _ => out.extend_from_slice(frame),
    }
}

/// The handle of an `attach` frame.
fn attach_handle(frame: &[u8]) -> Option<u32> {
    let doff = frame[4] as usize * 4;
    let body = &frame[doff..];
    let plen = performative_len(body)?;
    serde_amqp::from_slice::<Attach>(&body[..plen])
        .ok()
        .map(|a| a.handle.0)
}

fn random_prefix() -> [u8; 8] {
    let mut p = [0u8; 8];
    p.copy_from_slice(&uuid::Uuid::new_v4().as_bytes()[..8]);
    p
}

/// What the frame guard enforces on the peer's frames (see [`Guard::inspect`]).
#[derive(Debug, Clone)]
pub struct Limits {
    /// The max-frame-size the hub announces: no AMQP frame may be larger.
    pub max_frame_size: u32,
    /// The channel-max the hub announces.
    pub channel_max: u16,
    /// Links one session may hold before the connection is closed (the hub refuses links
    /// beyond its own per-session cap first; this backstop catches peers that never answer).
    pub max_handles_per_session: usize,
    /// Bytes of unfinished multi-frame deliveries an authenticated connection may hold.
    pub incomplete_budget: u64,
    /// The largest message on an authenticated connection's links: no link's unfinished
    /// delivery may grow beyond it (before authentication: [`CBS_MAX_MESSAGE`]).
    pub max_message_size: u64,
    /// Set once the connection holds a valid token or SASL identity.
    pub authenticated: Arc<AtomicBool>,
    /// Where the guard reports a session the peer broke (a transfer or flow on a handle it
    /// never attached); the session's task ends it with `amqp:session:unattached-handle`.
    pub faults: Arc<SessionFaults>,
}

impl Limits {
    /// For the hub's own connection to its parent: only the frame size is checked (the parent
    /// is trusted as far as the rest goes).
    pub fn for_parent(max_frame_size: u32) -> Self {
        Self {
            max_frame_size,
            channel_max: u16::MAX,
            max_handles_per_session: usize::MAX,
            incomplete_budget: u64::MAX,
            max_message_size: u64::MAX,
            authenticated: Arc::new(AtomicBool::new(true)),
            faults: Arc::default(),
        }
    }
}

/// One stop signal per session the peer began, by the peer's channel: cancelled when the
/// peer sends a transfer or flow on a handle it never attached. (fe2o3's acceptor drops such
/// a transfer and keeps such a flow, waiting for an attach that may never come.)
#[derive(Debug, Default)]
pub struct SessionFaults(std::sync::Mutex<HashMap<u16, tokio_util::sync::CancellationToken>>);

impl SessionFaults {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u16, tokio_util::sync::CancellationToken>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stop signal of the session the peer began on `channel`.
    pub fn signal(&self, channel: u16) -> tokio_util::sync::CancellationToken {
        self.map().entry(channel).or_default().clone()
    }

    fn begun(&self, channel: u16) {
        self.map().insert(channel, Default::default());
    }

    fn ended(&self, channel: u16) {
        self.map().remove(&channel);
    }

    fn fault(&self, channel: u16) {
        self.map().entry(channel).or_default().cancel();
    }
}

/// The largest SASL frame accepted. SASL frames carry a mechanism name and, for PLAIN, a user
/// name and a SAS token: a few hundred bytes.
pub const SASL_MAX_FRAME: u32 = 16 * 1024;
/// Sessions an unauthenticated connection may hold.
pub const PRE_AUTH_SESSIONS: usize = 2;
/// Links an unauthenticated connection may hold: `$cbs` twice each way, and a few refused
/// ones whose detach is on its way.
pub const PRE_AUTH_LINKS: usize = 8;
/// The largest `$cbs` message (its links' max-message-size).
pub const CBS_MAX_MESSAGE: u64 = 64 * 1024;
/// Bytes of unfinished deliveries an unauthenticated connection may hold: one `$cbs` message
/// per request link, with room for frame overhead.
pub const PRE_AUTH_INCOMPLETE: u64 = 2 * CBS_MAX_MESSAGE + 4096;

const BEGIN: u64 = 0x11;
const FLOW: u64 = 0x13;
const ATTACH: u64 = 0x12;
const DETACH: u64 = 0x16;
const END: u64 = 0x17;

/// Why the guard closes a connection: an AMQP error condition and a description.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub condition: ErrorCondition,
    pub description: String,
}

fn violation(condition: impl Into<ErrorCondition>, description: impl Into<String>) -> Violation {
    Violation {
        condition: condition.into(),
        description: description.into(),
    }
}

#[derive(Debug, Default)]
struct SessionTrack {
    /// Handles the peer attached and has not detached.
    handles: HashSet<u32>,
    /// Bytes of each handle's unfinished delivery.
    partial: HashMap<u32, u64>,
}

/// The peer's side of the frame stream, checked frame by frame before fe2o3 sees it.
///
/// Only frame headers are trusted up front: a frame larger than the hub accepts is refused on
/// its header, before its bytes are read, so a peer cannot make the hub buffer more than one
/// frame of at most the hub's max-frame-size (a SASL frame: [`SASL_MAX_FRAME`]). Sessions,
/// attached handles and the bytes of unfinished deliveries are counted per connection, with
/// tighter caps until the connection authenticates.
#[derive(Debug)]
pub struct Guard {
    limits: Limits,
    /// The version byte of the last protocol header from the peer (0 AMQP, 3 SASL).
    protocol: Option<u8>,
    open_seen: bool,
    /// min(the hub's channel-max, the peer's), once the peer's open is seen.
    channel_max: u16,
    sessions: HashMap<u16, SessionTrack>,
    incomplete: u64,
    /// The peer's session channel → the hub's channel of the same session.
    channels: HashMap<u16, u16>,
    /// Disposition answers to send (see the module documentation).
    answers: Vec<u8>,
}

impl Guard {
    pub fn new(limits: Limits) -> Self {
        let channel_max = limits.channel_max;
        Self {
            limits,
            protocol: None,
            open_seen: false,
            channel_max,
            sessions: HashMap::new(),
            incomplete: 0,
            channels: HashMap::new(),
            answers: Vec::new(),
        }
    }

    fn authenticated(&self) -> bool {
        self.limits.authenticated.load(Ordering::Relaxed)
    }

    /// Moves every complete, acceptable unit of `raw` to `out` (the peer's open adjusted as
    /// the module documentation says). Stops at the first unacceptable frame: what precedes
    /// it is in `out`, and the error says why the connection must close.
    #[cfg(test)]
    pub fn inspect(&mut self, raw: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<(), Violation> {
        let (at, result) = self.scan(raw, out);
        raw.drain(..at);
        result
    }

    /// What [`Self::inspect`] does, leaving `raw` as it is: how many of its bytes were
    /// passed on (or dealt with), and the violation, if any.
    fn scan(&mut self, raw: &[u8], out: &mut Vec<u8>) -> (usize, Result<(), Violation>) {
        let mut at = 0;
        let result = loop {
            match self.unit(&raw[at..], out) {
                Ok(Some(n)) => at += n,
                Ok(None) => break Ok(()),
                Err(v) => break Err(v),
            }
        };
        (at, result)
    }

    /// Handles the unit at the head of `buf`: `Some(length)` once it is complete and passed on.
    fn unit(&mut self, buf: &[u8], out: &mut Vec<u8>) -> Result<Option<usize>, Violation> {
        use fe2o3_amqp::types::definitions::{AmqpError, ConnectionError};
        if !self.open_seen && buf.len() >= 4 && &buf[..4] == b"AMQP" {
            if buf.len() < 8 {
                return Ok(None);
            }
            self.protocol = Some(buf[4]);
            out.extend_from_slice(&buf[..8]);
            return Ok(Some(8));
        }
        if buf.len() < 8 {
            return Ok(None);
        }
        let size = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let doff = u32::from(buf[4]) * 4;
        let frame_type = buf[5];
        let channel = u16::from_be_bytes([buf[6], buf[7]]);
        if size < 8 || doff < 8 || doff > size {
            return Err(violation(
                ConnectionError::FramingError,
                format!("malformed frame header (size {size}, data offset {doff})"),
            ));
        }
        let limit = match (frame_type, self.protocol) {
            (1, Some(3)) if !self.open_seen => SASL_MAX_FRAME,
            (0, Some(0)) => self.limits.max_frame_size,
            _ => {
                return Err(violation(
                    ConnectionError::FramingError,
                    format!("unexpected frame of type {frame_type} here"),
                ))
            }
        };
        if size > limit {
            return Err(violation(
                ConnectionError::FramingError,
                format!("a frame of {size} bytes exceeds the max-frame-size of {limit}"),
            ));
        }
        let size = size as usize;
        if buf.len() < size {
            return Ok(None);
        }
        let frame = &buf[..size];
        let body = &frame[doff as usize..];
        if frame_type == 1 || body.is_empty() {
            // SASL frames (fe2o3 checks their content) and empty keep-alive frames.
            out.extend_from_slice(frame);
            return Ok(Some(size));
        }
        let decode =
            |what: &str| violation(AmqpError::DecodeError, format!("{what} does not decode"));
        let Some(code) = descriptor(body) else {
            return Err(decode("a frame body"));
        };
        let plen = performative_len(body).ok_or_else(|| decode("a performative"))?;
        let performative = &body[..plen];
        if !self.open_seen {
            if code != OPEN {
                return Err(violation(
                    AmqpError::IllegalState,
                    format!("performative {code:#x} before the open"),
                ));
            }
            let open: Open =
                serde_amqp::from_slice(performative).map_err(|_| decode("the open"))?;
            if open.max_frame_size.0 < 512 {
                return Err(violation(
                    AmqpError::InvalidField,
                    format!(
                        "max-frame-size {} is below the minimum of 512",
                        open.max_frame_size.0
                    ),
                ));
            }
            self.channel_max = self.channel_max.min(open.channel_max.0);
            self.open_seen = true;
            adjust_peer_open(frame, out);
            return Ok(Some(size));
        }
        match code {
            BEGIN => {
                if channel > self.channel_max {
                    return Err(violation(
                        ConnectionError::FramingError,
                        format!(
                            "begin on channel {channel}, above the channel-max of {}",
                            self.channel_max
                        ),
                    ));
                }
                if !self.authenticated() && self.sessions.len() >= PRE_AUTH_SESSIONS {
                    return Err(violation(
                        AmqpError::ResourceLimitExceeded,
                        format!(
                            "at most {PRE_AUTH_SESSIONS} sessions before the connection authenticates"
                        ),
                    ));
                }
                self.sessions.entry(channel).or_default();
                self.limits.faults.begun(channel);
            }
            ATTACH => {
                let attach: Attach =
                    serde_amqp::from_slice(performative).map_err(|_| decode("an attach"))?;
                let authenticated = self.authenticated();
                let links: usize = self.sessions.values().map(|s| s.handles.len()).sum();
                if !authenticated && links >= PRE_AUTH_LINKS {
                    return Err(violation(
                        AmqpError::ResourceLimitExceeded,
                        format!(
                            "at most {PRE_AUTH_LINKS} links before the connection authenticates"
                        ),
                    ));
                }
                if let Some(s) = self.sessions.get_mut(&channel) {
                    if s.handles.len() >= self.limits.max_handles_per_session {
                        return Err(violation(
                            AmqpError::ResourceLimitExceeded,
                            format!(
                                "more than {} links on one session",
                                self.limits.max_handles_per_session
                            ),
                        ));
                    }
                    s.handles.insert(attach.handle.0);
                }
            }
            DETACH => {
                let detach: Detach =
                    serde_amqp::from_slice(performative).map_err(|_| decode("a detach"))?;
                if let Some(s) = self.sessions.get_mut(&channel) {
                    s.handles.remove(&detach.handle.0);
                    let freed = s.partial.remove(&detach.handle.0).unwrap_or(0);
                    self.incomplete = self.incomplete.saturating_sub(freed);
                }
            }
            END => {
                self.limits.faults.ended(channel);
                if let Some(s) = self.sessions.remove(&channel) {
                    let freed: u64 = s.partial.values().sum();
                    self.incomplete = self.incomplete.saturating_sub(freed);
                }
            }
            TRANSFER => {
                let transfer: Transfer =
                    serde_amqp::from_slice(performative).map_err(|_| decode("a transfer"))?;
                let payload = (body.len() - plen) as u64;
                let budget = if self.authenticated() {
                    self.limits.incomplete_budget
                } else {
                    PRE_AUTH_INCOMPLETE
                };
                if let Some(s) = self.sessions.get_mut(&channel) {
                    let handle = transfer.handle.0;
                    if !s.handles.contains(&handle) {
                        // Not passed on: the session ends with unattached-handle.
                        self.limits.faults.fault(channel);
                        return Ok(Some(size));
                    }
                    {
                        if transfer.more && !transfer.aborted {
                            let partial = s.partial.entry(handle).or_default();
                            *partial += payload;
                            self.incomplete += payload;
                            let cap = if self.limits.authenticated.load(Ordering::Relaxed) {
                                self.limits.max_message_size
                            } else {
                                CBS_MAX_MESSAGE
                            };
                            if *partial > cap {
                                return Err(violation(
                                    fe2o3_amqp::types::definitions::LinkError::MessageSizeExceeded,
                                    format!(
                                        "an unfinished delivery on handle {handle} exceeds the max-message-size of {cap}"
                                    ),
                                ));
                            }
                        } else {
                            let freed = s.partial.remove(&handle).unwrap_or(0);
                            self.incomplete = self.incomplete.saturating_sub(freed);
                        }
                    }
                }
                if self.incomplete > budget {
                    return Err(violation(
                        AmqpError::ResourceLimitExceeded,
                        format!("unfinished deliveries hold more than {budget} bytes"),
                    ));
                }
            }
            FLOW => {
                let flow: Flow =
                    serde_amqp::from_slice(performative).map_err(|_| decode("a flow"))?;
                if let (Some(s), Some(handle)) = (self.sessions.get(&channel), flow.handle) {
                    if !s.handles.contains(&handle.0) {
                        self.limits.faults.fault(channel);
                        return Ok(Some(size));
                    }
                }
            }
            OPEN => {
                return Err(violation(AmqpError::IllegalState, "a second open"));
            }
            DISPOSITION => {
                settle_disposition(frame, out, &self.channels, &mut self.answers);
                return Ok(Some(size));
            }
            _ => {}
        }
        out.extend_from_slice(frame);
        Ok(Some(size))
    }

    /// The frames that tell the peer why its connection ends: a `close` with the condition,
    /// preceded by the protocol header and an `open` when the hub has not sent them yet (a
    /// connection is refused with open + close). Nothing during SASL, which has no close.
    fn farewell(&self, v: &Violation, header_sent: bool, open_sent: bool) -> Vec<u8> {
        let mut out = Vec::new();
        if self.protocol != Some(0) {
            return out;
        }
        if !open_sent {
            let open = Open {
                container_id: "edgehub".into(),
                hostname: None,
                max_frame_size: MaxFrameSize(self.limits.max_frame_size),
                channel_max: Default::default(),
                idle_time_out: None,
                outgoing_locales: None,
                incoming_locales: None,
                offered_capabilities: None,
                desired_capabilities: None,
                properties: None,
            };
            if let Ok(p) = serde_amqp::to_vec(&open) {
                amqp_frame(0, &p, &mut out);
            }
        }
        let close = Close {
            error: Some(fe2o3_amqp::types::definitions::Error::new(
                v.condition.clone(),
                Some(v.description.clone()),
                None,
            )),
        };
        if let Ok(p) = serde_amqp::to_vec(&close) {
            amqp_frame(0, &p, &mut out);
        }
        if !header_sent {
            out.splice(0..0, b"AMQP\x00\x01\x00\x00".iter().copied());
        }
        out
    }
}

/// Whether the complete units of `buf` include an AMQP protocol header and an `open`.
fn scan_outgoing(buf: &[u8]) -> (bool, bool) {
    let (mut header, mut open, mut at) = (false, false, 0);
    while let Ok(unit) = next_unit(&buf[at..]) {
        match unit {
            Unit::Incomplete => break,
            Unit::Pass(n) => {
                header |= n == 8 && buf[at..].starts_with(b"AMQP\x00");
                at += n;
            }
            Unit::Frame(n, code) => {
                open |= code == OPEN;
                at += n;
            }
        }
    }
    (header, open)
}

/// What a read from the TLS stream may take at once (as much as one TLS record's plaintext).
const READ_CHUNK: usize = 16 * 1024;
/// Buffers up to this capacity are kept when they empty; larger ones are released, so that an
/// idle connection does not hold what a burst made them grow to.
const IDLE_KEEP: usize = 1024;

/// The stream wrapper: see the module documentation.
#[derive(Debug)]
pub struct WideTags<S> {
    inner: S,
    /// Written by fe2o3, not yet a complete unit.
    written: Vec<u8>,
    /// Rewritten, waiting to go to `inner`.
    outgoing: Vec<u8>,
    /// Read from `inner`, not yet a complete unit. Read into directly (no zeroed chunk per
    /// read) and released whenever the connection waits with nothing in it.
    read_raw: BytesMut,
    /// Checked incoming bytes not yet handed to fe2o3.
    incoming: Vec<u8>,
    guard: Guard,
    /// Whether the hub's AMQP protocol header and its open have gone to `outgoing`.
    header_sent: bool,
    open_sent: bool,
    /// Set once the peer broke a limit: the reason, the close is on its way and the stream
    /// ends for fe2o3.
    fatal: Option<Violation>,
    /// The writer, when it last found `outgoing` could not all go out; the reader wakes it
    /// after it sent disposition answers (and so everything before them).
    write_waker: Option<Waker>,
    /// The first bytes of the widened delivery tags of each link the hub attached, by its
    /// (channel, handle); drawn anew at each attach.
    tag_prefixes: HashMap<(u16, u32), [u8; 8]>,
}

impl<S> WideTags<S> {
    pub fn new(inner: S, limits: Limits) -> Self {
        Self {
            inner,
            written: Vec::new(),
            outgoing: Vec::new(),
            read_raw: BytesMut::new(),
            incoming: Vec::new(),
            guard: Guard::new(limits),
            header_sent: false,
            open_sent: false,
            fatal: None,
            write_waker: None,
            tag_prefixes: HashMap::new(),
        }
    }
}

impl<S: AsyncWrite + Unpin> WideTags<S> {
    /// Sends what is rewritten; `Ready` once all of it is with `inner`.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.outgoing.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.outgoing) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    self.outgoing.drain(..n);
                    if self.outgoing.is_empty() && self.outgoing.capacity() > IDLE_KEEP {
                        self.outgoing = Vec::new();
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> WideTags<S> {
    /// Sends disposition answers queued by a read (with whatever the writer left before them),
    /// then lets the writer know. When the socket is full, the reader's waker is registered and
    /// the next read tries again.
    fn send_answers(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        match self.drain(cx) {
            Poll::Ready(Ok(())) => {
                if let Poll::Ready(Err(e)) = Pin::new(&mut self.inner).poll_flush(cx) {
                    return Err(e);
                }
                if let Some(w) = self.write_waker.take() {
                    w.wake();
                }
                Ok(())
            }
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(()),
        }
    }
}

fn refused(v: &Violation) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{}: {}", symbol(&v.condition), v.description),
    )
}

/// The condition's name, as the peer sees it.
pub fn symbol(c: &ErrorCondition) -> String {
    serde_amqp::to_vec(c)
        .ok()
        .and_then(|b| serde_amqp::from_slice::<fe2o3_amqp::types::primitives::Symbol>(&b).ok())
        .map(|s| s.0)
        .unwrap_or_else(|| format!("{c:?}"))
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WideTags<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Some(v) = &this.fatal {
            return Poll::Ready(Err(refused(v)));
        }
        if this.outgoing.len() >= MAX_BUFFERED {
            match this.drain(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        this.written.extend_from_slice(buf);
        if !this.open_sent {
            let (header, open) = scan_outgoing(&this.written);
            this.header_sent |= header;
            this.open_sent |= open;
        }
        let (channels, prefixes) = (&mut this.guard.channels, &mut this.tag_prefixes);
        process_with(
            &mut this.written,
            &mut this.outgoing,
            |frame, code, out| match code {
                TRANSFER => {
                    let ch = channel(frame);
                    widen_transfer(frame, out, |handle| {
                        prefixes
                            .get(&(ch, handle))
                            .copied()
                            .unwrap_or_else(random_prefix)
                    })
                }
                ATTACH => {
                    if let Some(handle) = attach_handle(frame) {
                        prefixes.insert((channel(frame), handle), random_prefix());
                    }
                    out.extend_from_slice(frame);
                }
                BEGIN => {
                    note_begin(frame, channels);
                    out.extend_from_slice(frame);
                }
                _ => out.extend_from_slice(frame),
            },
        )?;
        // Start sending; what does not go now goes on the next write or flush.
        match this.drain(cx) {
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => this.write_waker = Some(cx.waker().clone()),
            Poll::Ready(Ok(())) => {}
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match this.drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            Poll::Pending => {
                this.write_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match this.drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WideTags<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.fatal.is_none() && !this.outgoing.is_empty() {
            this.send_answers(cx)?;
        }
        loop {
            if !this.incoming.is_empty() {
                let n = this.incoming.len().min(buf.remaining());
                buf.put_slice(&this.incoming[..n]);
                this.incoming.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if let Some(v) = &this.fatal {
                // The close goes out first; then the stream ends for fe2o3 and the socket
                // is dropped.
                let v = v.clone();
                return match this.drain(cx) {
                    Poll::Ready(Ok(())) => match Pin::new(&mut this.inner).poll_flush(cx) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(_) => Poll::Ready(Err(refused(&v))),
                    },
                    Poll::Ready(Err(_)) => Poll::Ready(Err(refused(&v))),
                    Poll::Pending => Poll::Pending,
                };
            }
            this.read_raw.reserve(READ_CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.read_raw) {
                Poll::Ready(Ok(0)) => {
                    // End of stream: an incomplete frame is of no use to fe2o3.
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(_)) => {
                    let (at, checked) = this.guard.scan(&this.read_raw, &mut this.incoming);
                    this.read_raw.advance(at);
                    if let Err(v) = checked {
                        tracing::debug!(
                            condition = %symbol(&v.condition),
                            reason = %v.description,
                            "closing the connection"
                        );
                        let bye = this.guard.farewell(&v, this.header_sent, this.open_sent);
                        this.outgoing.extend_from_slice(&bye);
                        this.read_raw = BytesMut::new();
                        this.fatal = Some(v);
                    } else if !this.guard.answers.is_empty() {
                        let answers = std::mem::take(&mut this.guard.answers);
                        this.outgoing.extend_from_slice(&answers);
                        this.send_answers(cx)?;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing more to read for now: an idle connection keeps no read buffers.
                    if this.read_raw.is_empty() {
                        this.read_raw = BytesMut::new();
                    }
                    if this.incoming.is_empty() && this.incoming.capacity() > IDLE_KEEP {
                        this.incoming = Vec::new();
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
