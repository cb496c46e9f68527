//! User suites: your own code problems in a JSONL file, one object per line.
//!
//! ```text
//! {"id": "add", "language": "python", "prompt": "def add(a, b):\n", "test": "assert add(2, 3) == 5\n"}
//! {"id": "greet", "language": "bash", "prompt": "greet() {\n", "test": "[ \"$(greet Ann)\" = 'Hello, Ann' ]\n", "stop": ["\nexit"]}
//! {"id": "he-style", "language": "python", "prompt": "def inc(x):\n", "test": "def check(f):\n    assert f(1) == 2\n", "entry_point": "inc"}
//! ```
//!
//! | field | |
//! |---|---|
//! | `id` | required, unique in the file |
//! | `prompt` | required: what the model completes |
//! | `test` | required: code run after the completion; the problem passes when the program exits with status 0 |
//! | `language` | required: `python` (run with `python3`), `bash`, `sh`, `javascript` (`node`), `ruby`, `perl` |
//! | `entry_point` | optional: HumanEval style — `check(<entry_point>)` is appended to the program |
//! | `stop` | optional: stop sequences for this problem; default for `python` the HumanEval ones (`\ndef `, `\nclass `, `\nif __name__`, `\nprint(`, `\n#`), none for the others |
//!
//! The program is `prompt + completion + "\n" + test` (then `"\ncheck(" + entry_point + ")\n"`
//! if given), written to a file in the sandbox's working directory and run with the language's
//! interpreter, within the [sandbox](crate::sandbox) limits. Blank lines and lines starting
//! with `//` are skipped. Unknown fields are errors (so a misspelt `entry_point` is not silently
//! ignored); every error names `file:line`.

use crate::sandbox::SandboxLimits;
use crate::suite::{run_code_suite, CodeProblem, Language, SuiteResult};
use crate::{EvalError, GenerationParams, Generator};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    id: String,
    prompt: String,
    test: String,
    language: String,
    #[serde(default)]
    entry_point: Option<String>,
    #[serde(default)]
    stop: Option<Vec<String>>,
}

/// The problems of a user suite file.
pub fn load_user_suite(path: &Path) -> Result<Vec<CodeProblem>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let at =
        |line: usize, msg: String| EvalError::Invalid(format!("{}:{line}: {msg}", path.display()));
    let mut problems: Vec<CodeProblem> = Vec::new();
    let mut first_line: std::collections::HashMap<String, usize> = Default::default();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with("//") {
            continue;
        }
        let line: Line = serde_json::from_str(trimmed).map_err(|e| {
            at(
                n,
                format!(
                    "expected {{\"id\", \"prompt\", \"test\", \"language\", optional \
                     \"entry_point\", \"stop\"}}: {e}"
                ),
            )
        })?;
        if line.id.trim().is_empty() {
            return Err(at(n, "empty id".into()));
        }
        if let Some(prev) = first_line.insert(line.id.clone(), n) {
            return Err(at(
                n,
                format!("id {:?} is already used on line {prev}", line.id),
            ));
        }
        let language = Language::parse(&line.language).ok_or_else(|| {
            at(
                n,
                format!(
                    "language {:?}: expected one of {}",
                    line.language,
                    Language::NAMES
                ),
            )
        })?;
        if let Some(e) = &line.entry_point {
            if language != Language::Python {
                return Err(at(
                    n,
                    "entry_point is for python problems (check(entry_point))".into(),
                ));
            }
            let ident = e
                .chars()
                .next()
                .is_some_and(|c| c.is_alphabetic() || c == '_')
                && e.chars().all(|c| c.is_alphanumeric() || c == '_');
            if !ident {
                return Err(at(
                    n,
                    format!("entry_point {e:?} is not a Python identifier"),
                ));
            }
        }
        let mut suffix = format!("\n{}", line.test);
        if let Some(e) = &line.entry_point {
            suffix.push_str(&format!("\ncheck({e})\n"));
        }
        problems.push(CodeProblem {
            id: line.id,
            prompt: line.prompt,
            suffix,
            language,
            stop: line.stop.unwrap_or_else(|| language.default_stop()),
        });
    }
    if problems.is_empty() {
        return Err(EvalError::Invalid(format!(
            "{}: no problems",
            path.display()
        )));
    }
    Ok(problems)
}

