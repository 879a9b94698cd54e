//! Full-length performatives: every field of what the hub sends, trailing nulls included.
//!
//! AMQP lets an encoder drop trailing null fields of a described list, and fe2o3 does. The
//! Python Event Hubs SDK (`azure-eventhub` 5.x, its own AMQP stack) decodes a performative into
//! exactly the fields on the wire and then reads fixed positions (an attach's 14th field, the
//! payload of a transfer after its 11th), so it fails on a shortened one. Real brokers write
//! every field. So each frame the hub writes (AMQP and SASL) has its performative padded with
//! nulls to the full count of its type, and so do the source and target of an attach and the
//! error of a detach, end or close. Values already there are copied byte for byte.

/// Fields of each described list the hub sends, by descriptor code.
fn field_count(code: u64) -> Option<usize> {
    Some(match code {
        0x10 => 10, // open
        0x11 => 8,  // begin
        0x12 => 14, // attach
        0x13 => 11, // flow
        0x14 => 11, // transfer
        0x15 => 6,  // disposition
        0x16 => 3,  // detach
        0x17 => 1,  // end
        0x18 => 1,  // close
        0x1d => 3,  // error
        0x28 => 11, // source
        0x29 => 7,  // target
        0x40 => 1,  // sasl-mechanisms
        0x41 => 3,  // sasl-init
        0x42 => 1,  // sasl-challenge
        0x43 => 1,  // sasl-response
        0x44 => 2,  // sasl-outcome
        _ => return None,
    })
}

/// The encoded length of the AMQP value at the start of `buf`.
fn value_len(buf: &[u8]) -> Option<usize> {
    let c = *buf.first()?;
    let u8_at = |i: usize| buf.get(i).map(|b| *b as usize);
    let u32_at = |i: usize| Some(u32::from_be_bytes(buf.get(i..i + 4)?.try_into().ok()?) as usize);
    let len = match c {
        0x00 => {
            let d = value_len(&buf[1..])?;
            1 + d + value_len(buf.get(1 + d..)?)?
        }
        0x40..=0x4f => 1,
        0x50..=0x5f => 2,
        0x60..=0x6f => 3,
        0x70..=0x7f => 5,
        0x80..=0x8f => 9,
        0x90..=0x9f => 17,
        0xa0..=0xaf | 0xc0..=0xcf | 0xe0..=0xef => 2 + u8_at(1)?,
        0xb0..=0xbf | 0xd0..=0xdf | 0xf0..=0xff => 5 + u32_at(1)?,
        _ => return None,
    };
    (len <= buf.len()).then_some(len)
}

/// The elements of the list at the start of `buf` (list0, list8 or list32).
fn elements(list: &[u8]) -> Option<Vec<&[u8]>> {
    let (count, mut rest) = match *list.first()? {
        0x45 => (0, &[][..]),
        0xc0 => {
            let size = *list.get(1)? as usize;
            (*list.get(2)? as usize, list.get(3..2 + size)?)
        }
        0xd0 => {
            let size = u32::from_be_bytes(list.get(1..5)?.try_into().ok()?) as usize;
            let count = u32::from_be_bytes(list.get(5..9)?.try_into().ok()?) as usize;
            (count, list.get(9..5 + size)?)
        }
        _ => return None,
    };
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let n = value_len(rest)?;
        out.push(&rest[..n]);
        rest = &rest[n..];
    }
    rest.is_empty().then_some(out)
}

/// The descriptor code of a described list (`0x00 0x53 code` or `0x00 0x80 code`) and the
/// length of the descriptor.
fn code_of(described: &[u8]) -> Option<(u64, usize)> {
    match described {
        [0x00, 0x53, code, ..] => Some((u64::from(*code), 3)),
        [0x00, 0x80, rest @ ..] => Some((u64::from_be_bytes(rest.get(..8)?.try_into().ok()?), 10)),
        _ => None,
    }
}

