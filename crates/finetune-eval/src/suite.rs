//! Running a code suite: generate `samples` completions per problem, run each completed program
//! in the [sandbox](crate::sandbox), count the passes and estimate pass@k. HumanEval
//! ([`crate::humaneval`]) and user suites ([`crate::user_suite`]) are both this.

use crate::passk::mean_pass_at_k;
use crate::sandbox::{run_sandboxed, IsolationReport, SandboxLimits, SandboxStatus};
use crate::{cut_at_stop, EvalError, GenerationParams, Generator};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// The stop sequences HumanEval completions are cut at (as in the Codex paper and
/// bigcode-evaluation-harness): the end of the function body.
pub const PYTHON_STOP: [&str; 5] = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"];

/// Languages a suite problem may be written in, and how its program is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    Bash,
    Sh,
    JavaScript,
    Ruby,
    Perl,
}

impl Language {
    /// The names accepted in a suite file.
    pub const NAMES: &'static str = "python, bash, sh, javascript, ruby, perl";

    pub fn parse(name: &str) -> Option<Language> {
        Some(match name {
            "python" | "python3" | "py" => Language::Python,
            "bash" => Language::Bash,
            "sh" => Language::Sh,
            "javascript" | "js" | "node" => Language::JavaScript,
            "ruby" | "rb" => Language::Ruby,
            "perl" | "pl" => Language::Perl,
            _ => return None,
        })
    }

    /// (interpreter, file name of the program)
    pub fn command(self) -> (&'static str, &'static str) {
        match self {
            Language::Python => ("python3", "main.py"),
            Language::Bash => ("bash", "main.sh"),
            Language::Sh => ("sh", "main.sh"),
            Language::JavaScript => ("node", "main.js"),
            Language::Ruby => ("ruby", "main.rb"),
            Language::Perl => ("perl", "main.pl"),
        }
    }

    /// Where a completion of a function body ends, unless a problem says otherwise.
    pub fn default_stop(self) -> Vec<String> {
        match self {
            Language::Python => PYTHON_STOP.iter().map(|s| s.to_string()).collect(),
            _ => Vec::new(),
        }
    }
}

/// One problem of a code suite: the program run is `prompt + completion + suffix`.
#[derive(Debug, Clone, PartialEq)]
pub struct CodeProblem {
    pub id: String,
    pub prompt: String,
    /// What follows the completion (the tests, and e.g. `check(entry_point)`).
    pub suffix: String,
    pub language: Language,
    /// Stop sequences for this problem (added to those of the generation parameters).
    pub stop: Vec<String>,
}

impl CodeProblem {
    pub fn program(&self, completion: &str) -> String {
        format!("{}{}{}", self.prompt, completion, self.suffix)
    }
}

/// One sample of one problem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleResult {
    pub completion: String,
    #[serde(flatten)]
    pub status: SandboxStatus,
    pub wall_secs: f64,
    /// The end of stderr (at most 2,000 bytes) of a failed run.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub stderr_tail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProblemResult {
    pub id: String,
    /// Samples run.
    pub n: usize,
    /// Samples that passed.
    pub passed: usize,
    pub samples: Vec<SampleResult>,
}

/// The result of a suite for one generator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteResult {
    /// `humaneval` or the suite file.
    pub suite: String,
    /// [`Generator::describe`] of what generated the completions.
    pub generator: String,
    /// Samples per problem.
    pub samples: usize,
    pub problems: Vec<ProblemResult>,
    /// Mean pass@1 over the problems.
    pub pass_at_1: f64,
    /// Mean pass@10, when there are at least 10 samples per problem.
    pub pass_at_10: Option<f64>,
    /// Mean pass@100, when there are at least 100 samples per problem.
    pub pass_at_100: Option<f64>,
    /// What the sandbox guaranteed (the same for every run of the suite).
    pub isolation: Option<IsolationReport>,
    /// Seconds spent generating and running.
    pub generation_secs: f64,
    pub execution_secs: f64,
}

impl SuiteResult {
    /// Problems with at least one passing sample.
    pub fn solved(&self) -> usize {
        self.problems.iter().filter(|p| p.passed > 0).count()
    }
}

