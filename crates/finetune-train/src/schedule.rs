//! Learning-rate schedules, as transformers' `get_*_schedule_with_warmup` define them.
//!
//! At optimizer step s (0-based) with peak lr, `warmup` and `total` steps:
//! - warmup (s < warmup): lr · s / max(1, warmup);
//! - cosine: lr · max(0, ½(1 + cos(π · p))), p = (s − warmup) / max(1, total − warmup);
//! - linear: lr · max(0, (total − s) / max(1, total − warmup));
//! - constant: lr.

/// Decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LrSchedule {
    Cosine,
    Linear,
    Constant,
}

/// The learning rate of optimizer step `step` (0-based).
pub fn lr_at(schedule: LrSchedule, peak: f64, warmup: u64, total: u64, step: u64) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let after = (total.saturating_sub(warmup)).max(1) as f64;
    match schedule {
        LrSchedule::Constant => peak,
        LrSchedule::Linear => peak * ((total as f64 - step as f64) / after).max(0.0),
        LrSchedule::Cosine => {
            let progress = (step - warmup) as f64 / after;
            peak * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    }
}
