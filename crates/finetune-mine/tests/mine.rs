//! The miner against scripted repositories, checked against `git` itself where git has an
//! answer (file contents before and after, line counts, `git apply`).

mod fixtures;

use finetune_mine::message::ChangeKind;
use finetune_mine::{
    mine_to_dir, Manifest, MineError, MineOptions, MineOutcome, Pair, PairFormat, Quiet,
    HELDOUT_FILE, MANIFEST_FILE, TRAIN_FILE,
};
use fixtures::{options, read_jsonl, Repo, DEPENDABOT};
use std::path::Path;

fn mine(opts: &MineOptions, out: &Path) -> (Manifest, Vec<Pair>) {
    let manifest = match mine_to_dir(opts, out, false, "test", &Quiet).unwrap() {
        MineOutcome::Written(m) => *m,
        MineOutcome::UpToDate(_) => panic!("fresh mine said up to date"),
    };
    let mut pairs = read_jsonl(&out.join(TRAIN_FILE));
    pairs.extend(read_jsonl(&out.join(HELDOUT_FILE)));
    (manifest, pairs)
}

fn by_commit<'a>(pairs: &'a [Pair], sha: &str) -> Option<&'a Pair> {
    pairs.iter().find(|p| p.meta.commits[0] == sha)
}

fn skipped(m: &Manifest, why: &str) -> usize {
    m.counts.changes_skipped.get(why).copied().unwrap_or(0)
}

fn files_skipped(m: &Manifest, why: &str) -> usize {
    m.counts.files_skipped.get(why).copied().unwrap_or(0)
}

/// Applies SEARCH/REPLACE blocks for `path` to `old`, as an editing agent would.
fn apply_blocks(old: &str, target: &str, path: &str) -> String {
    let mut text = old.to_string();
    let mut rest = target;
    while let Some(i) = rest.find("<<<<<<< SEARCH\n") {
        let header = rest[..i].trim_end().rsplit('\n').next().unwrap_or("");
        rest = &rest[i + "<<<<<<< SEARCH\n".len()..];
        let (search, r) = rest.split_once("=======\n").unwrap();
        let (replace, r) = r.split_once(">>>>>>> REPLACE").unwrap();
        rest = r.strip_prefix('\n').unwrap_or(r);
        if header != path {
            continue;
        }
        if search.is_empty() {
            text = replace.to_string();
        } else {
            assert_eq!(
                text.match_indices(search).count(),
                1,
                "{path}: SEARCH not unique:\n{search}"
            );
            text = text.replacen(search, replace, 1);
        }
    }
    text
}

fn show(repo: &Repo, rev: &str, path: &str) -> String {
    String::from_utf8(repo.git_bytes(&["show", &format!("{rev}:{path}")])).unwrap()
}

