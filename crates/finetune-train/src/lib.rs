//! The LoRA training loop.
//!
//! One step reads top to bottom: next micro-batch, forward, loss, backward (on a thread with a
//! large stack), gradient accumulation, global-norm clipping, AdamW on f32 master weights and
//! moments, learning-rate schedule, metrics, checkpoint. Checkpoints are atomic (temp dir +
//! rename) and resume bit-identically. The `parallel` module (to come) holds the collectives
//! (NCCL and an in-process CPU backend) and the expert/tensor/data parallel layouts.
//!
//! Not implemented yet: this crate is the trainer issue's work.
