//! The unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language Models
//! Trained on Code", eq. 1): with `n` samples of which `c` pass,
//!
//! ```text
//! pass@k = 1 − C(n−c, k) / C(n, k)
//! ```
//!
//! the probability that at least one of `k` samples drawn without replacement from the `n`
//! passes. Computed as in the paper's numerically stable form,
//! `1 − ∏_{i=n−c+1}^{n} (1 − k/i)`, which never forms the (huge) binomials.

use crate::EvalError;

/// pass@k for one problem with `n` samples, `c` of them correct.
///
/// `k` must be in `1..=n` and `c ≤ n`. `c = 0` gives 0; `n − c < k` (every draw of `k`
/// contains a correct sample) gives 1.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> Result<f64, EvalError> {
    if k == 0 {
        return Err(EvalError::Invalid("pass@k: k must be at least 1".into()));
    }
    if k > n {
        return Err(EvalError::Invalid(format!(
            "pass@{k} needs at least {k} samples per problem, got {n}"
        )));
    }
    if c > n {
        return Err(EvalError::Invalid(format!(
            "pass@k: {c} correct out of {n} samples is impossible"
        )));
    }
    if n - c < k {
        return Ok(1.0);
    }
    let k = k as f64;
    let mut miss = 1.0f64; // C(n−c, k) / C(n, k)
    for i in (n - c + 1)..=n {
        miss *= 1.0 - k / i as f64;
    }
    Ok(1.0 - miss)
}

/// The mean pass@k over problems, each given as `(n, c)`; an empty list is refused.
pub fn mean_pass_at_k(problems: &[(usize, usize)], k: usize) -> Result<f64, EvalError> {
    if problems.is_empty() {
        return Err(EvalError::Invalid("pass@k of no problems".into()));
    }
    let mut sum = 0.0;
    for &(n, c) in problems {
        sum += pass_at_k(n, c, k)?;
    }
    Ok(sum / problems.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// C(n, k) exactly (u128 holds C(124, 62)).
    fn binomial(n: u128, k: u128) -> u128 {
        if k > n {
            return 0;
        }
        let k = k.min(n - k);
        let mut c: u128 = 1;
        for i in 0..k {
            // c·(n−i) is divisible by (i+1): c = C(n, i), and C(n, i)·(n−i) = C(n, i+1)·(i+1).
            c = c * (n - i) / (i + 1);
        }
        c
    }

    /// The closed form from exact binomials: (C(n,k) − C(n−c,k)) / C(n,k).
    fn closed_form(n: usize, c: usize, k: usize) -> f64 {
        let total = binomial(n as u128, k as u128);
        let miss = binomial((n - c) as u128, k as u128);
        (total - miss) as f64 / total as f64
    }

    /// ln C(n, k) from a Stirling-series ln Γ, independent of the product form.
    fn ln_binomial(n: usize, k: usize) -> f64 {
        fn ln_factorial(m: usize) -> f64 {
            if m < 20 {
                return (1..=m).map(|i| (i as f64).ln()).sum();
            }
            let x = m as f64 + 1.0; // ln Γ(x)
            (x - 0.5) * x.ln() - x + 0.5 * (2.0 * std::f64::consts::PI).ln() + 1.0 / (12.0 * x)
                - 1.0 / (360.0 * x.powi(3))
                + 1.0 / (1260.0 * x.powi(5))
        }
        ln_factorial(n) - ln_factorial(k) - ln_factorial(n - k)
    }

    #[test]
    fn binomial_helper_is_right() {
        assert_eq!(binomial(5, 2), 10);
        assert_eq!(binomial(10, 0), 1);
        assert_eq!(binomial(52, 5), 2_598_960);
        assert_eq!(binomial(100, 50), 100_891_344_545_564_193_334_812_497_256);
    }

    #[test]
    fn equals_the_exact_closed_form_on_every_small_case() {
        let mut checked = 0;
        for n in 1..=120usize {
            for c in 0..=n {
                for k in 1..=n {
                    // every k for small n, a spread of k for large n
                    if n > 30 && ![1, 2, 5, 10, 20, 50, 100, n].contains(&k) {
                        continue;
                    }
                    let got = pass_at_k(n, c, k).unwrap();
                    let want = closed_form(n, c, k);
                    assert!(
                        (got - want).abs() <= 1e-12,
                        "n={n} c={c} k={k}: {got} vs {want}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 40_000, "{checked}");
    }

    #[test]
    fn equals_the_log_gamma_closed_form_for_large_n() {
        for (n, c, k) in [
            (200, 1, 1),
            (200, 3, 10),
            (200, 17, 100),
            (500, 5, 100),
            (1000, 1, 10),
            (1000, 10, 100),
            (1000, 100, 10),
            (1000, 500, 1),
        ] {
            let want = 1.0 - (ln_binomial(n - c, k) - ln_binomial(n, k)).exp();
            let got = pass_at_k(n, c, k).unwrap();
            assert!(
                (got - want).abs() < 1e-9,
                "n={n} c={c} k={k}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn edge_cases() {
        assert_eq!(pass_at_k(10, 0, 1).unwrap(), 0.0);
        assert_eq!(pass_at_k(10, 0, 10).unwrap(), 0.0);
        assert_eq!(pass_at_k(10, 10, 1).unwrap(), 1.0);
        // n − c < k: every draw contains a correct sample.
        assert_eq!(pass_at_k(10, 5, 6).unwrap(), 1.0);
        assert_eq!(pass_at_k(10, 1, 10).unwrap(), 1.0);
        // pass@1 is the fraction correct; pass@n is 1 as soon as one passes.
        assert!((pass_at_k(20, 7, 1).unwrap() - 0.35).abs() < 1e-15);
        assert_eq!(pass_at_k(1, 1, 1).unwrap(), 1.0);
        assert!(pass_at_k(5, 1, 6)
            .unwrap_err()
            .to_string()
            .contains("at least 6"));
        assert!(pass_at_k(5, 1, 0).is_err());
        assert!(pass_at_k(5, 6, 1).is_err());
        assert!(mean_pass_at_k(&[], 1).is_err());
        let mean = mean_pass_at_k(&[(10, 0), (10, 10), (10, 5)], 1).unwrap();
        assert!((mean - 0.5).abs() < 1e-15);
    }

    #[test]
    fn increases_with_k_and_with_c() {
        for n in [10, 37, 100] {
            for c in 0..=n {
                let mut last = 0.0;
                for k in 1..=n {
                    let p = pass_at_k(n, c, k).unwrap();
                    assert!(p >= last - 1e-15 && (0.0..=1.0).contains(&p));
                    last = p;
                }
            }
            for k in [1, 5, 10] {
                let mut last = 0.0;
                for c in 0..=n {
                    let p = pass_at_k(n, c, k).unwrap();
                    assert!(p >= last - 1e-15);
                    last = p;
                }
            }
        }
    }
}
