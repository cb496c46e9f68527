//! What is not worth learning from: bot authors, lock files, vendored and generated code,
//! binary or oversized files, and the user's own path globs.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

/// Author names/emails of well-known bots (plus anything ending in `[bot]`).
const BOTS: [&str; 14] = [
    "dependabot",
    "renovate",
    "github-actions",
    "greenkeeper",
    "snyk-bot",
    "mergify",
    "pre-commit-ci",
    "allcontributors",
    "imgbot",
    "codecov",
    "depfu",
    "pyup-bot",
    "semantic-release-bot",
    "copybara",
];

/// Whether a commit's author is a bot.
pub fn is_bot(name: &str, email: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let email = email.to_ascii_lowercase();
    name.ends_with("[bot]")
        || email.contains("[bot]@")
        || BOTS
            .iter()
            .any(|b| name.starts_with(b) || email.starts_with(b))
}

/// Lock files, by file name.
const LOCK_FILES: [&str; 16] = [
    "Cargo.lock",
    "package-lock.json",
    "npm-shrinkwrap.json",
    "yarn.lock",
    "pnpm-lock.yaml",
    "poetry.lock",
    "Pipfile.lock",
    "uv.lock",
    "go.sum",
    "composer.lock",
    "Gemfile.lock",
    "flake.lock",
    "mix.lock",
    "pubspec.lock",
    "packages.lock.json",
    "bun.lockb",
];

/// Directories of third-party code, as any path component.
const VENDOR_DIRS: [&str; 5] = [
    "vendor",
    "node_modules",
    "third_party",
    "third-party",
    "3rdparty",
];

/// Why a file is left out of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FileSkip {
    PathFilter,
    LockFile,
    Vendored,
    Generated,
    Binary,
    TooLarge,
    LongLines,
    NonUtf8,
    Submodule,
    Symlink,
    ModeOnly,
    RenameOnly,
}

impl FileSkip {
    pub const ALL: [FileSkip; 12] = [
        FileSkip::PathFilter,
        FileSkip::LockFile,
        FileSkip::Vendored,
        FileSkip::Generated,
        FileSkip::Binary,
        FileSkip::TooLarge,
        FileSkip::LongLines,
        FileSkip::NonUtf8,
        FileSkip::Submodule,
        FileSkip::Symlink,
        FileSkip::ModeOnly,
        FileSkip::RenameOnly,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FileSkip::PathFilter => "path-filter",
            FileSkip::LockFile => "lock-file",
            FileSkip::Vendored => "vendored",
            FileSkip::Generated => "generated",
            FileSkip::Binary => "binary",
            FileSkip::TooLarge => "too-large",
            FileSkip::LongLines => "long-lines",
            FileSkip::NonUtf8 => "non-utf8",
            FileSkip::Submodule => "submodule",
            FileSkip::Symlink => "symlink",
            FileSkip::ModeOnly => "mode-only",
            FileSkip::RenameOnly => "rename-only",
        }
    }
}

/// Lock file or vendored directory, from the path alone.
pub fn path_skip(path: &str) -> Option<FileSkip> {
    let name = path.rsplit('/').next().unwrap_or(path);
    if LOCK_FILES.contains(&name) {
        return Some(FileSkip::LockFile);
    }
    if path
        .split('/')
        .rev()
        .skip(1)
        .any(|dir| VENDOR_DIRS.contains(&dir))
    {
        return Some(FileSkip::Vendored);
    }
    if name.ends_with(".min.js") || name.ends_with(".min.css") {
        return Some(FileSkip::Generated);
    }
    None
}

/// `@generated` (Facebook/Rust tooling) or Go's `Code generated … DO NOT EDIT.` in the first
/// lines of a file.
pub fn has_generated_marker(text: &str) -> bool {
    text.lines().take(10).any(|l| {
        l.contains("@generated") || (l.contains("Code generated") && l.contains("DO NOT EDIT"))
    })
}

/// Git's own binary heuristic: a NUL byte in the first 8000 bytes.
pub fn is_binary(bytes: &[u8]) -> bool {
    memchr::memchr(0, &bytes[..bytes.len().min(8000)]).is_some()
}

