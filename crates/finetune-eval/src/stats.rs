//! Confidence intervals for the report: the Wilson score interval of a proportion and a seeded
//! percentile bootstrap of a mean and of a paired difference of means.
//!
//! Wilson (for `k` successes out of `n`, `p = k/n`, `z` the normal quantile):
//!
//! ```text
//! centre = (p + z²/2n) / (1 + z²/n)
//! half   = z · sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)
//! [centre - half, centre + half]
//! ```
//!
//! Unlike the normal ("Wald") interval it stays inside [0, 1] and is not degenerate at 0/n
//! or n/n.
//!
//! Percentile bootstrap of the mean of `x[0..n]`: draw `B` resamples of `n` indices uniformly
//! with replacement (ChaCha8 seeded with `seed`, so the interval is a pure function of the data
//! and the seed), take the mean of each, sort the `B` means and read the 2.5% and 97.5%
//! quantiles (linear interpolation between order statistics, numpy's default). The paired
//! difference resamples *examples*: the bootstrap of the mean of `adapter[i] - base[i]`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::EvalError;

/// The 0.975 quantile of the standard normal distribution (two-sided 95%).
pub const Z_95: f64 = 1.959964;

/// Resamples drawn by the report's bootstrap intervals.
pub const BOOTSTRAP_RESAMPLES: usize = 2000;

/// Two-sided coverage of every interval in this module.
pub const LEVEL: f64 = 0.95;

/// A closed interval `[low, high]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
}

impl Interval {
    pub fn contains(&self, x: f64) -> bool {
        self.low <= x && x <= self.high
    }

    pub fn width(&self) -> f64 {
        self.high - self.low
    }
}

/// 95% Wilson score interval of `successes` out of `n` trials.
pub fn wilson(successes: usize, n: usize) -> Result<Interval, EvalError> {
    wilson_z(successes, n, Z_95)
}

/// Wilson score interval with normal quantile `z`.
pub fn wilson_z(successes: usize, n: usize, z: f64) -> Result<Interval, EvalError> {
    if n == 0 {
        return Err(EvalError::Invalid(
            "Wilson interval of 0 trials: there is nothing to estimate".into(),
        ));
    }
    if successes > n {
        return Err(EvalError::Invalid(format!(
            "Wilson interval: {successes} successes out of {n} trials"
        )));
    }
    let n_f = n as f64;
    let p = successes as f64 / n_f;
    let z2 = z * z;
    let denom = 1.0 + z2 / n_f;
    let centre = (p + z2 / (2.0 * n_f)) / denom;
    let half = z * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt() / denom;
    // Exact at the ends (0/n has low = 0, n/n has high = 1); clamp away the rounding.
    Ok(Interval {
        low: (centre - half).max(0.0),
        high: (centre + half).min(1.0),
    })
}

/// Arithmetic mean; `None` for an empty slice.
pub fn mean(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        None
    } else {
        Some(xs.iter().sum::<f64>() / xs.len() as f64)
    }
}

