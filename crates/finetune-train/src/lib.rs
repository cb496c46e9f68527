//! The LoRA training loop.
//!
//! One step reads top to bottom ([`trainer::Trainer::run`]): next sequences, forward, loss,
//! backward (on a thread with a large stack, [`on_large_stack`]), gradient accumulation,
//! global-norm clipping, AdamW on f32 master weights and moments ([`adamw`]), learning-rate
//! schedule ([`schedule`]), metrics, held-out loss, checkpoint. Checkpoints are atomic (temp
//! dir + rename) and resume bit-identically ([`checkpoint`]). The [`parallel`] module holds the
//! collectives (in-process CPU threads, NCCL) and the expert/tensor/data parallel layouts.

pub mod adamw;
pub mod checkpoint;
pub mod parallel;
pub mod plan;
pub mod schedule;
pub mod trainer;

pub use adamw::{clip_grad_norm, AdamW, AdamWConfig};
pub use schedule::{lr_at, LrSchedule};
pub use trainer::{
    differing_keys, on_large_stack, peak_rss_mib, steps_for_epochs, RunOutput, StepMetrics,
    TrainOptions, TrainSummary, Trainer,
};

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(
        "the training set is empty: no pair survived mining, tokenizing and the length policy"
    )]
    EmptyDataset,
    #[error("{0}")]
    Options(String),
    #[error("{steps} steps in a row had a non-finite loss or gradient norm (last: step {step}); stopping (lower the learning rate, or check the data)")]
    NonFinite { steps: u64, step: u64 },
    #[error("{}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Io { path: PathBuf, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Collective(#[from] parallel::CollectiveError),
    #[error(transparent)]
    Layout(#[from] parallel::LayoutError),
}

impl TrainError {
    pub(crate) fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        TrainError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}
