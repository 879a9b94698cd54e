//! Who reads which partition of the built-in endpoint, per consumer group, with Event Hubs'
//! owner-level (epoch) rules:
//!
//! * with no reader, any reader joins;
//! * a reader with an owner level at least the current owner's takes the partition over: every
//!   reader already there (owner or not) is stopped, as *stolen*;
//! * a reader with a lower owner level than the owner's is refused, as is a reader without one
//!   while an owner reads;
//! * at most [`MAX_PLAIN_READERS`] readers without an owner level read at once; one more is
//!   refused (quota).
//!
//! Pure bookkeeping: the transport stops a stolen reader's link with the condition the SDKs
//! expect (`amqp:link:stolen`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio_util::sync::CancellationToken;

/// Event Hubs' limit of concurrent readers without an owner level per partition and group.
pub const MAX_PLAIN_READERS: usize = 5;

/// Why a reader may not join.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("a reader with owner level {current} reads this partition; owner level {asked:?} cannot take it over")]
    Owned { current: i64, asked: Option<i64> },
    #[error("at most {MAX_PLAIN_READERS} readers without an owner level read a partition of a consumer group at once")]
    Quota,
}

struct Member {
    id: u64,
    owner_level: Option<i64>,
    stolen: CancellationToken,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// (consumer group lower-cased, partition) → its readers.
    partitions: HashMap<(String, u32), Vec<Member>>,
}

/// The readers of every partition; cheap to clone.
#[derive(Clone, Default)]
pub struct Readers(Arc<Mutex<State>>);

/// A reader's place: cancelled `stolen` means another reader took the partition over. Leaves
/// when dropped.
pub struct Reader {
    readers: Readers,
    key: (String, u32),
    id: u64,
    pub stolen: CancellationToken,
}

impl Drop for Reader {
    fn drop(&mut self) {
        let mut s = self.readers.lock();
        if let Some(members) = s.partitions.get_mut(&self.key) {
            members.retain(|m| m.id != self.id);
            if members.is_empty() {
                s.partitions.remove(&self.key);
            }
        }
    }
}

impl Readers {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain maps only: usable after a panic elsewhere.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reader of `partition` of `group` joins, with an owner level or without.
    pub fn join(
        &self,
        group: &str,
        partition: u32,
        owner_level: Option<i64>,
    ) -> Result<Reader, JoinError> {
        let key = (group.to_ascii_lowercase(), partition);
        let mut s = self.lock();
        s.next_id += 1;
        let id = s.next_id;
        let members = s.partitions.entry(key.clone()).or_default();
        let owner = members.iter().filter_map(|m| m.owner_level).max();
        match (owner, owner_level) {
            (Some(current), Some(asked)) if asked < current => {
                return Err(JoinError::Owned {
                    current,
                    asked: Some(asked),
                })
            }
            (Some(current), None) => {
                return Err(JoinError::Owned {
                    current,
                    asked: None,
                })
            }
            (_, Some(_)) => {
                for m in members.drain(..) {
                    m.stolen.cancel();
                }
            }
            (None, None) if members.len() >= MAX_PLAIN_READERS => return Err(JoinError::Quota),
            (None, None) => {}
        }
        let stolen = CancellationToken::new();
        members.push(Member {
            id,
            owner_level,
            stolen: stolen.clone(),
        });
        Ok(Reader {
            readers: self.clone(),
            key,
            id,
            stolen,
        })
    }

    /// Readers of `partition` of `group` now.
    pub fn count(&self, group: &str, partition: u32) -> usize {
        self.lock()
            .partitions
            .get(&(group.to_ascii_lowercase(), partition))
            .map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_levels_take_over_as_event_hubs_does() {
        let r = Readers::default();
        let plain = r.join("$Default", 0, None).unwrap();
        let other_group = r.join("dashboards", 0, None).unwrap();
        let owner = r.join("$default", 0, Some(0)).unwrap();
        assert!(plain.stolen.is_cancelled(), "an owner takes the partition");
        assert!(!other_group.stolen.is_cancelled(), "only in its own group");
        assert_eq!(
            r.join("$Default", 0, None).err(),
            Some(JoinError::Owned {
                current: 0,
                asked: None
            })
        );
        let higher = r.join("$Default", 0, Some(2)).unwrap();
        assert!(owner.stolen.is_cancelled());
        assert!(matches!(
            r.join("$Default", 0, Some(1)),
            Err(JoinError::Owned { current: 2, .. })
        ));
        // An equal level takes over too.
        let same = r.join("$Default", 0, Some(2)).unwrap();
        assert!(higher.stolen.is_cancelled());
        drop((plain, owner, higher));
        assert_eq!(r.count("$Default", 0), 1);
        drop(same);
        assert_eq!(r.count("$Default", 0), 0);
        // Without an owner: five at once, the sixth refused.
        let five: Vec<_> = (0..5)
            .map(|_| r.join("$Default", 1, None).unwrap())
            .collect();
        assert_eq!(r.join("$Default", 1, None).err(), Some(JoinError::Quota));
        drop(five);
        assert!(r.join("$Default", 1, None).is_ok());
        drop(other_group);
    }
}