#[test]
fn every_pull_request_style_is_one_pair_and_inner_commits_are_not_repeated() {
    let mut r = Repo::new();
    r.write("src/lib.rs", "pub fn one() -> u32 {\n    1\n}\n");
    r.commit("Add one()");

    // GitHub merge commit of a two-commit branch.
    r.git(&["checkout", "-q", "-b", "feature"]);
    r.write(
        "src/lib.rs",
        "pub fn one() -> u32 {\n    1\n}\n\npub fn two() -> u32 {\n    2\n}\n",
    );
    let inner1 = r.commit("Add two()");
    r.write(
        "src/lib.rs",
        "pub fn one() -> u32 {\n    1\n}\n\npub fn two() -> u32 {\n    1 + 1\n}\n",
    );
    let inner2 = r.commit("Compute two from one");
    r.git(&["checkout", "-q", "main"]);
    let gh = r.merge(
        "feature",
        "Merge pull request #12 from alice/feature\n\nAdd two()\n\nA second function.",
    );

    // Squash merge.
    r.write(
        "src/lib.rs",
        &(show(&r, "HEAD", "src/lib.rs") + "\npub fn three() -> u32 {\n    3\n}\n"),
    );
    let squash = r.commit("Add three() (#13)\n\nThird function.");

    // bors.
    r.git(&["checkout", "-q", "-b", "bors"]);
    r.write("README.md", "# project\n\nThree functions.\n");
    r.commit("Document the functions");
    r.git(&["checkout", "-q", "main"]);
    let bors = r.merge(
        "bors",
        "Auto merge of #14 - bob:docs, r=carol\n\nDocument the functions\n\nA README.",
    );

    // GitLab.
    r.git(&["checkout", "-q", "-b", "gl"]);
    r.write("src/util.rs", "pub fn id(x: u32) -> u32 {\n    x\n}\n");
    r.commit("Add util::id");
    r.git(&["checkout", "-q", "main"]);
    let gitlab = r.merge(
        "gl",
        "Merge branch 'gl' into 'main'\n\nAdd an identity helper\n\nSee merge request team/project!15",
    );

    // A plain branch merge is not a pair.
    r.git(&["checkout", "-q", "-b", "side"]);
    r.write("src/side.rs", "pub fn side() {}\n");
    r.commit("Add side module");
    r.git(&["checkout", "-q", "main"]);
    r.merge("side", "Merge branch 'side'");

    let (out_t, out) = fixtures::out_dir();
    let (m, pairs) = mine(&options(r.path()), &out);
    drop(out_t);

    let p = by_commit(&pairs, &gh).expect("GitHub merge pair");
    assert_eq!((p.meta.kind, p.meta.pr), (ChangeKind::PrMerge, Some(12)));
    assert_eq!(p.instruction, "Add two()\n\nA second function.");
    assert_eq!(
        p.meta.commits.len(),
        2,
        "merge and PR head: {:?}",
        p.meta.commits
    );
    assert_eq!(p.meta.commits[1], inner2);
    // The whole PR diff, against the first parent.
    assert!(p.target.contains("1 + 1"), "{}", p.target);
    assert_eq!(
        apply_blocks(
            &show(&r, &format!("{gh}^1"), "src/lib.rs"),
            &p.target,
            "src/lib.rs"
        ),
        show(&r, &gh, "src/lib.rs")
    );

    let p = by_commit(&pairs, &squash).expect("squash pair");
    assert_eq!((p.meta.kind, p.meta.pr), (ChangeKind::PrSquash, Some(13)));
    assert_eq!(p.instruction, "Add three()\n\nThird function.");

    let p = by_commit(&pairs, &bors).expect("bors pair");
    assert_eq!((p.meta.kind, p.meta.pr), (ChangeKind::PrBors, Some(14)));
    assert_eq!(p.instruction, "Document the functions\n\nA README.");

    let p = by_commit(&pairs, &gitlab).expect("GitLab pair");
    assert_eq!((p.meta.kind, p.meta.pr), (ChangeKind::PrGitlab, Some(15)));
    assert_eq!(p.instruction, "Add an identity helper");

    // Inner commits of merged branches are never pairs of their own.
    for inner in [&inner1, &inner2] {
        assert!(pairs.iter().all(|p| p.meta.commits[0] != *inner));
    }
    assert_eq!(skipped(&m, "merge-without-pr"), 1);
    assert_eq!(
        pairs.len(),
        5,
        "{:#?}",
        pairs.iter().map(|p| &p.id).collect::<Vec<_>>()
    );
    assert_eq!(m.counts.commits, 6);
}