/// Appends the described list `described` padded to its full field count (and its nested
/// source, target or error); `None` when it is not one the hub pads (the caller copies it).
fn pad_described(described: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let (code, dlen) = code_of(described)?;
    let full = field_count(code)?;
    let fields = elements(&described[dlen..])?;
    if fields.len() > full {
        return None;
    }
    // Which fields hold described lists that are padded too.
    let nested: &[usize] = match code {
        0x12 => &[5, 6],
        0x16 => &[2],
        0x17 | 0x18 => &[0],
        _ => &[],
    };
    let mut content = Vec::with_capacity(described.len() + 32);
    for (i, f) in fields.iter().enumerate() {
        if nested.contains(&i) && pad_described(f, &mut content).is_some() {
            continue;
        }
        content.extend_from_slice(f);
    }
    content.resize(content.len() + (full - fields.len()), 0x40);
    out.extend_from_slice(&described[..dlen]);
    out.push(0xd0);
    out.extend_from_slice(&((content.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&(full as u32).to_be_bytes());
    out.extend_from_slice(&content);
    Some(())
}

/// Appends `frame` (a complete AMQP or SASL frame) with its performative at full length; any
/// other frame, or one that does not parse, as it is.
fn pad_frame(frame: &[u8], out: &mut Vec<u8>) {
    let doff = frame.get(4).map_or(0, |d| *d as usize * 4);
    let is_frame = frame.len() >= 8 && &frame[..4] != b"AMQP" && matches!(frame[5], 0 | 1);
    if !is_frame || doff < 8 || doff >= frame.len() {
        out.extend_from_slice(frame);
        return;
    }
    let body = &frame[doff..];
    let Some(plen) = value_len(body) else {
        out.extend_from_slice(frame);
        return;
    };
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&frame[4..doff]);
    if pad_described(&body[..plen], out).is_none() {
        out.truncate(start);
        out.extend_from_slice(frame);
        return;
    }
    out.extend_from_slice(&body[plen..]);
    let size = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
}

/// Appends the complete units of `written` (protocol headers and frames, as the hub's writer
/// emits them) to `out`, every frame's performative at full length.
pub(super) fn pad_all(written: &[u8], out: &mut Vec<u8>) {
    let mut rest = written;
    while rest.len() >= 8 {
        let n = if &rest[..4] == b"AMQP" {
            8
        } else {
            (u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize).max(8)
        };
        let Some(unit) = rest.get(..n) else { break };
        if n == 8 {
            out.extend_from_slice(unit);
        } else {
            pad_frame(unit, out);
        }
        rest = &rest[n..];
    }
    out.extend_from_slice(rest);
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::{
        definitions::{AmqpError, Error, Handle, Role},
        messaging::{Source, Target},
        performatives::{Attach, Begin, Close, Detach, Open, Transfer},
    };

    fn frame(performative: &[u8], payload: &[u8], frame_type: u8) -> Vec<u8> {
        let size = 8 + performative.len() + payload.len();
        let mut f = (size as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&[2, frame_type, 0, 1]);
        f.extend_from_slice(performative);
        f.extend_from_slice(payload);
        f
    }

    fn padded(f: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        pad_all(f, &mut out);
        out
    }

    /// The field count of the padded frame's performative, and the frame's body.
    fn count(f: &[u8]) -> (usize, Vec<u8>) {
        let body = &f[8..];
        let (_, dlen) = code_of(body).unwrap();
        (elements(&body[dlen..]).unwrap().len(), body.to_vec())
    }

    #[test]
    fn performatives_keep_their_values_and_get_every_field() {
        let open = Open {
            container_id: "edgehub".into(),
            hostname: None,
            max_frame_size: 65536.into(),
            channel_max: 255.into(),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let encoded = serde_amqp::to_vec(&open).unwrap();
        let out = padded(&frame(&encoded, &[], 0));
        let (n, body) = count(&out);
        assert_eq!(n, 10);
        assert!(body.len() > encoded.len());
        let back: Open = serde_amqp::from_slice(&body).unwrap();
        assert_eq!(back.container_id, "edgehub");
        assert_eq!(
            u32::from_be_bytes(out[..4].try_into().unwrap()) as usize,
            out.len()
        );

        let begin = Begin {
            remote_channel: Some(0),
            next_outgoing_id: 1,
            incoming_window: 10,
            outgoing_window: 10,
            handle_max: Handle(3),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let (n, _) = count(&padded(&frame(
            &serde_amqp::to_vec(&begin).unwrap(),
            &[],
            0,
        )));
        assert_eq!(n, 8);
    }

    #[test]
    fn an_attach_gets_a_full_source_and_target() {
        let attach = Attach {
            name: "link".into(),
            handle: Handle(0),
            role: Role::Sender,
            snd_settle_mode: Default::default(),
            rcv_settle_mode: Default::default(),
            source: Some(Box::new(Source::builder().address("a").build())),
            target: Some(Box::new(Target::builder().address("b").build().into())),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: Some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let out = padded(&frame(&serde_amqp::to_vec(&attach).unwrap(), &[], 0));
        let (n, body) = count(&out);
        assert_eq!(n, 14);
        let fields = elements(&body[3..]).unwrap();
        for (i, want) in [(5, 11), (6, 7)] {
            let (_, dlen) = code_of(fields[i]).unwrap();
            assert_eq!(
                elements(&fields[i][dlen..]).unwrap().len(),
                want,
                "field {i}"
            );
        }
        let back: Attach = serde_amqp::from_slice(&body).unwrap();
        assert_eq!(back.name, "link");
        assert_eq!(back.initial_delivery_count, Some(0));
    }

    #[test]
    fn a_transfer_keeps_its_payload_after_the_padded_performative() {
        let transfer = Transfer {
            handle: Handle(1),
            delivery_id: Some(7),
            delivery_tag: Some(vec![1u8; 16].into()),
            message_format: Some(0),
            settled: Some(true),
            more: false,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        };
        let payload = b"\x00\x53\x75\xa0\x03abc";
        let out = padded(&frame(&serde_amqp::to_vec(&transfer).unwrap(), payload, 0));
        let (n, _) = count(&out);
        assert_eq!(n, 11);
        assert!(out.ends_with(payload));
    }

    #[test]
    fn errors_of_detach_and_close_are_padded_and_other_units_pass() {
        let detach = Detach {
            handle: Handle(0),
            closed: true,
            error: Some(Error::new(AmqpError::NotFound, None, None)),
        };
        let out = padded(&frame(&serde_amqp::to_vec(&detach).unwrap(), &[], 0));
        let body = &out[8..];
        let fields = elements(&body[3..]).unwrap();
        assert_eq!(elements(&fields[2][3..]).unwrap().len(), 3);
        let close = Close { error: None };
        let (n, _) = count(&padded(&frame(
            &serde_amqp::to_vec(&close).unwrap(),
            &[],
            0,
        )));
        assert_eq!(n, 1);
        // A protocol header, an empty frame, and bytes of an incomplete frame pass unchanged.
        let mut units = b"AMQP\x00\x01\x00\x00".to_vec();
        units.extend_from_slice(&[0, 0, 0, 8, 2, 0, 0, 0]);
        units.extend_from_slice(&[0, 0, 0, 40, 2]);
        assert_eq!(padded(&units), units);
    }
}
