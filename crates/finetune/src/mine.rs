//! `finetune mine` and the mine stage of `finetune run`: recipe → finetune-mine options,
//! progress bar, summary.

use crate::cli::MineArgs;
use crate::recipe::ResolvedRecipe;
use crate::Outcome;
use anyhow::Result;
use finetune_mine::{MineOptions, MineOutcome, Progress};
use std::path::Path;

/// The miner's options from the recipe's `[mine]` section.
pub fn options(resolved: &ResolvedRecipe) -> MineOptions {
    let m = &resolved.recipe.mine;
    MineOptions {
        repo: m.repo.clone(),
        rev: m.rev.clone(),
        since: m.since.clone(),
        until: m.until.clone(),
        paths: m.paths.clone(),
        exclude: m.exclude.clone(),
        format: m.format.into(),
        heldout: m.heldout,
        max_files: m.max_files as usize,
        max_lines: m.max_lines as usize,
        max_file_bytes: m.max_file_bytes,
        max_line_chars: m.max_line_chars as usize,
        max_pair_tokens: m.max_pair_tokens as usize,
        skip_bots: m.skip_bots,
        skip_boilerplate: m.skip_boilerplate,
        skip_generated: m.skip_generated,
        dedup_threshold: m.dedup_threshold,
        threads: 0,
    }
}

/// A progress bar on a terminal (indicatif draws nothing when stderr is not one).
struct Bar(indicatif::ProgressBar);

impl Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

fn bar() -> Bar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "mining {bar:30} {pos}/{len} commits, {per_sec}, ETA {eta}",
        )
        .expect("valid template"),
    );
    Bar(bar)
}

/// Mines the recipe's repository into `out` with `jobs` threads (0: all cores).
pub fn mine_into(
    resolved: &ResolvedRecipe,
    out: &Path,
    incremental: bool,
    quiet: bool,
    jobs: usize,
) -> Result<MineOutcome> {
    let opts = MineOptions {
        threads: jobs,
        ..options(resolved)
    };
    let tool = format!("finetune {}", crate::cli::VERSION);
    let outcome = if quiet {
        finetune_mine::mine_to_dir(&opts, out, incremental, &tool, &finetune_mine::Quiet)?
    } else {
        finetune_mine::mine_to_dir(&opts, out, incremental, &tool, &bar())?
    };
    Ok(outcome)
}

/// What was mined, where it went, and what was left out.
pub fn print_summary(outcome: &MineOutcome, out: &Path) {
    let m = match outcome {
        MineOutcome::UpToDate(m) => {
            println!(
                "mine: up to date: no commit after {} on {}; {} unchanged",
                &m.last_commit
                    .get(&m.options.rev)
                    .map_or("?", |s| s.as_str()),
                m.options.rev,
                out.display()
            );
            return;
        }
        MineOutcome::Written(m) => m,
    };
    let r = &m.last_run;
    println!(
        "mine: {} commits in {:.1} s ({:.0} commits/s): {} new pairs; dataset {} train + {} held out in {}",
        r.commits,
        r.elapsed_secs,
        r.commits_per_sec,
        r.new_pairs,
        m.train,
        m.heldout,
        out.display()
    );
    let c = &m.counts;
    let list = |map: &std::collections::BTreeMap<String, usize>| -> String {
        if map.is_empty() {
            "none".into()
        } else {
            map.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    println!("mine: changes left out: {}", list(&c.changes_skipped));
    println!("mine: files left out: {}", list(&c.files_skipped));
    println!("mine: secrets redacted: {}", c.secrets_redacted);
    if m.shallow {
        println!("mine: note: shallow clone, only the history present was mined");
    }
}

/// `finetune mine`.
pub fn command(args: &MineArgs) -> Result<Outcome> {
    let Some(resolved) = crate::resolve(&args.recipe)? else {
        return Ok(Outcome::Done);
    };
    resolved.check_repo()?;
    let out = resolved.recipe.run.out.clone();
    let outcome = mine_into(
        &resolved,
        &out,
        args.incremental,
        args.quiet,
        args.jobs.unwrap_or(0),
    )?;
    if !args.quiet {
        print_summary(&outcome, &out);
    }
    Ok(Outcome::Done)
}