/// Whether any line is longer than `max_chars` characters.
pub fn has_long_line(text: &str, max_chars: usize) -> bool {
    // Bytes bound characters from above: only a line of more than `max_chars` bytes needs
    // its characters counted.
    let mut start = 0;
    let bytes = text.as_bytes();
    let long = |line: &str| line.len() > max_chars && line.chars().count() > max_chars;
    for nl in memchr::memchr_iter(b'\n', bytes) {
        if nl - start > max_chars && long(&text[start..nl]) {
            return true;
        }
        start = nl + 1;
    }
    long(&text[start..])
}

/// A pattern without a slash matches at any depth, as in .gitignore; a leading `/` anchors.
fn anchored(pattern: &str) -> String {
    let trimmed = pattern.trim_end_matches('/');
    if trimmed.contains('/') {
        trimmed.trim_start_matches('/').to_string()
    } else {
        format!("**/{trimmed}")
    }
}

fn glob(pattern: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(&anchored(pattern))
        .literal_separator(true)
        .build()
}

/// Builds a glob set; the error names the bad pattern.
pub fn glob_set(patterns: &[String]) -> Result<GlobSet, String> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let bad = |e: globset::Error| format!("bad glob `{p}`: {e}");
        b.add(glob(p).map_err(bad)?);
        // `dir` or `dir/` also means everything below it.
        let below = format!("{}/**", anchored(p));
        b.add(
            GlobBuilder::new(&below)
                .literal_separator(true)
                .build()
                .map_err(bad)?,
        );
    }
    b.build().map_err(|e| e.to_string())
}

/// `linguist-generated` / `linguist-vendored` paths of a `.gitattributes` file.
#[derive(Debug, Default)]
pub struct LinguistAttributes {
    /// (pattern, generated: Some(set?), vendored: Some(set?)) in file order; later lines win.
    rules: Vec<(globset::GlobMatcher, Option<bool>, Option<bool>)>,
}

impl LinguistAttributes {
    pub fn parse(text: &str) -> Self {
        let mut rules = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let Some(pattern) = parts.next() else {
                continue;
            };
            let (mut generated, mut vendored) = (None, None);
            for attr in parts {
                let (name, value) = match attr.strip_prefix('-') {
                    Some(n) => (n, false),
                    None => match attr.split_once('=') {
                        Some((n, v)) => (n, v != "false"),
                        None => (attr, true),
                    },
                };
                match name.strip_prefix('!').unwrap_or(name) {
                    "linguist-generated" => generated = Some(value && !name.starts_with('!')),
                    "linguist-vendored" => vendored = Some(value && !name.starts_with('!')),
                    _ => {}
                }
            }
            if generated.is_none() && vendored.is_none() {
                continue;
            }
            if let Ok(g) = glob(pattern) {
                rules.push((g.compile_matcher(), generated, vendored));
            }
        }
        Self { rules }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// `Generated` or `Vendored` if the attributes say so for `path`.
    pub fn skip(&self, path: &str) -> Option<FileSkip> {
        let (mut generated, mut vendored) = (false, false);
        for (m, g, v) in &self.rules {
            if m.is_match(path) {
                if let Some(g) = g {
                    generated = *g;
                }
                if let Some(v) = v {
                    vendored = *v;
                }
            }
        }
        if generated {
            Some(FileSkip::Generated)
        } else if vendored {
            Some(FileSkip::Vendored)
        } else {
            None
        }
    }
}

