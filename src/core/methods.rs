//! Direct methods: the dispatcher between callers (the HTTPS method API, the upstream) and
//! the method links of connected modules and devices.
//!
//! Invariants:
//! * a target is reachable only while it has a method-request link; a newer link replaces the
//!   older (whose channel then closes, ending its task);
//! * every call owns its correlation slot through a guard, so the slot is removed when the call
//!   ends for any reason: answered, timed out, or the caller gone. Nothing outlives a call;
//! * a response is matched by correlation id (canonical lower-case text) *and* must come from the
//!   identity that was called.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::model::identity::{Identity, IdentityKey};

/// A request on its way to a method link.
#[derive(Debug)]
pub struct MethodCall {
    pub correlation_id: uuid::Uuid,
    pub method: String,
    pub payload: Vec<u8>,
}

/// What the target answered.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodResponse {
    pub status: i32,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MethodError {
    #[error("client {0} is not connected for direct methods")]
    NotConnected(String),
    #[error("timed out waiting for {0} to respond to method request {1}")]
    Timeout(String, String),
}

struct Pending {
    target: IdentityKey,
    reply: oneshot::Sender<MethodResponse>,
}

/// The method links and the calls in flight.
#[derive(Default)]
pub struct Dispatcher {
    /// Lower-cased identity → (generation, channel to its method-request link).
    links: DashMap<IdentityKey, (u64, mpsc::Sender<MethodCall>)>,
    /// Lower-cased correlation id → the waiting caller.
    pending: DashMap<String, Pending>,
    generation: AtomicU64,
    /// Woken whenever a link registers, for callers inside their connect timeout.
    registered: Notify,
}

fn key(id: &Identity) -> IdentityKey {
    id.key()
}

/// Removes a call's correlation slot when the call ends, however it ends.
struct SlotGuard<'a> {
    pending: &'a DashMap<String, Pending>,
    id: String,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.pending.remove(&self.id);
    }
}

impl Dispatcher {
    /// Registers a new method-request link for `id`; returns its generation and the calls.
    pub fn register(&self, id: &Identity) -> (u64, mpsc::Receiver<MethodCall>) {
        let (tx, rx) = mpsc::channel(64);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.links.insert(key(id), (generation, tx));
        self.registered.notify_waiters();
        (generation, rx)
    }

    /// Removes the link, unless a newer one has replaced it already.
    pub fn unregister(&self, id: &Identity, generation: u64) {
        self.links.remove_if(&key(id), |_, (g, _)| *g == generation);
    }

    /// Delivers a response from `from`; false when no call is waiting for it.
    pub fn respond(&self, from: &Identity, correlation_id: &str, response: MethodResponse) -> bool {
        let cid = correlation_id.to_ascii_lowercase();
        match self.pending.remove_if(&cid, |_, p| p.target == key(from)) {
            Some((_, p)) => p.reply.send(response).is_ok(),
            None => false,
        }
    }

    fn link(&self, id: &IdentityKey) -> Option<mpsc::Sender<MethodCall>> {
        self.links.get(id).map(|l| l.1.clone())
    }

    /// Calls `method` on `target`, waiting up to `connect_timeout` for it to have a method link
    /// and up to `response_timeout` for its answer.
    pub async fn invoke(
        &self,
        target: &Identity,
        method: &str,
        payload: Vec<u8>,
        response_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<MethodResponse, MethodError> {
        let tkey = key(target);
        let deadline = Instant::now() + connect_timeout;
        let link = loop {
            let notified = self.registered.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(l) = self.link(&tkey) {
                break l;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                return Err(MethodError::NotConnected(target.to_string()));
            }
        };
        let correlation_id = uuid::Uuid::new_v4();
        let cid = correlation_id.to_string();
        let (reply, answer) = oneshot::channel();
        self.pending.insert(
            cid.clone(),
            Pending {
                target: tkey,
                reply,
            },
        );
        let _slot = SlotGuard {
            pending: &self.pending,
            id: cid.clone(),
        };
        let call = MethodCall {
            correlation_id,
            method: method.to_owned(),
            payload,
        };
        if link.send(call).await.is_err() {
            return Err(MethodError::NotConnected(target.to_string()));
        }
        match tokio::time::timeout(response_timeout, answer).await {
            Ok(Ok(r)) => Ok(r),
            // The link went away with the call unanswered, or the time is up: both are a
            // timeout for the caller, as on edgeHub.
            Ok(Err(_)) | Err(_) => Err(MethodError::Timeout(target.to_string(), cid)),
        }
    }

    /// Calls waiting for an answer (for tests and metrics).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Identities with a method link.
    pub fn links_len(&self) -> usize {
        self.links.len()
    }

    /// Whether `id` has a method link now.
    pub fn is_registered(&self, id: &Identity) -> bool {
        self.links.contains_key(&key(id))
    }
}

/// Shared handle.
pub type SharedDispatcher = Arc<Dispatcher>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::identity::{DeviceId, ModuleId};