/// Generates `samples` completions of every problem with `gen` (sample `i` with seed
/// `params.seed + i`), runs them in the sandbox and scores them.
///
/// A failed generation is an error (naming the problem and sample), not a failed sample: a
/// flaky endpoint must not pass for a worse model.
pub fn run_code_suite(
    suite: &str,
    problems: &[CodeProblem],
    gen: &dyn Generator,
    params: &GenerationParams,
    samples: usize,
    limits: &SandboxLimits,
) -> Result<SuiteResult, EvalError> {
    if samples == 0 {
        return Err(EvalError::Invalid("samples must be at least 1".into()));
    }
    if problems.is_empty() {
        return Err(EvalError::Invalid(format!("{suite}: no problems")));
    }

    // Problems grouped by their stop sequences, so each group is one generate_all call.
    let mut groups: Vec<(Vec<String>, Vec<usize>)> = Vec::new();
    for (i, p) in problems.iter().enumerate() {
        let mut stop = params.stop.clone();
        for s in &p.stop {
            if !stop.contains(s) {
                stop.push(s.clone());
            }
        }
        match groups.iter_mut().find(|(s, _)| *s == stop) {
            Some((_, members)) => members.push(i),
            None => groups.push((stop, vec![i])),
        }
    }

    let t = Instant::now();
    // completions[problem][sample]
    let mut completions: Vec<Vec<String>> = vec![Vec::with_capacity(samples); problems.len()];
    for sample in 0..samples {
        for (stop, members) in &groups {
            let p = GenerationParams {
                seed: params.seed.wrapping_add(sample as u64),
                stop: stop.clone(),
                ..params.clone()
            };
            let prompts: Vec<String> = members
                .iter()
                .map(|&i| problems[i].prompt.clone())
                .collect();
            let out = gen.generate_all(&prompts, &p);
            if out.len() != prompts.len() {
                return Err(EvalError::Generation(format!(
                    "{}: {} completions for {} prompts",
                    gen.describe(),
                    out.len(),
                    prompts.len()
                )));
            }
            for (&i, c) in members.iter().zip(out) {
                let c = c.map_err(|e| {
                    EvalError::Generation(format!("{} sample {sample}: {e}", problems[i].id))
                })?;
                // Endpoints may honour only some stop sequences (OpenAI's API takes four).
                completions[i].push(cut_at_stop(&c, stop).to_string());
            }
        }
    }
    let generation_secs = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let jobs: Vec<(usize, usize)> = (0..problems.len())
        .flat_map(|p| (0..samples).map(move |s| (p, s)))
        .collect();
    let results: Vec<Mutex<Option<SampleResult>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
    let isolation: Mutex<Option<IsolationReport>> = Mutex::new(None);
    let first_error: Mutex<Option<EvalError>> = Mutex::new(None);
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(jobs.len());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                if j >= jobs.len() || lock(&first_error).is_some() {
                    return;
                }
                let (pi, si) = jobs[j];
                let problem = &problems[pi];
                let completion = &completions[pi][si];
                let (program, file) = problem.language.command();
                let source = problem.program(completion);
                match run_sandboxed(program, &[file], &[(file, source.as_bytes())], limits) {
                    Ok(outcome) => {
                        lock(&isolation).get_or_insert_with(|| outcome.isolation.clone());
                        let stderr_tail = if outcome.status.passed() {
                            String::new()
                        } else {
                            tail(&outcome.stderr, 2000)
                        };
                        *lock(&results[j]) = Some(SampleResult {
                            completion: completion.clone(),
                            status: outcome.status,
                            wall_secs: outcome.wall_secs,
                            stderr_tail,
                        });
                    }
                    Err(e) => {
                        lock(&first_error).get_or_insert(EvalError::Sandbox(format!(
                            "{} ({}): {e}",
                            problem.id, program
                        )));
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    let execution_secs = t.elapsed().as_secs_f64();

    let mut results = results
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()));
    let mut out = Vec::with_capacity(problems.len());
    for p in problems {
        let samples: Vec<SampleResult> = results
            .by_ref()
            .take(samples)
            .map(|r| r.ok_or_else(|| EvalError::Sandbox(format!("{}: a sample was not run", p.id))))
            .collect::<Result<_, _>>()?;
        out.push(ProblemResult {
            id: p.id.clone(),
            n: samples.len(),
            passed: samples.iter().filter(|s| s.status.passed()).count(),
            samples,
        });
    }
    let counts: Vec<(usize, usize)> = out.iter().map(|p| (p.n, p.passed)).collect();
    let at = |k: usize| {
        (samples >= k)
            .then(|| mean_pass_at_k(&counts, k))
            .transpose()
    };
    Ok(SuiteResult {
        suite: suite.to_string(),
        generator: gen.describe(),
        samples,
        pass_at_1: mean_pass_at_k(&counts, 1)?,
        pass_at_10: at(10)?,
        pass_at_100: at(100)?,
        problems: out,
        isolation: isolation.into_inner().unwrap_or_else(|e| e.into_inner()),
        generation_secs,
        execution_secs,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The last `max` bytes of `s` (at a character boundary).
fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}
