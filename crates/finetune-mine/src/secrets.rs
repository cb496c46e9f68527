//! Credentials never reach a pair: values that look like secrets are replaced by `<SECRET>`.
//!
//! Patterns: AWS access key ids, GitHub / GitLab / Slack tokens, PEM private key blocks,
//! JWTs, and `key|secret|token|password = "value"` assignments whose value is high-entropy
//! (Shannon entropy ≥ 3.0 bits per character over ≥ 8 characters), so that
//! `password = "changeme"`-style fixtures stay readable but real keys do not survive.

use regex::Regex;
use std::sync::LazyLock;

pub const PLACEHOLDER: &str = "<SECRET>";

static TOKENS: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    [
        // PEM private keys, whole block.
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z0-9 ]*PRIVATE KEY-----",
        // AWS access key ids.
        r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b",
        // GitHub classic and fine-grained tokens.
        r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b",
        r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b",
        // GitLab personal / project / pipeline tokens.
        r"\bgl(?:pat|ptt|dt|rt|cbt|soat)-[A-Za-z0-9_\-]{20,}",
        // Slack tokens and webhooks.
        r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
        r"https://hooks\.slack\.com/services/[A-Za-z0-9/]{20,}",
        // JSON Web Tokens.
        r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
    ]
    .iter()
    .map(|p| Regex::new(p).expect("secret pattern compiles"))
    .collect()
});

static ASSIGNMENT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#"(?i)([A-Za-z0-9_.\-]*(?:key|secret|token|passw(?:or)?d|pwd|credential)[A-Za-z0-9_.\-]*["']?\s*(?::=|=>|=|:)\s*)(["'`])([^"'`\s]{8,})(["'`])"#,
    )
    .expect("assignment pattern compiles")
});

/// Shannon entropy in bits per character.
fn entropy(s: &str) -> f64 {
    let mut counts = std::collections::HashMap::new();
    let mut n = 0usize;
    for c in s.chars() {
        *counts.entry(c).or_insert(0usize) += 1;
        n += 1;
    }
    counts
        .values()
        .map(|&k| {
            let p = k as f64 / n as f64;
            -p * p.log2()
        })
        .sum()
}

/// Replaces every secret in `text`; returns the new text and how many were replaced.
pub fn redact(text: &str) -> (String, usize) {
    let mut count = 0;
    let mut out = text.to_string();
    for re in TOKENS.iter() {
        if re.is_match(&out) {
            let n = re.find_iter(&out).count();
            count += n;
            out = re.replace_all(&out, PLACEHOLDER).into_owned();
        }
    }
    if ASSIGNMENT.is_match(&out) {
        let mut n = 0;
        let replaced = ASSIGNMENT.replace_all(&out, |c: &regex::Captures| {
            let value = &c[3];
            if value != PLACEHOLDER && entropy(value) >= 3.0 {
                n += 1;
                format!("{}{}{PLACEHOLDER}{}", &c[1], &c[2], &c[4])
            } else {
                c[0].to_string()
            }
        });
        if n > 0 {
            count += n;
            out = replaced.into_owned();
        }
    }
    (out, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planted_secrets_are_replaced() {
        let cases = [
            "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
            "token: ghp_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ",
            "GITLAB=glpat-abcdefghij1234567890",
            "slack xoxb-1234567890-abcdefghij",
            "auth = eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nabc\n-----END RSA PRIVATE KEY-----",
            r#"API_KEY = "q8Zr2LmX9vTn4Kp7Wd""#,
            r#"let password = "T0p$ecret-9x!Qa";"#,
        ];
        for c in cases {
            let (out, n) = redact(c);
            assert_eq!(n, 1, "{c} -> {out}");
            assert!(out.contains(PLACEHOLDER), "{c} -> {out}");
            assert!(!out.contains("EXAMPLE") && !out.contains("MIIE"), "{out}");
        }
    }

    #[test]
    fn ordinary_code_is_left_alone() {
        for c in [
            r#"password = "changeme""#,
            r#"let key = "aaaaaaaaaaaa";"#,
            "fn token_count(s: &str) -> usize { s.len() }",
            "const SECRET_LEN: usize = 32;",
            "the key insight is 8 characters long",
        ] {
            assert_eq!(redact(c), (c.to_string(), 0), "{c}");
        }
    }

    #[test]
    fn redaction_is_idempotent() {
        let (once, _) = redact("k = ghp_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ");
        assert_eq!(redact(&once), (once.clone(), 0));
    }
}