/// Runs the user suite in `path` with `samples` completions per problem from `gen`.
pub fn run_user_suite(
    path: &Path,
    gen: &dyn Generator,
    params: &GenerationParams,
    samples: usize,
    limits: &SandboxLimits,
) -> Result<SuiteResult, EvalError> {
    let problems = load_user_suite(path)?;
    run_code_suite(
        &path.display().to_string(),
        &problems,
        gen,
        params,
        samples,
        limits,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::SandboxStatus;
    use std::collections::HashMap;

    /// Completes each prompt from a table; prompts not in it get `default`.
    struct Table(HashMap<&'static str, &'static str>);

    impl Generator for Table {
        fn describe(&self) -> String {
            "table".into()
        }
        fn generate(&self, prompt: &str, _params: &GenerationParams) -> Result<String, EvalError> {
            Ok(self.0.get(prompt).copied().unwrap_or("").to_string())
        }
    }

    fn write(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
        let path = dir.path().join("suite.jsonl");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_suite_in_python_and_bash_passes_and_fails_as_its_tests_say() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            r#"// my suite
{"id": "add", "language": "python", "prompt": "def add(a, b):\n", "test": "assert add(2, 3) == 5\n"}
{"id": "sub", "language": "python", "prompt": "def sub(a, b):\n", "test": "assert sub(5, 3) == 2\n"}

{"id": "greet", "language": "bash", "prompt": "greet() {\n", "test": "[ \"$(greet Ann)\" = 'Hello, Ann' ] || exit 1\n", "stop": ["\nexit"]}
{"id": "inc", "language": "python", "prompt": "def inc(x):\n", "test": "def check(f):\n    assert f(1) == 2\n", "entry_point": "inc"}
"#,
        );
        let gen = Table(HashMap::from([
            (
                "def add(a, b):\n",
                "    return a + b\n\ndef unrelated():\n    pass\n",
            ),
            ("def sub(a, b):\n", "    return b - a\n"),
            ("greet() {\n", "  echo \"Hello, $1\"\n}\nexit 0\n"),
            ("def inc(x):\n", "    return x + 1"),
        ]));
        let r = run_user_suite(
            &path,
            &gen,
            &GenerationParams::default(),
            2,
            &SandboxLimits::default(),
        )
        .unwrap();
        let got: Vec<(&str, usize, usize)> = r
            .problems
            .iter()
            .map(|p| (p.id.as_str(), p.n, p.passed))
            .collect();
        assert_eq!(
            got,
            [("add", 2, 2), ("sub", 2, 0), ("greet", 2, 2), ("inc", 2, 2)],
            "{:#?}",
            r.problems
        );
        assert!((r.pass_at_1 - 0.75).abs() < 1e-12);
        assert_eq!(r.pass_at_10, None);
        // The python stop sequences cut the extra function, the problem's own stop the `exit 0`
        // that would have skipped the test.
        assert!(!r.problems[0].samples[0].completion.contains("unrelated"));
        assert_eq!(
            r.problems[2].samples[0].completion,
            "  echo \"Hello, $1\"\n}"
        );
        assert!(matches!(
            r.problems[1].samples[0].status,
            SandboxStatus::Failed { code: 1 }
        ));
        assert!(r.problems[1].samples[0]
            .stderr_tail
            .contains("AssertionError"));
    }

    #[test]
    fn bad_lines_are_named_by_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let ok = r#"{"id": "a", "language": "python", "prompt": "p", "test": "t"}"#;
        for (text, want) in [
            (format!("{ok}\nnot json\n"), ":2: expected {\"id\""),
            (format!("{ok}\n{{\"id\": \"b\", \"language\": \"python\", \"prompt\": \"p\"}}\n"), ":2: expected"),
            (format!("\n\n{ok}\n{ok}\n"), ":4: id \"a\" is already used on line 3"),
            (
                r#"{"id": "a", "language": "cobol", "prompt": "p", "test": "t"}"#.to_string(),
                ":1: language \"cobol\": expected one of python, bash",
            ),
            (
                r#"{"id": "a", "language": "python", "prompt": "p", "test": "t", "entrypoint": "f"}"#.to_string(),
                ":1: expected",
            ),
            (
                r#"{"id": "a", "language": "python", "prompt": "p", "test": "t", "entry_point": "f()"}"#.to_string(),
                ":1: entry_point \"f()\" is not a Python identifier",
            ),
            (
                r#"{"id": " ", "language": "python", "prompt": "p", "test": "t"}"#.to_string(),
                ":1: empty id",
            ),
            ("\n// nothing\n".to_string(), "no problems"),
        ] {
            let path = write(&dir, &text);
            let err = load_user_suite(&path).unwrap_err().to_string();
            assert!(
                err.starts_with(&path.display().to_string()) && err.contains(want),
                "{text:?}: {err}"
            );
        }
        let err = load_user_suite(&dir.path().join("missing.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.jsonl"), "{err}");
    }
}
