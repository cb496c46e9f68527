//! The LoRA training loop.
//!
//! One step reads top to bottom: next micro-batch, forward, loss, backward (on a thread with a
//! large stack), gradient accumulation, global-norm clipping, AdamW on f32 master weights and
//! moments, learning-rate schedule, metrics, checkpoint. Checkpoints are atomic (temp dir +
//! rename) and resume bit-identically. The `parallel` module (to come) holds the collectives
//! (NCCL and an in-process CPU backend) and the expert/tensor/data parallel layouts.
//!
//! Here so far: the learning-rate schedules ([`schedule`]) and the optimizer step with
//! global-norm clipping ([`adamw`]), both checked against PyTorch + transformers. The loop,
//! checkpoints and resume are the trainer issue's remaining work.

pub mod adamw;
pub mod schedule;

pub use adamw::{clip_grad_norm, AdamW, AdamWConfig};
pub use schedule::{lr_at, LrSchedule};