/// 95% percentile-bootstrap interval of the mean of `xs` (`resamples` resamples, ChaCha8
/// seeded with `seed`).
pub fn bootstrap_mean(xs: &[f64], resamples: usize, seed: u64) -> Result<Interval, EvalError> {
    check_sample(xs, "bootstrap of the mean")?;
    if resamples == 0 {
        return Err(EvalError::Invalid(
            "bootstrap with 0 resamples: use at least 1 (the report uses 2000)".into(),
        ));
    }
    let n = xs.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| {
            let sum: f64 = (0..n).map(|_| xs[rng.random_range(0..n)]).sum();
            sum / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let tail = (1.0 - LEVEL) / 2.0;
    Ok(Interval {
        low: quantile_sorted(&means, tail),
        high: quantile_sorted(&means, 1.0 - tail),
    })
}

/// 95% percentile-bootstrap interval of `mean(adapter) - mean(base)` where `base[i]` and
/// `adapter[i]` are measured on the same example `i` (examples are resampled, pairs kept).
pub fn bootstrap_paired_diff(
    base: &[f64],
    adapter: &[f64],
    resamples: usize,
    seed: u64,
) -> Result<Interval, EvalError> {
    if base.len() != adapter.len() {
        return Err(EvalError::Invalid(format!(
            "paired bootstrap: {} base values and {} adapter values (each example needs both)",
            base.len(),
            adapter.len()
        )));
    }
    check_sample(base, "paired bootstrap (base)")?;
    check_sample(adapter, "paired bootstrap (adapter)")?;
    let diffs: Vec<f64> = adapter.iter().zip(base).map(|(a, b)| a - b).collect();
    bootstrap_mean(&diffs, resamples, seed)
}

fn check_sample(xs: &[f64], what: &str) -> Result<(), EvalError> {
    if xs.is_empty() {
        return Err(EvalError::Invalid(format!("{what}: no values")));
    }
    if let Some(i) = xs.iter().position(|x| !x.is_finite()) {
        return Err(EvalError::Invalid(format!(
            "{what}: value {i} is {} (expected a finite number)",
            xs[i]
        )));
    }
    Ok(())
}

/// Quantile `q` of ascending `sorted` values, linear interpolation between the order
/// statistics at `q·(len-1)` (numpy's default "linear" method).
fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    /// Reference values: the closed form evaluated independently (Python, 6 decimals); 8/10 is
    /// the example of the issue, [0.4902, 0.9433].
    #[test]
    fn wilson_matches_known_values() {
        let cases = [
            (8, 10, 0.490162, 0.943318),
            (0, 10, 0.0, 0.277533),
            (10, 10, 0.722467, 1.0),
            (50, 100, 0.403832, 0.596168),
            (1, 1, 0.206549, 1.0),
            (3, 20, 0.052369, 0.360419),
        ];
        for (k, n, lo, hi) in cases {
            let i = wilson(k, n).unwrap();
            assert!(
                close(i.low, lo, 1e-6) && close(i.high, hi, 1e-6),
                "{k}/{n}: got [{:.5}, {:.5}], expected [{lo}, {hi}]",
                i.low,
                i.high
            );
        }
    }

    #[test]
    fn wilson_is_symmetric_and_refuses_bad_counts() {
        let a = wilson(3, 17).unwrap();
        let b = wilson(14, 17).unwrap();
        assert!(close(a.low, 1.0 - b.high, 1e-12) && close(a.high, 1.0 - b.low, 1e-12));
        assert!(wilson(0, 0).is_err());
        assert!(wilson(11, 10).is_err());
    }

    fn sample(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f64>()).collect()
    }

    #[test]
    fn bootstrap_is_a_function_of_data_and_seed() {
        let xs = sample(40, 1);
        let a = bootstrap_mean(&xs, BOOTSTRAP_RESAMPLES, 7).unwrap();
        let b = bootstrap_mean(&xs, BOOTSTRAP_RESAMPLES, 7).unwrap();
        let c = bootstrap_mean(&xs, BOOTSTRAP_RESAMPLES, 8).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Another seed moves the ends by Monte Carlo noise only.
        assert!(close(a.low, c.low, 0.02) && close(a.high, c.high, 0.02));
    }

    #[test]
    fn bootstrap_is_centred_and_as_wide_as_the_normal_interval() {
        let xs = sample(200, 2);
        let m = mean(&xs).unwrap();
        let sd = (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64).sqrt();
        let se = sd / (xs.len() as f64).sqrt();
        let i = bootstrap_mean(&xs, BOOTSTRAP_RESAMPLES, 3).unwrap();
        assert!(i.contains(m));
        // The mean of 200 uniforms is close to normal: the percentile interval is close to
        // m ± 1.96·se (the bootstrap's se is the plug-in one, √((n-1)/n) smaller).
        assert!(close((i.low + i.high) / 2.0, m, 0.1 * se), "{i:?} vs {m}");
        let ratio = i.width() / (2.0 * Z_95 * se);
        assert!((0.9..1.08).contains(&ratio), "width ratio {ratio}");
    }

    #[test]
    fn bootstrap_of_a_constant_is_that_constant() {
        let i = bootstrap_mean(&[0.25; 13], 100, 0).unwrap();
        assert_eq!(
            i,
            Interval {
                low: 0.25,
                high: 0.25
            }
        );
        let d = bootstrap_paired_diff(&[1.0, 2.0, 3.0], &[1.5, 2.5, 3.5], 100, 0).unwrap();
        assert!(close(d.low, 0.5, 1e-12) && close(d.high, 0.5, 1e-12));
    }

    /// Over many data sets drawn from a known distribution, about 95% of the intervals
    /// contain the true mean.
    #[test]
    fn bootstrap_covers_the_true_mean_about_95_percent_of_the_time() {
        let trials = 300;
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut covered = 0;
        for t in 0..trials {
            // Bernoulli(0.3), n = 60: a pass rate.
            let xs: Vec<f64> = (0..60)
                .map(|_| if rng.random::<f64>() < 0.3 { 1.0 } else { 0.0 })
                .collect();
            if bootstrap_mean(&xs, 500, t).unwrap().contains(0.3) {
                covered += 1;
            }
        }
        let rate = covered as f64 / trials as f64;
        // Binomial(300, 0.95) has sd 1.3%; the percentile bootstrap runs slightly below 95%.
        assert!((0.89..=0.99).contains(&rate), "coverage {rate}");
    }

    #[test]
    fn paired_difference_is_antisymmetric_and_tighter_than_unpaired() {
        let base = sample(80, 4);
        let noise = sample(80, 5);
        let adapter: Vec<f64> = base
            .iter()
            .zip(&noise)
            .map(|(b, e)| b + 0.1 + 0.05 * (e - 0.5))
            .collect();
        let d = bootstrap_paired_diff(&base, &adapter, BOOTSTRAP_RESAMPLES, 9).unwrap();
        let r = bootstrap_paired_diff(&adapter, &base, BOOTSTRAP_RESAMPLES, 9).unwrap();
        // Same seed, same resampled indices: the reversed difference is the mirror image.
        assert!(close(d.low, -r.high, 1e-12) && close(d.high, -r.low, 1e-12));
        let true_diff = mean(&adapter).unwrap() - mean(&base).unwrap();
        assert!(d.contains(true_diff) && d.low > 0.0, "{d:?}");
        // Pairing removes the per-example variance (sd ≈ 0.29) and keeps the noise (≈ 0.014).
        let a = bootstrap_mean(&adapter, BOOTSTRAP_RESAMPLES, 9).unwrap();
        assert!(d.width() < a.width() / 5.0, "{d:?} vs {a:?}");
    }

    #[test]
    fn bootstrap_refuses_bad_input() {
        assert!(bootstrap_mean(&[], 10, 0).is_err());
        assert!(bootstrap_mean(&[1.0], 0, 0).is_err());
        assert!(bootstrap_mean(&[1.0, f64::NAN], 10, 0).is_err());
        let e = bootstrap_paired_diff(&[1.0, 2.0], &[1.0], 10, 0).unwrap_err();
        assert!(e.to_string().contains("2 base values and 1 adapter"), "{e}");
    }

    #[test]
    fn quantile_interpolates_like_numpy() {
        let s = [1.0, 2.0, 3.0, 4.0];
        // numpy.quantile([1,2,3,4], [0.025, 0.5, 0.975]) = [1.075, 2.5, 3.925]
        assert!(close(quantile_sorted(&s, 0.025), 1.075, 1e-12));
        assert!(close(quantile_sorted(&s, 0.5), 2.5, 1e-12));
        assert!(close(quantile_sorted(&s, 0.975), 3.925, 1e-12));
    }
}