/// Language of a file, from its extension or name (for metadata and per-language counts).
pub fn language(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or(path);
    let ext = name.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    match ext {
        "rs" => "Rust",
        "py" | "pyi" => "Python",
        "js" | "mjs" | "cjs" | "jsx" => "JavaScript",
        "ts" | "tsx" | "mts" | "cts" => "TypeScript",
        "go" => "Go",
        "c" | "h" => "C",
        "cc" | "cpp" | "cxx" | "hpp" | "hh" | "hxx" => "C++",
        "cu" | "cuh" => "CUDA",
        "java" => "Java",
        "kt" | "kts" => "Kotlin",
        "scala" => "Scala",
        "swift" => "Swift",
        "m" | "mm" => "Objective-C",
        "cs" => "C#",
        "fs" => "F#",
        "rb" => "Ruby",
        "php" => "PHP",
        "pl" | "pm" => "Perl",
        "lua" => "Lua",
        "hs" => "Haskell",
        "ml" | "mli" => "OCaml",
        "ex" | "exs" => "Elixir",
        "erl" => "Erlang",
        "clj" | "cljs" => "Clojure",
        "zig" => "Zig",
        "jl" => "Julia",
        "r" | "R" => "R",
        "dart" => "Dart",
        "sh" | "bash" | "zsh" => "Shell",
        "sql" => "SQL",
        "html" | "htm" => "HTML",
        "css" | "scss" | "sass" | "less" => "CSS",
        "vue" => "Vue",
        "svelte" => "Svelte",
        "md" | "markdown" | "rst" | "adoc" | "txt" => "Text",
        "toml" | "yaml" | "yml" | "json" | "ini" | "cfg" => "Config",
        "proto" => "Protocol Buffers",
        "tex" => "TeX",
        "cmake" => "CMake",
        _ => match name {
            "Makefile" | "makefile" | "GNUmakefile" => "Makefile",
            "Dockerfile" => "Dockerfile",
            "CMakeLists.txt" => "CMake",
            _ => "Other",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bots() {
        assert!(is_bot(
            "dependabot[bot]",
            "49699333+dependabot[bot]@users.noreply.github.com"
        ));
        assert!(is_bot("renovate-bot", "bot@renovateapp.com"));
        assert!(is_bot(
            "github-actions",
            "41898282+github-actions[bot]@users.noreply.github.com"
        ));
        assert!(is_bot("some-ci[bot]", "x@y"));
        assert!(!is_bot("Alice", "alice@example.com"));
        assert!(!is_bot("Rob Renovator", "rob@example.com"));
    }

    #[test]
    fn lock_vendor_generated_paths() {
        assert_eq!(path_skip("Cargo.lock"), Some(FileSkip::LockFile));
        assert_eq!(path_skip("web/package-lock.json"), Some(FileSkip::LockFile));
        assert_eq!(path_skip("go.sum"), Some(FileSkip::LockFile));
        assert_eq!(path_skip("vendor/x/y.go"), Some(FileSkip::Vendored));
        assert_eq!(path_skip("a/node_modules/b.js"), Some(FileSkip::Vendored));
        assert_eq!(path_skip("src/third_party/z.c"), Some(FileSkip::Vendored));
        assert_eq!(path_skip("static/app.min.js"), Some(FileSkip::Generated));
        assert_eq!(path_skip("src/vendor.rs"), None);
        assert_eq!(path_skip("src/lib.rs"), None);
    }

    #[test]
    fn generated_markers_and_binary() {
        assert!(has_generated_marker("// @generated by build.rs\nfn x() {}"));
        assert!(has_generated_marker(
            "// Code generated by protoc-gen-go. DO NOT EDIT.\npackage x"
        ));
        assert!(!has_generated_marker("fn main() {}\n"));
        assert!(is_binary(b"abc\0def"));
        assert!(!is_binary(b"plain text\n"));
        assert!(has_long_line(&"x".repeat(1001), 1000));
        assert!(!has_long_line(&"é".repeat(1000), 1000));
    }

    #[test]
    fn gitattributes() {
        let a = LinguistAttributes::parse(
            "# comment\n*.pb.go linguist-generated=true\ndocs/** linguist-vendored\ndocs/keep.md -linguist-vendored\n*.txt text\n",
        );
        assert_eq!(a.skip("api/x.pb.go"), Some(FileSkip::Generated));
        assert_eq!(a.skip("docs/a/b.md"), Some(FileSkip::Vendored));
        assert_eq!(a.skip("docs/keep.md"), None);
        assert_eq!(a.skip("src/main.go"), None);
    }

    #[test]
    fn globs_match_like_gitignore() {
        let set = glob_set(&["*.rs".into(), "docs".into(), "src/gen/**".into()]).unwrap();
        assert!(set.is_match("a/b/c.rs"));
        assert!(set.is_match("docs/x.md"));
        assert!(set.is_match("sub/docs/x.md"));
        assert!(set.is_match("src/gen/a/b.py"));
        assert!(!set.is_match("src/main.py"));
        assert!(glob_set(&["a[".into()]).unwrap_err().contains("a["));
    }

    #[test]
    fn languages() {
        assert_eq!(language("src/lib.rs"), "Rust");
        assert_eq!(language("x/Makefile"), "Makefile");
        assert_eq!(language("noext"), "Other");
    }
}
