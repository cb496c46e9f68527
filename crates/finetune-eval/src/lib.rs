//! Evaluation of the base model and base + adapter on the same suites.
//!
//! Generates with the built-in sampler or any OpenAI-compatible endpoint, runs generated code
//! in a sandbox (own process group, rlimits, temporary directory, no network where possible),
//! scores held-out repository edits, PR replays, HumanEval and user suites (pass@k, apply rate,
//! held-out loss) and writes the comparison report (`report.md`, `report.json`, `report.svg`).
//!
//! Not implemented yet: this crate is the eval issue's work.
