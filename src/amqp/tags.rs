//! 16-byte delivery tags on the hub's outgoing transfers.
//!
//! The Azure IoT C# SDK turns the delivery tag of every message it receives into the message's
//! lock token with `new Guid(tag)`, which takes exactly 16 bytes; IoT Hub and edgeHub send
//! GUID tags. fe2o3 numbers a link's deliveries with 4-byte tags and offers no way to choose
//! them, so this stream sits between fe2o3 and TLS and rewrites frames:
//!
//! * outgoing: each AMQP transfer frame that carries a delivery tag shorter than 16 bytes gets
//!   it left-padded with zeros to 16 bytes (still unique per link, since the original is kept in
//!   the low bytes). The peer never sends tags back (dispositions name delivery ids), so fe2o3's
//!   own bookkeeping is unaffected;
//! * incoming: the peer's `open` is the only frame changed: its max-frame-size is lowered by
//!   [`HEADROOM`], so a full transfer frame that fe2o3 builds still fits after its tag grows,
//!   and its idle-time-out is halved, so fe2o3's keep-alives arrive well inside the peer's limit.
//!
//! * incoming: a `disposition` from the peer as receiver that gives a terminal outcome without
//!   settling (the C# SDK's complete/abandon/reject, and every receiver in rcv-settle-mode
//!   `second`) is settled before fe2o3 sees it, and the hub answers it with a settled `accepted`
//!   disposition for the same deliveries, as edgeHub does. The C# SDK waits for that answer
//!   (`CompleteAsync` hangs until its timeout without it) and requires it to be `accepted`;
//!   fe2o3 answers only in rcv-settle-mode `second`, and then with the peer's own outcome. The
//!   answer goes on the hub's channel of the session, learnt from the hub's outgoing `begin`.
//!
//! Protocol headers, SASL frames, empty (heartbeat) frames and every other frame pass through
//! byte for byte; performatives are decoded and encoded with serde_amqp. An incoming frame
//! larger than [`MAX_FRAME_SIZE`] ends the stream with an error before it is buffered.

use std::{
    collections::HashMap,
    pin::Pin,
    task::{Context, Poll, Waker},
};

