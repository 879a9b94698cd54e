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
//! Protocol headers, SASL frames, empty (heartbeat) frames and every other frame pass through
//! byte for byte; performatives are decoded and encoded with serde_amqp.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use fe2o3_amqp::types::{
    definitions::DeliveryTag,
    performatives::{MaxFrameSize, Open, Transfer},
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
fn widen_transfer(frame: &[u8], out: &mut Vec<u8>) {
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
        let mut wide = vec![0u8; TAG_LEN - tag.len()];
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

/// Moves every complete unit of `raw` to `out`, rewriting AMQP frames with `code` by `f`.
/// Returns whether a frame with `code` was seen.
fn process(
    raw: &mut Vec<u8>,
    out: &mut Vec<u8>,
    code: u64,
    f: fn(&[u8], &mut Vec<u8>),
) -> std::io::Result<bool> {
    let mut at = 0;
    let mut seen = false;
    loop {
        match next_unit(&raw[at..])? {
            Unit::Incomplete => break,
            Unit::Pass(n) => {
                out.extend_from_slice(&raw[at..at + n]);
                at += n;
            }
            Unit::Frame(n, c) => {
                if c == code {
                    f(&raw[at..at + n], out);
                    seen = true;
                } else {
                    out.extend_from_slice(&raw[at..at + n]);
                }
                at += n;
            }
        }
    }
    raw.drain(..at);
    Ok(seen)
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
        process(
            &mut this.written,
            &mut this.outgoing,
            TRANSFER,
            widen_transfer,
        )?;
        // Start sending; what does not go now goes on the next write or flush.
        if let Poll::Ready(Err(e)) = this.drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match this.drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
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

impl<S: AsyncRead + Unpin> AsyncRead for WideTags<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.incoming.is_empty() {
                let n = this.incoming.len().min(buf.remaining());
                buf.put_slice(&this.incoming[..n]);
                this.incoming.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if this.open_seen {
                if !this.read_raw.is_empty() {
                    // Bytes read after the open in the same chunk.
                    std::mem::swap(&mut this.incoming, &mut this.read_raw);
                    continue;
                }
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 4096];
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
                    this.open_seen = process(
                        &mut this.read_raw,
                        &mut this.incoming,
                        OPEN,
                        adjust_peer_open,
                    )?;
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

    #[test]
    fn a_short_tag_grows_to_16_bytes_and_the_payload_stays() {
        let payload = b"\x00\x53\x75\xa0\x03abc".to_vec();
        let f = frame(&transfer(Some(vec![0, 0, 0, 9])), &payload, 0);
        let mut raw = f.clone();
        let mut out = Vec::new();
        process(&mut raw, &mut out, TRANSFER, widen_transfer).unwrap();
        assert!(raw.is_empty());
        let (t, p) = parse(&out);
        let mut want = vec![0u8; 16];
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
        process(&mut stream, &mut out, TRANSFER, widen_transfer).unwrap();
        assert_eq!(out, whole);
        assert_eq!(stream, tail[..10].to_vec(), "the incomplete frame waits");
        stream.extend_from_slice(&tail[10..]);
        out.clear();
        process(&mut stream, &mut out, TRANSFER, widen_transfer).unwrap();
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

    #[test]
    fn a_frame_size_below_eight_is_an_error() {
        let mut raw = vec![0, 0, 0, 4, 2, 0, 0, 0];
        assert!(process(&mut raw, &mut Vec::new(), TRANSFER, widen_transfer).is_err());
    }
}
