//! `saved`: the bytes that the hand-written nodes ([`crate::moe_experts`],
//! [`crate::attention_block`]) keep inside their op for the backward. A walk of candle's graph
//! (`finetune bench train --profile`'s graph-retained count) sees every tensor an op takes as
//! input but nothing an op holds privately, so it would understate exactly the paths that
//! exist to hold less; this process-wide count fills that gap. A node's saved activations are
//! counted from the moment it keeps them until they are dropped (taken by its backward, or the
//! graph dropped without one). Not counted: the attention op's row logsumexps (T·H f32, 0.5 MiB
//! per layer at 4,096 tokens × 32 heads).

use candle_core::Tensor;
use std::sync::atomic::{AtomicUsize, Ordering};

static HELD: AtomicUsize = AtomicUsize::new(0);

/// Bytes held right now by the saved activations of live hand-written nodes, all threads.
pub fn held_bytes() -> usize {
    HELD.load(Ordering::Relaxed)
}

/// Counts the bytes of some tensors in [`held_bytes`] until dropped.
pub(crate) struct SavedBytes(usize);

impl SavedBytes {
    /// Element count × element size of each tensor (the saved tensors are each their own
    /// storage: the nodes make them, none is a view of another).
    pub(crate) fn of<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> Self {
        let bytes = tensors
            .into_iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        HELD.fetch_add(bytes, Ordering::Relaxed);
        Self(bytes)
    }
}

impl Drop for SavedBytes {
    fn drop(&mut self) {
        HELD.fetch_sub(self.0, Ordering::Relaxed);
    }
}