#[test]
fn search_replace_and_udiff_reproduce_every_change_like_git() {
    let mut r = Repo::new();
    let body: String = (0..300).map(|i| format!("line {i}\n")).collect();
    r.write("big.txt", &body);
    r.write("small.rs", "fn a() {}\nfn b() {}\nfn a() {}\n");
    r.write("gone.txt", "bye\n");
    r.commit("Initial files");
    r.write(
        "big.txt",
        body.replace("line 10\n", "line ten\n")
            .replace("line 250\n", "")
            .replace("line 299\n", "line 299\nline 300"),
    );
    r.write(
        "small.rs",
        "fn a() {}\nfn b() { todo!() }\nfn a() {}\nfn c() {}\n",
    );
    std::fs::remove_file(r.path().join("gone.txt")).unwrap();
    r.write("new/file.py", "print('hi')\n");
    let c = r.commit("Edit, delete and add files");

    for format in [PairFormat::SearchReplace, PairFormat::Udiff] {
        let (_t, out) = fixtures::out_dir();
        let opts = MineOptions {
            format,
            ..options(r.path())
        };
        let (_, pairs) = mine(&opts, &out);
        let p = by_commit(&pairs, &c).unwrap();
        assert_eq!(
            p.meta.files,
            vec!["big.txt", "gone.txt", "new/file.py", "small.rs"]
        );
        // Line counts as git counts them.
        let numstat = r.git(&["show", "--numstat", "--format=", &c]);
        let (mut add, mut del) = (0, 0);
        for l in numstat.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            add += f[0].parse::<usize>().unwrap();
            del += f[1].parse::<usize>().unwrap();
        }
        assert_eq!((p.meta.lines_added, p.meta.lines_removed), (add, del));
        match format {
            PairFormat::SearchReplace => {
                for f in ["big.txt", "small.rs"] {
                    let before = show(&r, &format!("{c}^"), f);
                    // SEARCH/REPLACE has no way to say "no newline at end of file" (big.txt
                    // lost its last one): compare up to that.
                    assert_eq!(
                        apply_blocks(&before, &p.target, f).trim_end_matches('\n'),
                        show(&r, &c, f).trim_end_matches('\n'),
                        "{f}"
                    );
                }
                assert_eq!(apply_blocks("", &p.target, "new/file.py"), "print('hi')\n");
                assert_eq!(apply_blocks("bye\n", &p.target, "gone.txt"), "");
            }
            PairFormat::Udiff => {
                // git itself accepts the diff on the parent tree and produces the new one.
                let wt = tempfile::tempdir().unwrap();
                r.git(&[
                    "worktree",
                    "add",
                    "-q",
                    "--detach",
                    wt.path().to_str().unwrap(),
                    &format!("{c}^"),
                ]);
                let patch = wt.path().join("change.patch");
                std::fs::write(&patch, format!("{}\n", p.target)).unwrap();
                let st = std::process::Command::new("git")
                    .args(["apply", "--whitespace=nowarn", patch.to_str().unwrap()])
                    .current_dir(wt.path())
                    .output()
                    .unwrap();
                assert!(st.status.success(), "git apply: {st:?}\n{}", p.target);
                for f in ["big.txt", "small.rs", "new/file.py"] {
                    assert_eq!(
                        std::fs::read_to_string(wt.path().join(f)).unwrap(),
                        show(&r, &c, f),
                        "{f}"
                    );
                }
                assert!(!wt.path().join("gone.txt").exists());
            }
        }
        // Context: the old content of each touched file under its header, the long one windowed.
        assert!(
            p.context
                .contains("### small.rs\nfn a() {}\nfn b() {}\nfn a() {}"),
            "{}",
            p.context
        );
        assert!(p.context.contains("### big.txt\nline 0\n"), "{}", p.context);
        assert!(p.context.contains("⋮"), "{}", p.context);
        assert!(p.context.contains("### new/file.py (new file)"));
    }
}

