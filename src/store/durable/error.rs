//! Why a store operation failed. IO errors keep their kind, so a caller tells a full disk
//! (`StorageFull`) or a permission problem from the rest.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// fjall or the file system failed; `kind` is the IO error's kind when there is one
    /// (`StorageFull`, `PermissionDenied`, …), so a caller can tell a full disk from the rest.
    #[error("store: {message}")]
    Fjall {
        kind: Option<std::io::ErrorKind>,
        message: String,
    },
    #[error("store record {0}: {1}")]
    Corrupt(u64, String),
    #[error("store: message {0} cannot be encoded: {1}")]
    Encode(u64, String),
    #[error("the store holds {stored} of its {limit} bytes (storeLimits.maxSizeBytes)")]
    Full { stored: u64, limit: u64 },
    #[error("the store's files take {files} bytes, over their bound of {bound} (storeLimits.maxSizeBytes and room to compact); compacting")]
    Compacting { files: u64, bound: u64 },
    #[error("the store is busy: {0}")]
    Stalled(&'static str),
}

impl StoreError {
    /// A failure without an IO error beneath it.
    pub fn other(message: impl Into<String>) -> Self {
        StoreError::Fjall {
            kind: None,
            message: message.into(),
        }
    }

    /// The kind of the IO error beneath, if any.
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            StoreError::Fjall { kind, .. } => *kind,
            _ => None,
        }
    }
}

/// The kind of the first IO error in `e`'s chain of sources.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        next = e.source();
    }
    None
}

pub(super) fn fj<E: std::error::Error + 'static>(e: E) -> StoreError {
    StoreError::Fjall {
        kind: io_kind(&e),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("wrapped: {0}")]
    struct Wrapped(#[source] std::io::Error);

    #[test]
    fn store_errors_keep_the_io_error_kind() {
        let full = || std::io::Error::new(std::io::ErrorKind::StorageFull, "no space");
        assert_eq!(
            super::fj(full()).io_kind(),
            Some(std::io::ErrorKind::StorageFull)
        );
        let e = super::fj(Wrapped(full()));
        assert_eq!(e.io_kind(), Some(std::io::ErrorKind::StorageFull));
        assert_eq!(e.to_string(), "store: wrapped: no space");
        assert_eq!(super::StoreError::other("x").io_kind(), None);
    }
}
