//! The record format: a message record (its own compact binary encoding) and the queue
//! entries and keys that point to it (see the layout in the parent module's doc).

use crate::{
    model::identity::{DeviceId, Identity, ModuleId},
    model::message::Message,
};
use fe2o3_amqp::types::messaging::Properties;
use serde::{de::DeserializeOwned, Serialize};
use std::cell::RefCell;

use super::*;

pub(super) const RECORD_FORMAT: u8 = 1;
pub(super) const HAS_TWIN_CHANGE: u8 = 1;
pub(super) const HAS_MODULE: u8 = 1 << 1;
pub(super) const HAS_OUTPUT: u8 = 1 << 2;
pub(super) const HAS_PROPERTIES: u8 = 1 << 3;
pub(super) const HAS_APPLICATION_PROPERTIES: u8 = 1 << 4;
pub(super) const HAS_ANNOTATIONS: u8 = 1 << 5;

pub(super) fn section_len(m: &Message, len: usize) -> Result<[u8; 4], StoreError> {
    u32::try_from(len)
        .map(u32::to_be_bytes)
        .map_err(|_| StoreError::Encode(m.id, format!("a section of {len} bytes")))
}

pub(super) fn put_text(out: &mut Vec<u8>, m: &Message, text: &str) -> Result<(), StoreError> {
    out.extend_from_slice(&section_len(m, text.len())?);
    out.extend_from_slice(text.as_bytes());
    Ok(())
}

/// Appends a length and the AMQP encoding of `value`, serialized in place.
pub(super) fn put_amqp<T: Serialize>(
    out: &mut Vec<u8>,
    m: &Message,
    value: &T,
) -> Result<(), StoreError> {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    value
        .serialize(&mut serde_amqp::ser::Serializer::new(&mut *out))
        .map_err(|e| StoreError::Encode(m.id, e.to_string()))?;
    let len = section_len(m, out.len() - at - 4)?;
    out[at..at + 4].copy_from_slice(&len);
    Ok(())
}

/// Appends the record of `m` (layout in the module doc).
pub(crate) fn encode_record(m: &Message, out: &mut Vec<u8>) -> Result<(), StoreError> {
    let module = m.from.module();
    let mut flags = 0;
    for (set, flag) in [
        (m.twin_change, HAS_TWIN_CHANGE),
        (module.is_some(), HAS_MODULE),
        (m.output.is_some(), HAS_OUTPUT),
        (m.properties.is_some(), HAS_PROPERTIES),
        (
            !m.application_properties.is_empty(),
            HAS_APPLICATION_PROPERTIES,
        ),
        (!m.annotations.is_empty(), HAS_ANNOTATIONS),
    ] {
        if set {
            flags |= flag;
        }
    }
    out.reserve(m.body.len() + 64);
    out.push(RECORD_FORMAT);
    out.push(flags);
    out.extend_from_slice(&m.enqueued_ms.to_be_bytes());
    put_text(out, m, m.from.device().as_str())?;
    if let Some(module) = module {
        put_text(out, m, module.as_str())?;
    }
    if let Some(output) = &m.output {
        put_text(out, m, output)?;
    }
    if let Some(p) = &m.properties {
        put_amqp(out, m, p)?;
    }
    if !m.application_properties.is_empty() {
        put_amqp(out, m, &m.application_properties)?;
    }
    if !m.annotations.is_empty() {
        put_amqp(out, m, &m.annotations)?;
    }
    out.extend_from_slice(&m.body);
    Ok(())
}

/// Reads a record front to back; every read checks the length left.
pub(super) struct RecordReader<'a> {
    pub(super) rest: &'a [u8],
    pub(super) id: u64,
}

impl<'a> RecordReader<'a> {
    pub(super) fn corrupt(&self, why: impl Into<String>) -> StoreError {
        StoreError::Corrupt(self.id, why.into())
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.rest.len() < n {
            return Err(self.corrupt("the record is cut short"));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let bytes = self.take(N)?;
        <[u8; N]>::try_from(bytes).map_err(|_| self.corrupt("the record is cut short"))
    }

    pub(super) fn section(&mut self) -> Result<&'a [u8], StoreError> {
        let len = u32::from_be_bytes(self.array()?);
        self.take(len as usize)
    }

    pub(super) fn text(&mut self) -> Result<&'a str, StoreError> {
        let bytes = self.section()?;
        std::str::from_utf8(bytes).map_err(|e| self.corrupt(e.to_string()))
    }

    pub(super) fn amqp<T: DeserializeOwned>(&mut self) -> Result<T, StoreError> {
        let bytes = self.section()?;
        serde_amqp::from_slice(bytes).map_err(|e| self.corrupt(e.to_string()))
    }
}

pub(crate) fn decode_record(id: u64, bytes: &[u8]) -> Result<Message, StoreError> {
    let mut r = RecordReader { rest: bytes, id };
    let [format, flags] = r.array()?;
    if format != RECORD_FORMAT {
        return Err(r.corrupt(format!("unknown record format {format}")));
    }
    let has = |flag: u8| flags & flag != 0;
    let enqueued_ms = i64::from_be_bytes(r.array()?);
    let bad = |e: crate::model::identity::IdError| StoreError::Corrupt(id, e.to_string());
    let device = DeviceId::parse(r.text()?).map_err(bad)?;
    let from = if has(HAS_MODULE) {
        Identity::Module(device, ModuleId::parse(r.text()?).map_err(bad)?)
    } else {
        Identity::Device(device)
    };
    let output = if has(HAS_OUTPUT) {
        Some(r.text()?.to_owned())
    } else {
        None
    };
    let properties: Option<Properties> = if has(HAS_PROPERTIES) {
        Some(r.amqp()?)
    } else {
        None
    };
    let application_properties = if has(HAS_APPLICATION_PROPERTIES) {
        r.amqp()?
    } else {
        Default::default()
    };
    let annotations = if has(HAS_ANNOTATIONS) {
        r.amqp()?
    } else {
        Default::default()
    };
    Ok(Message {
        body: r.rest.to_vec(),
        properties,
        application_properties,
        annotations,
        from,
        output,
        enqueued_ms,
        twin_change: has(HAS_TWIN_CHANGE),
        id,
    })
}