#[test]
fn each_filter_is_applied_and_counted() {
    let mut r = Repo::new();
    r.write("src/main.rs", "fn main() {}\n");
    r.commit("Start the project");

    r.write("Cargo.lock", "# lock\n");
    r.write("src/main.rs", "fn main() { println!(\"a\"); }\n");
    let lock = r.commit("Print a greeting and lock dependencies");

    r.write("src/main.rs", "fn main() { println!(\"b\"); }\n");
    r.commit_as(DEPENDABOT, "Bump serde from 1.0.1 to 1.0.2");

    r.write("src/main.rs", "fn main() { println!(\"c\"); }\n");
    r.commit("wip");

    r.write("vendor/dep/lib.rs", "pub fn dep() {}\n");
    r.write("third_party/x.c", "int x;\n");
    r.write("app.min.js", "var a=1;\n");
    r.write("gen.rs", "// @generated by a tool\nfn g() {}\n");
    r.write("api.pb.go", "package api\n");
    r.write(".gitattributes", "*.pb.go linguist-generated=true\n");
    r.write("logo.png", b"\x89PNG\r\n\x1a\n\0\0\0binary".as_slice());
    r.write("long.txt", "x".repeat(1500) + "\n");
    r.write("big.txt", "y\n".repeat(2000));
    r.write("src/main.rs", "fn main() { println!(\"d\"); }\n");
    let mixed = r.commit("Change the greeting again");

    for i in 0..25 {
        r.write(&format!("many/f{i}.rs"), "fn f() {}\n");
    }
    r.commit("Add many files at once");

    r.write("lines.rs", "x\n".repeat(900));
    r.commit("Add a huge file");

    let (_t, out) = fixtures::out_dir();
    let opts = MineOptions {
        max_file_bytes: 3000,
        ..options(r.path())
    };
    let (m, pairs) = mine(&opts, &out);
    assert_eq!(skipped(&m, "bot-author"), 1);
    assert_eq!(skipped(&m, "boilerplate-message"), 1);
    assert_eq!(skipped(&m, "too-many-files"), 1);
    assert_eq!(skipped(&m, "too-many-lines"), 1);
    assert_eq!(files_skipped(&m, "lock-file"), 1);
    assert_eq!(files_skipped(&m, "vendored"), 2);
    assert_eq!(
        files_skipped(&m, "generated"),
        3,
        "{:?}",
        m.counts.files_skipped
    ); // .min.js, @generated, linguist
    assert_eq!(files_skipped(&m, "binary"), 1);
    assert_eq!(files_skipped(&m, "long-lines"), 1);
    assert_eq!(files_skipped(&m, "too-large"), 1);
    assert_eq!(
        by_commit(&pairs, &lock).unwrap().meta.files,
        vec!["src/main.rs"]
    );
    // What survives of the mixed commit: the source file and the attributes file.
    assert_eq!(
        by_commit(&pairs, &mixed).unwrap().meta.files,
        vec![".gitattributes", "src/main.rs"]
    );

    // The token budget drops whole pairs.
    let (_t2, out2) = fixtures::out_dir();
    let (m2, pairs2) = mine(
        &MineOptions {
            max_pair_tokens: 20,
            ..opts.clone()
        },
        &out2,
    );
    assert!(
        skipped(&m2, "over-token-budget") >= 2,
        "{:?}",
        m2.counts.changes_skipped
    );
    assert!(pairs2.len() < pairs.len());

    // Each of these filters can be turned off.
    let (_t4, out4) = fixtures::out_dir();
    let (m4, _) = mine(
        &MineOptions {
            skip_boilerplate: false,
            skip_generated: false,
            ..opts.clone()
        },
        &out4,
    );
    assert_eq!(skipped(&m4, "boilerplate-message"), 0);
    for why in ["lock-file", "vendored", "generated"] {
        assert_eq!(files_skipped(&m4, why), 0, "{why}");
    }

    // Bots are kept on request; path globs select files.
    let (_t3, out3) = fixtures::out_dir();
    let (m3, pairs3) = mine(
        &MineOptions {
            skip_bots: false,
            paths: vec!["src/**".into()],
            ..opts.clone()
        },
        &out3,
    );
    assert_eq!(skipped(&m3, "bot-author"), 0);
    assert!(pairs3
        .iter()
        .all(|p| p.meta.files.iter().all(|f| f.starts_with("src/"))));
    assert!(files_skipped(&m3, "path-filter") > 0);
}

