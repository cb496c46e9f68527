//! Evaluation of the base model and base + adapter on the same suites.
//!
//! Generates with the built-in sampler or any OpenAI-compatible endpoint ([`generate`]), runs
//! generated code in a sandbox (own process group, rlimits, temporary directory, no network
//! where possible), scores held-out repository edits, PR replays, HumanEval and user suites
//! (pass@k, apply rate, held-out loss) and writes the comparison report (`report.md`,
//! `report.json`, `report.svg`).

pub mod edits;
pub mod endpoint;
pub mod generate;
pub mod heldout;
pub mod humaneval;
pub mod passk;
pub mod pr_replay;
pub mod report;
pub mod sampler;
pub mod sandbox;
pub mod stats;
pub mod suite;
#[cfg(any(test, feature = "test-server"))]
pub mod testing;
pub mod user_suite;

pub use generate::{cut_at_stop, GenerationParams, Generator};
pub use sampler::ModelGenerator;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{}: {message}", path.display())]
    Io { path: PathBuf, message: String },
    #[error("generation failed: {0}")]
    Generation(String),
    #[error("endpoint {url}: {message}")]
    Endpoint { url: String, message: String },
    #[error("sandbox: {0}")]
    Sandbox(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