    fn module(m: &str) -> Identity {
        Identity::Module(DeviceId::parse("d").unwrap(), ModuleId::parse(m).unwrap())
    }

    #[tokio::test]
    async fn a_call_reaches_the_link_and_the_answer_comes_back() {
        let d = Arc::new(Dispatcher::default());
        let (_, mut rx) = d.register(&module("b"));
        let d2 = d.clone();
        let server = tokio::spawn(async move {
            let call = rx.recv().await.unwrap();
            assert_eq!(call.method, "ping");
            // Another module cannot answer b's call.
            let cid = call.correlation_id.to_string().to_uppercase();
            let resp = MethodResponse {
                status: 201,
                payload: b"{}".to_vec(),
            };
            assert!(!d2.respond(&module("c"), &cid, resp.clone()));
            assert!(d2.respond(&module("B"), &cid, resp));
        });
        let r = d
            .invoke(
                &module("b"),
                "ping",
                b"1".to_vec(),
                Duration::from_secs(5),
                Duration::ZERO,
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201);
        server.await.unwrap();
        assert_eq!(d.pending_len(), 0);
    }

    #[tokio::test]
    async fn no_link_is_not_connected_and_timeouts_leave_nothing_behind() {
        let d = Dispatcher::default();
        let e = d
            .invoke(
                &module("x"),
                "m",
                vec![],
                Duration::from_secs(1),
                Duration::ZERO,
            )
            .await;
        assert_eq!(e, Err(MethodError::NotConnected("d/x".into())));
        let (_, _rx) = d.register(&module("x"));
        for _ in 0..20 {
            let e = d
                .invoke(
                    &module("x"),
                    "m",
                    vec![],
                    Duration::from_millis(5),
                    Duration::ZERO,
                )
                .await;
            assert!(matches!(e, Err(MethodError::Timeout(..))));
        }
        assert_eq!(d.pending_len(), 0);
    }

    #[tokio::test]
    async fn a_caller_waits_for_a_link_within_its_connect_timeout() {
        let d = Arc::new(Dispatcher::default());
        let d2 = d.clone();
        let caller = tokio::spawn(async move {
            d2.invoke(
                &module("late"),
                "m",
                vec![],
                Duration::from_secs(5),
                Duration::from_secs(10),
            )
            .await
        });
        // Register after the caller started (whether or not it is already waiting, it must
        // find the link within its connect timeout); answer its call.
        tokio::task::yield_now().await;
        let (_, mut rx) = d.register(&module("late"));
        let call = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        d.respond(
            &module("late"),
            &call.correlation_id.to_string(),
            MethodResponse {
                status: 200,
                payload: vec![],
            },
        );
        assert_eq!(caller.await.unwrap().unwrap().status, 200);
    }

    #[tokio::test]
    async fn a_newer_link_replaces_the_older() {
        let d = Dispatcher::default();
        let (g1, mut old) = d.register(&module("b"));
        let (_g2, _new) = d.register(&module("b"));
        assert!(
            old.recv().await.is_none(),
            "the older link's channel closes"
        );
        d.unregister(&module("b"), g1);
        assert_eq!(
            d.links_len(),
            1,
            "the older link's end does not remove the newer"
        );
    }
}