#[test]
fn renames_mode_changes_submodules_and_odd_paths_are_counted_not_fatal() {
    let mut r = Repo::new();
    r.write("a.sh", "echo a\n");
    r.write("keep.rs", "fn keep() {}\n");
    r.commit("Add a script");
    r.git(&["mv", "a.sh", "b.sh"]);
    r.commit("Rename the script");
    {
        use std::os::unix::fs::PermissionsExt;
        let p = r.path().join("b.sh");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    r.commit("Make the script executable");
    // A submodule entry (gitlink) added by hand.
    let head = r.git(&["rev-parse", "HEAD"]);
    r.git(&[
        "update-index",
        "--add",
        "--cacheinfo",
        &format!("160000,{head},sub"),
    ]);
    r.commit_staged(fixtures::ALICE, "Add a submodule");
    r.git(&["update-index", "--force-remove", "sub"]);
    r.commit_staged(fixtures::ALICE, "Remove the submodule");
    // A non-UTF-8 path and non-UTF-8 content.
    r.write("latin1.txt", b"caf\xe9\n".as_slice());
    r.write("x", "x\n");
    {
        use std::os::unix::ffi::OsStrExt;
        std::fs::write(
            r.path().join(std::ffi::OsStr::from_bytes(b"n\xffme.txt")),
            "bad name\n",
        )
        .unwrap();
    }
    r.write("keep.rs", "fn keep() { 1 }\n");
    let odd = r.commit("Add odd files and change keep()");

    let (_t, out) = fixtures::out_dir();
    let (m, pairs) = mine(&options(r.path()), &out);
    assert_eq!(files_skipped(&m, "rename-only"), 2);
    assert_eq!(files_skipped(&m, "mode-only"), 1);
    assert_eq!(files_skipped(&m, "submodule"), 2);
    assert_eq!(files_skipped(&m, "non-utf8"), 2);
    assert_eq!(skipped(&m, "no-files-left"), 4);
    assert_eq!(
        by_commit(&pairs, &odd).unwrap().meta.files,
        vec!["keep.rs", "x"]
    );
}

#[test]
fn planted_secrets_never_reach_a_pair() {
    let mut r = Repo::new();
    r.write("config.py", "DEBUG = True\n");
    r.commit("Add config");
    r.write(
        "config.py",
        "DEBUG = True\nAWS_KEY = 'AKIAIOSFODNN7EXAMPLE'\nAPI_TOKEN = \"q8Zr2LmX9vTn4Kp7Wd\"\n",
    );
    r.commit("Configure AWS with key AKIAIOSFODNN7EXAMPLE");
    let (_t, out) = fixtures::out_dir();
    let (m, _) = mine(&options(r.path()), &out);
    let all = std::fs::read_to_string(out.join(TRAIN_FILE)).unwrap();
    assert!(!all.contains("AKIAIOSFODNN7EXAMPLE"), "{all}");
    assert!(!all.contains("q8Zr2LmX9vTn4Kp7Wd"), "{all}");
    assert!(all.contains("<SECRET>"));
    assert_eq!(m.counts.secrets_redacted, 3);
}

#[test]
fn duplicates_are_dropped_and_the_oldest_kept() {
    let mut r = Repo::new();
    let base: String = (0..60)
        .map(|i| format!("let value_{i} = compute({i}, \"label {i}\");\n"))
        .collect();
    r.write("a.rs", &base);
    r.commit("Add values");
    let edited = base.replace("compute(7,", "compute_fast(7,");
    r.write("a.rs", &edited);
    let first = r.commit("Use compute_fast for value 7");
    r.write("a.rs", &base);
    r.commit("Revert compute_fast for value 7");
    r.write("a.rs", &edited);
    let again = r.commit("Use compute_fast for value 7 again");

    let (_t, out) = fixtures::out_dir();
    let (m, pairs) = mine(&options(r.path()), &out);
    assert_eq!(skipped(&m, "exact-duplicate"), 1);
    assert!(by_commit(&pairs, &first).is_some());
    assert!(by_commit(&pairs, &again).is_none());
}

#[test]
fn heldout_pairs_are_the_newest() {
    let mut r = Repo::new();
    for i in 0..20 {
        r.write("n.rs", format!("pub const N: u32 = {i};\n// step {i}\n"));
        r.commit(&format!("Set N to {i}"));
    }
    let (_t, out) = fixtures::out_dir();
    let opts = MineOptions {
        heldout: 0.2,
        dedup_threshold: 2.0,
        ..options(r.path())
    };
    let (m, _) = mine(&opts, &out);
    let train = read_jsonl(&out.join(TRAIN_FILE));
    let held = read_jsonl(&out.join(HELDOUT_FILE));
    assert_eq!((m.train, m.heldout), (train.len(), held.len()));
    assert_eq!(held.len(), 4);
    let newest_train = train.iter().map(|p| p.meta.author_timestamp).max().unwrap();
    let oldest_held = held.iter().map(|p| p.meta.author_timestamp).min().unwrap();
    assert!(newest_train < oldest_held);
    assert!(held.iter().all(|p| p.meta.split == "heldout"));
    assert!(train.iter().all(|p| p.meta.split == "train"));
}

#[test]
fn incremental_mines_only_new_commits_and_an_unchanged_repo_changes_nothing() {
    let mut r = Repo::new();
    for i in 0..5 {
        r.write("n.rs", format!("pub const N: u32 = {i};\n"));
        r.commit(&format!("Set N to {i}"));
    }
    let (_t, out) = fixtures::out_dir();
    let opts = options(r.path());
    let (m1, p1) = mine(&opts, &out);
    assert_eq!(p1.len(), 5);
    for i in 5..8 {
        r.write("n.rs", format!("pub const N: u32 = {i};\n"));
        r.commit(&format!("Set N to {i}"));
    }
    let m2 = match mine_to_dir(&opts, &out, true, "test", &Quiet).unwrap() {
        MineOutcome::Written(m) => m,
        MineOutcome::UpToDate(_) => panic!("new commits were not mined"),
    };
    assert_eq!(m2.last_run.commits, 3);
    assert_eq!(m2.train + m2.heldout, 8);
    assert_eq!(m2.counts.commits, m1.counts.commits + 3);
    let before: Vec<Vec<u8>> = [TRAIN_FILE, HELDOUT_FILE, MANIFEST_FILE]
        .iter()
        .map(|f| std::fs::read(out.join(f)).unwrap())
        .collect();
    assert!(matches!(
        mine_to_dir(&opts, &out, true, "test", &Quiet).unwrap(),
        MineOutcome::UpToDate(_)
    ));
    let after: Vec<Vec<u8>> = [TRAIN_FILE, HELDOUT_FILE, MANIFEST_FILE]
        .iter()
        .map(|f| std::fs::read(out.join(f)).unwrap())
        .collect();
    assert_eq!(before, after);
    // Other options are refused rather than mixed into the same dataset.
    let other = MineOptions {
        max_lines: 10,
        ..opts
    };
    let err = mine_to_dir(&other, &out, true, "test", &Quiet).unwrap_err();
    assert!(matches!(err, MineError::NotIncremental { .. }), "{err}");
}

#[test]
fn bad_repositories_get_clear_errors_or_are_mined_as_they_are() {
    // Empty repository.
    let empty = Repo::new();
    let (_t, out) = fixtures::out_dir();
    let err = mine_to_dir(&options(empty.path()), &out, false, "t", &Quiet).unwrap_err();
    assert!(err.to_string().contains("no commits yet"), "{err}");
    assert!(!out.exists());

    // Not a repository; a revision that does not exist.
    let plain = tempfile::tempdir().unwrap();
    let err = mine_to_dir(&options(plain.path()), &out, false, "t", &Quiet).unwrap_err();
    assert!(err.to_string().contains("not a git repository"), "{err}");
    let mut r = Repo::new();
    for i in 0..4 {
        r.write("f.rs", format!("fn f() -> u32 {{ {i} }}\n"));
        r.commit(&format!("Return {i} from f"));
    }
    let err = mine_to_dir(
        &MineOptions {
            rev: "nope".into(),
            ..options(r.path())
        },
        &out,
        false,
        "t",
        &Quiet,
    )
    .unwrap_err();
    assert!(err.to_string().contains("`nope`"), "{err}");

    // Bare clone and detached HEAD mine like the original.
    let bare = tempfile::tempdir().unwrap();
    r.git(&[
        "clone",
        "-q",
        "--bare",
        r.path().to_str().unwrap(),
        bare.path().join("b.git").to_str().unwrap(),
    ]);
    let (_t2, out2) = fixtures::out_dir();
    let (_, pairs) = mine(&options(&bare.path().join("b.git")), &out2);
    assert_eq!(pairs.len(), 4);
    r.git(&["checkout", "-q", "--detach", "HEAD~1"]);
    let (_t3, out3) = fixtures::out_dir();
    let (_, pairs) = mine(&options(r.path()), &out3);
    assert_eq!(pairs.len(), 3);
    r.git(&["checkout", "-q", "main"]);

    // Shallow clone: mines what is there and says so.
    let shallow = tempfile::tempdir().unwrap();
    let url = format!("file://{}", r.path().display());
    r.git(&[
        "clone",
        "-q",
        "--depth",
        "2",
        &url,
        shallow.path().join("s").to_str().unwrap(),
    ]);
    let (_t4, out4) = fixtures::out_dir();
    let (m, pairs) = mine(&options(&shallow.path().join("s")), &out4);
    assert!(m.shallow);
    assert_eq!(m.counts.commits, 2);
    assert!(pairs.len() <= 2);
}

#[test]
fn since_and_until_bound_the_history() {
    let mut r = Repo::new();
    let mut ids = Vec::new();
    for i in 0..6 {
        r.write("f.rs", format!("fn f() -> u32 {{ {i} }}\n"));
        ids.push(r.commit(&format!("Return {i} from f")));
    }
    let (_t, out) = fixtures::out_dir();
    let opts = MineOptions {
        since: Some(ids[1].clone()),
        until: Some(ids[4].clone()),
        ..options(r.path())
    };
    let (m, pairs) = mine(&opts, &out);
    assert_eq!(m.counts.commits, 3);
    let mut got: Vec<&str> = pairs.iter().map(|p| p.meta.commits[0].as_str()).collect();
    got.sort();
    let mut want = vec![ids[2].as_str(), ids[3].as_str(), ids[4].as_str()];
    want.sort();
    assert_eq!(got, want);
    // Dates: commits are one hour apart from 2024-01-01T01:00Z; a day bound includes all.
    let (_t2, out2) = fixtures::out_dir();
    let (m, _) = mine(
        &MineOptions {
            since: Some("2024-01-01".into()),
            until: Some("2024-01-01".into()),
            ..options(r.path())
        },
        &out2,
    );
    assert_eq!(m.counts.commits, 6);
    let (_t3, out3) = fixtures::out_dir();
    let err = mine_to_dir(
        &MineOptions {
            since: Some("yesterday-ish".into()),
            ..options(r.path())
        },
        &out3,
        false,
        "t",
        &Quiet,
    )
    .unwrap_err();
    assert!(err.to_string().contains("mine.since"), "{err}");
}

#[test]
fn a_missing_object_is_counted_not_fatal() {
    let mut r = Repo::new();
    r.write("a.rs", "fn a() {}\n");
    r.commit("Add a");
    r.write("a.rs", "fn a() { lost() }\n");
    r.commit("Call lost from a");
    r.write("b.rs", "fn b() {}\n");
    r.commit("Add b");
    // Delete the loose object of the second commit's blob.
    let blob = r.git(&["rev-parse", "HEAD~1:a.rs"]);
    let path = r
        .path()
        .join(".git/objects")
        .join(&blob[..2])
        .join(&blob[2..]);
    std::fs::remove_file(&path).unwrap();
    let (_t, out) = fixtures::out_dir();
    let (m, pairs) = mine(&options(r.path()), &out);
    // The commit whose new side is the missing blob is skipped and counted; the others mine.
    assert_eq!(
        skipped(&m, "unreadable-object"),
        1,
        "{:?}",
        m.counts.changes_skipped
    );
    assert_eq!(pairs.len(), 2);
}