use fe2o3_amqp::types::{
    definitions::{DeliveryTag, Role},
    messaging::{Accepted, DeliveryState},
    performatives::{Begin, Disposition, MaxFrameSize, Open, Transfer},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The tag length the SDKs expect.
pub const TAG_LEN: usize = 16;
/// Bytes a rewritten transfer may grow by (12 for the tag, 6 if its list encoding widens), with
/// margin.
pub const HEADROOM: u32 = 64;
/// Bytes written by fe2o3 and not yet sent before `poll_write` pushes back.
const MAX_BUFFERED: usize = 1 << 20;

/// The largest frame the hub announces it accepts (its `open`'s max-frame-size).
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;

const TRANSFER: u64 = 0x14;
const OPEN: u64 = 0x10;
const BEGIN: u64 = 0x11;
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

/// The unit at the head of `buf`; a frame declaring more than `limit` bytes is an error.
fn next_unit(buf: &[u8], limit: usize) -> std::io::Result<Unit> {
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
    if size > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame size {size} is above the limit of {limit}"),
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

/// The numeric descriptor of a performative (`0x00` then a small ulong or a ulong).
fn descriptor(body: &[u8]) -> Option<u64> {
    match body {
        [0x00, 0x53, code, ..] => Some(u64::from(*code)),
        [0x00, 0x80, rest @ ..] if rest.len() >= 8 => {
            Some(u64::from_be_bytes(rest[..8].try_into().ok()?))
        }
        _ => None,
    }
}

/// The length of the performative at the start of a frame body (descriptor and list).
fn performative_len(body: &[u8]) -> Option<usize> {
    let descriptor = match body.get(1)? {
        0x53 => 3,
        0x80 => 10,
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
/// fe2o3's tags are a per-link counter from 0; the wide tag is the connection's random
/// `prefix`, the link handle, then that counter, so that tags (and the C# SDK's lock tokens made
/// of them) differ across links and connections, as edgeHub's GUIDs do.
fn widen_transfer(frame: &[u8], out: &mut Vec<u8>, prefix: &[u8; 8]) {
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
            wide.extend_from_slice(prefix);
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
    limit: usize,
    mut f: impl FnMut(&[u8], u64, &mut Vec<u8>),
) -> std::io::Result<()> {
    let mut at = 0;
    let result = loop {
        match next_unit(&raw[at..], limit) {
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
    process_with(raw, out, usize::MAX, |frame, c, out| {
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

/// The stream wrapper: see the module documentation.
#[derive(Debug)]
pub struct WideTags<S> {
    inner: S,
    /// Written by fe2o3, not yet a complete unit.
    written: Vec<u8>,
    /// Rewritten, waiting to go to `inner`.
    outgoing: Vec<u8>,
    /// Until the peer's `open` has been seen: read from `inner`, not yet a complete unit.
    read_raw: Vec<u8>,
    /// Rewritten incoming bytes not yet handed to fe2o3.
    incoming: Vec<u8>,
    open_seen: bool,
    /// The peer's session channel → the hub's channel of the same session.
    channels: HashMap<u16, u16>,
    /// The writer, when it last found `outgoing` could not all go out; the reader wakes it
    /// after it sent disposition answers (and so everything before them).
    write_waker: Option<Waker>,
    /// The first bytes of every widened delivery tag of this connection.
    tag_prefix: [u8; 8],
}

fn random_prefix() -> [u8; 8] {
    let mut p = [0u8; 8];
    p.copy_from_slice(&uuid::Uuid::new_v4().as_bytes()[..8]);
    p
}

impl<S> WideTags<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            written: Vec::new(),
            outgoing: Vec::new(),
            read_raw: Vec::new(),
            incoming: Vec::new(),
            open_seen: false,
            channels: HashMap::new(),
            write_waker: None,
            tag_prefix: random_prefix(),
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
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WideTags<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.outgoing.len() >= MAX_BUFFERED {
            match this.drain(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        this.written.extend_from_slice(buf);
        let (channels, tag_prefix) = (&mut this.channels, &this.tag_prefix);
        process_with(
            &mut this.written,
            &mut this.outgoing,
            usize::MAX,
            |frame, code, out| match code {
                TRANSFER => widen_transfer(frame, out, tag_prefix),
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

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WideTags<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.outgoing.is_empty() {
            this.send_answers(cx)?;
        }
        loop {
            if !this.incoming.is_empty() {
                let n = this.incoming.len().min(buf.remaining());
                buf.put_slice(&this.incoming[..n]);
                this.incoming.drain(..n);
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    if got.is_empty() {
                        // End of stream: hand on whatever is left, then the end.
                        std::mem::swap(&mut this.incoming, &mut this.read_raw);
                        if this.incoming.is_empty() {
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    this.read_raw.extend_from_slice(got);
                    let answers = this.outgoing.len();
                    let (open_seen, channels, replies) =
                        (&mut this.open_seen, &this.channels, &mut this.outgoing);
                    process_with(
                        &mut this.read_raw,
                        &mut this.incoming,
                        MAX_FRAME_SIZE as usize,
                        |frame, code, out| match code {
                            OPEN if !*open_seen => {
                                adjust_peer_open(frame, out);
                                *open_seen = true;
                            }
                            DISPOSITION => settle_disposition(frame, out, channels, replies),
                            _ => out.extend_from_slice(frame),
                        },
                    )?;
                    if this.outgoing.len() > answers {
                        this.send_answers(cx)?;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(performative: &[u8], payload: &[u8], frame_type: u8) -> Vec<u8> {
        let size = 8 + performative.len() + payload.len();
        let mut f = (size as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&[2, frame_type, 0, 3]);
        f.extend_from_slice(performative);
        f.extend_from_slice(payload);
        f
    }

    fn transfer(tag: Option<Vec<u8>>) -> Vec<u8> {
        let t = Transfer {
            handle: fe2o3_amqp::types::definitions::Handle(7),
            delivery_id: Some(42),
            delivery_tag: tag.map(DeliveryTag::from),
            message_format: Some(0),
            settled: Some(false),
            more: false,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        };
        serde_amqp::to_vec(&t).unwrap()
    }

    fn parse(f: &[u8]) -> (Transfer, Vec<u8>) {
        let size = u32::from_be_bytes(f[..4].try_into().unwrap()) as usize;
        assert_eq!(size, f.len());
        assert_eq!(&f[4..8], &[2, 0, 0, 3], "header fields kept");
        let body = &f[8..];
        let plen = performative_len(body).unwrap();
        (
            serde_amqp::from_slice(&body[..plen]).unwrap(),
            body[plen..].to_vec(),
        )
    }

    fn widen_zero(frame: &[u8], out: &mut Vec<u8>) {
        widen_transfer(frame, out, &[0; 8]);
    }

    #[test]
    fn wide_tags_differ_across_connections_and_links() {
        let mut seen = std::collections::HashSet::new();
        for prefix in [random_prefix(), random_prefix()] {
            for handle in [0u32, 1] {
                let mut t: Transfer =
                    serde_amqp::from_slice(&transfer(Some(vec![0, 0, 0, 0]))).unwrap();
                t.handle = fe2o3_amqp::types::definitions::Handle(handle);
                let f = frame(&serde_amqp::to_vec(&t).unwrap(), b"", 0);
                let mut out = Vec::new();
                widen_transfer(&f, &mut out, &prefix);
                let tag = parse(&out).0.delivery_tag.unwrap().into_vec();
                assert_eq!(tag.len(), 16);
                assert_eq!(&tag[..8], &prefix);
                assert!(seen.insert(tag), "tag repeated");
            }
        }
    }

    #[test]
    fn a_short_tag_grows_to_16_bytes_and_the_payload_stays() {
        let payload = b"\x00\x53\x75\xa0\x03abc".to_vec();
        let f = frame(&transfer(Some(vec![0, 0, 0, 9])), &payload, 0);
        let mut raw = f.clone();
        let mut out = Vec::new();
        process(&mut raw, &mut out, TRANSFER, widen_zero).unwrap();
        assert!(raw.is_empty());
        let (t, p) = parse(&out);
        let mut want = vec![0u8; 16];
        want[11] = 7; // the link handle
        want[15] = 9;
        assert_eq!(t.delivery_tag.unwrap().into_vec(), want);
        assert_eq!(t.delivery_id, Some(42));
        assert_eq!(p, payload);
        assert!(out.len() - f.len() <= HEADROOM as usize);
    }

    #[test]
    fn other_units_pass_byte_for_byte_and_partial_frames_wait() {
        let header = b"AMQP\x00\x01\x00\x00".to_vec();
        let heartbeat = vec![0, 0, 0, 8, 2, 0, 0, 0];
        let sasl = frame(b"\x00\x53\x40\x45", b"", 1);
        let long_tag = frame(&transfer(Some(vec![1; 16])), b"x", 0);
        let continuation = frame(&transfer(None), b"y", 0);
        let mut stream = [header, heartbeat, sasl, long_tag, continuation].concat();
        let whole = stream.clone();
        let tail = frame(&transfer(Some(vec![5])), b"z", 0);
        stream.extend_from_slice(&tail[..10]);
        let mut out = Vec::new();
        process(&mut stream, &mut out, TRANSFER, widen_zero).unwrap();
        assert_eq!(out, whole);
        assert_eq!(stream, tail[..10].to_vec(), "the incomplete frame waits");
        stream.extend_from_slice(&tail[10..]);
        out.clear();
        process(&mut stream, &mut out, TRANSFER, widen_zero).unwrap();
        let (t, p) = parse(&out);
        assert_eq!(t.delivery_tag.unwrap().len(), 16);
        assert_eq!(p, b"z");
    }

    #[test]
    fn the_peer_open_gets_headroom() {
        let open = Open {
            container_id: "peer".into(),
            hostname: None,
            max_frame_size: MaxFrameSize(65_536),
            channel_max: Default::default(),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let f = frame(&serde_amqp::to_vec(&open).unwrap(), b"", 0);
        let mut raw = [b"AMQP\x00\x01\x00\x00".to_vec(), f].concat();
        let mut out = Vec::new();
        assert!(process(&mut raw, &mut out, OPEN, adjust_peer_open).unwrap());
        let body = &out[16..];
        let got: Open = serde_amqp::from_slice(&body[..performative_len(body).unwrap()]).unwrap();
        assert_eq!(got.max_frame_size.0, 65_536 - HEADROOM);
        assert_eq!(got.container_id, "peer");
        assert_eq!(got.idle_time_out, None);
    }

    #[test]
    fn keepalives_go_out_at_half_the_peer_idle_time_out() {
        for (announced, seen) in [
            (240_000, Some(120_000)),
            (10_000, Some(5_000)),
            (1, Some(1)),
            (0, Some(0)),
        ] {
            let open = Open {
                container_id: "c-sdk".into(),
                hostname: None,
                max_frame_size: MaxFrameSize(65_536),
                channel_max: Default::default(),
                idle_time_out: Some(announced),
                outgoing_locales: None,
                incoming_locales: None,
                offered_capabilities: None,
                desired_capabilities: None,
                properties: None,
            };
            let f = frame(&serde_amqp::to_vec(&open).unwrap(), b"", 0);
            let mut raw = [b"AMQP\x00\x01\x00\x00".to_vec(), f].concat();
            let mut out = Vec::new();
            assert!(process(&mut raw, &mut out, OPEN, adjust_peer_open).unwrap());
            let body = &out[16..];
            let got: Open =
                serde_amqp::from_slice(&body[..performative_len(body).unwrap()]).unwrap();
            assert_eq!(got.idle_time_out, seen, "announced {announced}");
        }
    }

    fn disposition(role: Role, settled: bool, state: Option<DeliveryState>) -> Vec<u8> {
        let d = Disposition {
            role,
            first: 5,
            last: Some(9),
            settled,
            state,
            batchable: false,
        };
        frame(&serde_amqp::to_vec(&d).unwrap(), b"", 0)
    }

    fn parse_disposition(f: &[u8]) -> (u16, Disposition) {
        let body = &f[8..];
        let plen = performative_len(body).unwrap();
        (channel(f), serde_amqp::from_slice(&body[..plen]).unwrap())
    }

    #[test]
    fn an_unsettled_outcome_is_settled_and_answered_accepted_on_the_hubs_channel() {
        use fe2o3_amqp::types::messaging::{Rejected, Released};
        // The test frames are on channel 3 (the peer's); the hub's channel for it is 1.
        let channels = HashMap::from([(3, 1)]);
        for outcome in [
            DeliveryState::Accepted(Accepted {}),
            DeliveryState::Released(Released {}),
            DeliveryState::Rejected(Rejected { error: None }),
        ] {
            let f = disposition(Role::Receiver, false, Some(outcome.clone()));
            let (mut out, mut replies) = (Vec::new(), Vec::new());
            settle_disposition(&f, &mut out, &channels, &mut replies);
            let (ch, seen) = parse_disposition(&out);
            assert_eq!(ch, 3);
            assert!(seen.settled, "fe2o3 sees it settled");
            assert_eq!(seen.state, Some(outcome), "with the peer's outcome");
            assert_eq!((seen.first, seen.last), (5, Some(9)));
            let (ch, answer) = parse_disposition(&replies);
            assert_eq!(ch, 1, "the answer goes on the hub's channel");
            assert_eq!(answer.role, Role::Sender);
            assert!(answer.settled);
            assert_eq!(answer.state, Some(DeliveryState::Accepted(Accepted {})));
            assert_eq!((answer.first, answer.last), (5, Some(9)));
        }
    }

    #[test]
    fn settled_or_non_terminal_or_sender_dispositions_pass_unanswered() {
        use fe2o3_amqp::types::messaging::Received;
        let channels = HashMap::from([(3, 1)]);
        let accepted = || Some(DeliveryState::Accepted(Accepted {}));
        let received = Some(DeliveryState::Received(Received {
            section_number: 0,
            section_offset: 0,
        }));
        for f in [
            disposition(Role::Receiver, true, accepted()),
            disposition(Role::Receiver, false, received),
            disposition(Role::Receiver, false, None),
            disposition(Role::Sender, false, accepted()),
        ] {
            let (mut out, mut replies) = (Vec::new(), Vec::new());
            settle_disposition(&f, &mut out, &channels, &mut replies);
            assert_eq!(out, f);
            assert!(replies.is_empty());
        }
        // A session the hub never began: left to fe2o3.
        let f = disposition(Role::Receiver, false, accepted());
        let (mut out, mut replies) = (Vec::new(), Vec::new());
        settle_disposition(&f, &mut out, &HashMap::new(), &mut replies);
        assert_eq!(out, f);
        assert!(replies.is_empty());
    }

    #[test]
    fn the_hubs_begin_maps_the_peers_channel() {
        let begin = Begin {
            remote_channel: Some(3),
            next_outgoing_id: 0,
            incoming_window: 10,
            outgoing_window: 10,
            handle_max: Default::default(),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let mut f = frame(&serde_amqp::to_vec(&begin).unwrap(), b"", 0);
        f[6..8].copy_from_slice(&7u16.to_be_bytes());
        let mut channels = HashMap::new();
        note_begin(&f, &mut channels);
        assert_eq!(channels.get(&3), Some(&7));
    }

    #[test]
    fn an_incoming_frame_above_the_limit_is_an_error_before_it_is_buffered() {
        let mut raw = ((MAX_FRAME_SIZE + 1).to_be_bytes()).to_vec();
        raw.extend_from_slice(&[2, 0, 0, 0]);
        let err = process_with(
            &mut raw,
            &mut Vec::new(),
            MAX_FRAME_SIZE as usize,
            |_, _, _| {},
        )
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_frame_size_below_eight_is_an_error() {
        let mut raw = vec![0, 0, 0, 4, 2, 0, 0, 0];
        assert!(process(&mut raw, &mut Vec::new(), TRANSFER, widen_zero).is_err());
    }
}