// ---------------------------------------------------------------------------------------------
// Queue entries

/// The entry holds the message record after its head.
pub(super) const INLINE: u8 = 1;
/// The entry points at the message's record in `messages`.
pub(super) const POINTER: u8 = 2;
/// Kind, message id, expiry.
pub(super) const ENTRY_HEAD: usize = 17;
/// First byte of a queue entry's key: then the queue's number, priority and sequence.
pub(super) const ENTRY_KEY: u8 = 0x01;
/// First byte of a queue's name record's key: then the queue's number (→ its endpoint id).
pub(super) const NAME_KEY: u8 = 0x02;
/// A queue entry's key: [`ENTRY_KEY`], queue number (u32 BE), priority (u32 BE), sequence
/// (u64 BE).
pub(super) const KEY_LEN: usize = 17;

pub(super) fn push_key(out: &mut Vec<u8>, queue: u32, priority: u32, seq: u64) {
    out.push(ENTRY_KEY);
    out.extend_from_slice(&queue.to_be_bytes());
    out.extend_from_slice(&priority.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
}

pub(super) fn queue_key(queue: u32, priority: u32, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(KEY_LEN);
    push_key(&mut k, queue, priority, seq);
    k
}

/// Queue number, priority and sequence of an entry's key.
pub(super) fn split_queue_key(k: &[u8]) -> Option<(u32, u32, u64)> {
    let k: &[u8; KEY_LEN] = k.try_into().ok()?;
    if k[0] != ENTRY_KEY {
        return None;
    }
    let q = u32::from_be_bytes(k[1..5].try_into().ok()?);
    let p = u32::from_be_bytes(k[5..9].try_into().ok()?);
    let s = u64::from_be_bytes(k[9..].try_into().ok()?);
    Some((q, p, s))
}

pub(super) fn name_key(queue: u32) -> [u8; 5] {
    let mut k = [NAME_KEY; 5];
    k[1..].copy_from_slice(&queue.to_be_bytes());
    k
}

/// The queue number of a name record's key.
pub(super) fn split_name_key(k: &[u8]) -> Option<u32> {
    match k {
        [NAME_KEY, n @ ..] => Some(u32::from_be_bytes(n.try_into().ok()?)),
        _ => None,
    }
}

/// An entry's key as stores written before queues were numbered have it: the endpoint id,
/// `0x00`, priority, sequence. Endpoint ids start with `/` or `$` (`/modules/…`, `$upstream`,
/// `$c2d/<device>`), so such a key never starts with [`ENTRY_KEY`], [`NAME_KEY`] or `0xFF`
/// (which UTF-8 never has).
pub(super) fn split_unnumbered_key(k: &[u8]) -> Option<(String, u32, u64)> {
    let zero = k.iter().position(|b| *b == 0)?;
    let (ep, rest) = (&k[..zero], k.get(zero + 1..)?);
    if ep.is_empty() || rest.len() != 12 {
        return None;
    }
    let p = u32::from_be_bytes(rest[..4].try_into().ok()?);
    let s = u64::from_be_bytes(rest[4..].try_into().ok()?);
    Some((String::from_utf8(ep.to_vec()).ok()?, p, s))
}

pub(super) fn entry_head(kind: u8, msg_id: u64, expires_ms: Option<i64>) -> [u8; ENTRY_HEAD] {
    let mut h = [0u8; ENTRY_HEAD];
    h[0] = kind;
    h[1..9].copy_from_slice(&msg_id.to_be_bytes());
    h[9..].copy_from_slice(&expires_ms.unwrap_or(i64::MAX).to_be_bytes());
    h
}

/// A queue entry's value, parsed.
pub(super) struct EntryValue<'a> {
    pub(super) kind: u8,
    pub(super) msg_id: u64,
    pub(super) expires_ms: Option<i64>,
    /// The record, for an inline entry.
    pub(super) record: &'a [u8],
}

pub(super) fn parse_entry(v: &[u8]) -> Option<EntryValue<'_>> {
    let head = v.get(..ENTRY_HEAD)?;
    let kind = head[0];
    let msg_id = u64::from_be_bytes(head[1..9].try_into().ok()?);
    let expires = i64::from_be_bytes(head[9..].try_into().ok()?);
    let record = &v[ENTRY_HEAD..];
    match kind {
        INLINE if !record.is_empty() => {}
        POINTER if record.is_empty() => {}
        _ => return None,
    }
    Some(EntryValue {
        kind,
        msg_id,
        expires_ms: (expires != i64::MAX).then_some(expires),
        record,
    })
}

thread_local! {
    /// Where a queue entry is assembled before fjall copies it: one buffer per thread rather
    /// than an allocation per message.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A scratch buffer that grew past this (a large message) is given back after use.
pub(super) const SCRATCH_KEEP: usize = 1 << 20;

pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            let r = f(&mut buf);
            if buf.capacity() > SCRATCH_KEEP {
                *buf = Vec::new();
            }
            r
        }
        Err(_) => f(&mut Vec::new()),
    })
}
