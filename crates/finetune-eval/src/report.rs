//! The comparison report: base vs adapter (or run A vs run B) per suite and metric, written as
//! `report.json` (the data), `report.md` (one table) and `report.svg` (a grouped bar chart).
//!
//! Every row carries a 95% interval whose meaning is named by [`MetricRow::interval`]:
//!
//! - `"bootstrap"`: interval of the **delta** (adapter − base), a paired percentile bootstrap
//!   over the `n` examples both sides were measured on ([`crate::stats::bootstrap_paired_diff`],
//!   2,000 resamples, seeded). The delta is significant at 5% when the interval excludes 0.
//! - `"wilson"`: Wilson score interval of the **adapter's proportion** out of `n` (used when only
//!   counts are known, e.g. comparing two reports).
//! - `"none"`: no interval (`ci_low`/`ci_high` are NaN in memory and `null` in JSON).
//!
//! Each file is written to a temporary name in the output directory and renamed into place, so
//! a reader (or a crash) never sees a partial file.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::stats::{self, BOOTSTRAP_RESAMPLES};
use crate::EvalError;

/// File names inside the report directory.
pub const REPORT_JSON: &str = "report.json";
pub const REPORT_MD: &str = "report.md";
pub const REPORT_SVG: &str = "report.svg";
/// Per-example values of a run ([`RunSamples`]), the input of an exact `--compare`.
pub const SAMPLES_JSON: &str = "samples.json";

/// Values of [`MetricRow::interval`].
pub const INTERVAL_BOOTSTRAP: &str = "bootstrap";
pub const INTERVAL_WILSON: &str = "wilson";
pub const INTERVAL_NONE: &str = "none";

/// One suite/metric of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRow {
    pub suite: String,
    pub metric: String,
    pub base: f64,
    pub adapter: f64,
    /// `adapter - base`.
    pub delta: f64,
    /// Examples behind each value (pairs, for a bootstrap row).
    pub n: usize,
    #[serde(with = "nan_as_null")]
    pub ci_low: f64,
    #[serde(with = "nan_as_null")]
    pub ci_high: f64,
    /// `"bootstrap"` (interval of the delta), `"wilson"` (interval of the adapter's proportion)
    /// or `"none"`; see the module documentation.
    pub interval: String,
    pub higher_is_better: bool,
}

/// Whether the adapter did better than the base on one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Better,
    Worse,
    Same,
}

impl MetricRow {
    /// A row from per-example values measured on the same examples (`base[i]`, `adapter[i]`):
    /// means, and the paired bootstrap interval of the delta (seeded with `seed`).
    pub fn paired(
        suite: &str,
        metric: &str,
        base: &[f64],
        adapter: &[f64],
        higher_is_better: bool,
        seed: u64,
    ) -> Result<Self, EvalError> {
        let ci = stats::bootstrap_paired_diff(base, adapter, BOOTSTRAP_RESAMPLES, seed)
            .map_err(|e| EvalError::Invalid(format!("{suite}/{metric}: {e}")))?;
        let (b, a) = (mean_or_nan(base), mean_or_nan(adapter));
        Ok(Self {
            suite: suite.into(),
            metric: metric.into(),
            base: b,
            adapter: a,
            delta: a - b,
            n: base.len(),
            ci_low: ci.low,
            ci_high: ci.high,
            interval: INTERVAL_BOOTSTRAP.into(),
            higher_is_better,
        })
    }

    /// A proportion row from counts only (`k` of `n` for each side): the rates, and the Wilson
    /// interval of the adapter's rate.
    pub fn proportion(
        suite: &str,
        metric: &str,
        base_successes: usize,
        adapter_successes: usize,
        n: usize,
        higher_is_better: bool,
    ) -> Result<Self, EvalError> {
        if base_successes > n {
            return Err(EvalError::Invalid(format!(
                "{suite}/{metric}: base has {base_successes} successes out of {n}"
            )));
        }
        let ci = stats::wilson(adapter_successes, n)
            .map_err(|e| EvalError::Invalid(format!("{suite}/{metric}: {e}")))?;
        let (b, a) = (
            base_successes as f64 / n as f64,
            adapter_successes as f64 / n as f64,
        );
        Ok(Self {
            suite: suite.into(),
            metric: metric.into(),
            base: b,
            adapter: a,
            delta: a - b,
            n,
            ci_low: ci.low,
            ci_high: ci.high,
            interval: INTERVAL_WILSON.into(),
            higher_is_better,
        })
    }

    /// Better/worse/same by the sign of the delta and the metric's direction.
    pub fn verdict(&self) -> Verdict {
        if self.delta == 0.0 || !self.delta.is_finite() {
            Verdict::Same
        } else if (self.delta > 0.0) == self.higher_is_better {
            Verdict::Better
        } else {
            Verdict::Worse
        }
    }

    /// For a bootstrap row: whether the interval of the delta excludes 0 (significant at 5%).
    /// `None` for other intervals, which do not bound the delta.
    pub fn significant(&self) -> Option<bool> {
        (self.interval == INTERVAL_BOOTSTRAP && self.ci_low.is_finite() && self.ci_high.is_finite())
            .then_some(self.ci_low > 0.0 || self.ci_high < 0.0)
    }
}

/// The comparison report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub title: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// What the `base` column measured (e.g. `Qwen/Qwen3-30B-A3B`).
    pub base: String,
    /// What the `adapter` column measured (e.g. `Qwen/Qwen3-30B-A3B + runs/20261125-101500`).
    pub adapter: String,
    pub rows: Vec<MetricRow>,
    pub notes: Vec<String>,
}

impl Report {
    /// An empty report created now.
    pub fn new(title: &str, base: &str, adapter: &str) -> Self {
        Self {
            title: title.into(),
            created_at: now_rfc3339(),
            base: base.into(),
            adapter: adapter.into(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// The report of one run's per-example values: one paired-bootstrap row per metric (a
    /// metric without examples becomes a note).
    pub fn from_samples(title: &str, run: &RunSamples, seed: u64) -> Result<Self, EvalError> {
        let mut report = Report::new(title, &run.base, &run.adapter);
        for m in &run.metrics {
            if m.base.len() != m.adapter.len() {
                return Err(EvalError::Invalid(format!(
                    "{}/{}: {} base values and {} adapter values (each example needs both)",
                    m.suite,
                    m.metric,
                    m.base.len(),
                    m.adapter.len()
                )));
            }
            if !m.ids.is_empty() && m.ids.len() != m.base.len() {
                return Err(EvalError::Invalid(format!(
                    "{}/{}: {} example ids for {} values",
                    m.suite,
                    m.metric,
                    m.ids.len(),
                    m.base.len()
                )));
            }
            if m.base.is_empty() {
                report
                    .notes
                    .push(format!("{}/{}: no examples, left out", m.suite, m.metric));
                continue;
            }
            report.rows.push(MetricRow::paired(
                &m.suite,
                &m.metric,
                &m.base,
                &m.adapter,
                m.higher_is_better,
                seed,
            )?);
        }
        Ok(report)
    }

    /// The markdown rendering (`report.md`).
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# {}\n", self.title);
        let _ = writeln!(md, "- created: {}", self.created_at);
        let _ = writeln!(md, "- base: `{}`", self.base.replace('`', "'"));
        let _ = writeln!(md, "- adapter: `{}`\n", self.adapter.replace('`', "'"));
        md.push_str("| suite | metric | base | adapter | delta | n | 95% interval |\n");
        md.push_str("|---|---|---:|---:|---:|---:|---|\n");
        for r in &self.rows {
            let arrow = if r.higher_is_better { "↑" } else { "↓" };
            let verdict = match r.verdict() {
                Verdict::Better => "better",
                Verdict::Worse => "worse",
                Verdict::Same => "same",
            };
            let mut delta = format!("{} ({verdict})", fmt_signed(r.delta));
            if r.significant() == Some(true) {
                delta = format!("**{delta}**");
            }
            let interval = match r.interval.as_str() {
                INTERVAL_BOOTSTRAP => format!(
                    "Δ [{}, {}] paired bootstrap",
                    fmt_signed(r.ci_low),
                    fmt_signed(r.ci_high)
                ),
                INTERVAL_WILSON => format!(
                    "adapter [{}, {}] Wilson",
                    fmt_value(r.ci_low),
                    fmt_value(r.ci_high)
                ),
                _ => "–".into(),
            };
            let _ = writeln!(
                md,
                "| {} | {} {arrow} | {} | {} | {delta} | {} | {interval} |",
                cell(&r.suite),
                cell(&r.metric),
                fmt_value(r.base),
                fmt_value(r.adapter),
                r.n,
            );
        }
        md.push_str(
            "\ndelta = adapter − base; ↑ higher is better, ↓ lower is better. \
             Bold: the paired bootstrap interval of the delta (2,000 resamples) excludes 0. \
             Wilson: 95% score interval of the adapter's proportion.\n",
        );
        if !self.notes.is_empty() {
            md.push_str("\n## Notes\n\n");
            for n in &self.notes {
                let _ = writeln!(md, "- {n}");
            }
        }
        md
    }

    /// The grouped bar chart (`report.svg`): base and adapter side by side for each
    /// suite/metric.
    pub fn to_svg(&self) -> Result<String, EvalError> {
        render_svg(self).map_err(|e| EvalError::Invalid(format!("drawing {REPORT_SVG}: {e}")))
    }
}

/// The paths [`write_report`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportFiles {
    pub json: PathBuf,
    pub markdown: PathBuf,
    pub svg: PathBuf,
}

/// Writes `report.json`, `report.md` and `report.svg` into `dir` (created if missing), each
/// through a temporary file and a rename.
pub fn write_report(report: &Report, dir: &Path) -> Result<ReportFiles, EvalError> {
    fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    let json = serde_json::to_string_pretty(report)
        .map_err(|e| EvalError::Invalid(format!("serialising the report: {e}")))?;
    // Everything is rendered before the first file is written.
    let markdown = report.to_markdown();
    let svg = report.to_svg()?;
    let files = ReportFiles {
        json: dir.join(REPORT_JSON),
        markdown: dir.join(REPORT_MD),
        svg: dir.join(REPORT_SVG),
    };
    write_atomic(&files.json, format!("{json}\n").as_bytes())?;
    write_atomic(&files.markdown, markdown.as_bytes())?;
    write_atomic(&files.svg, svg.as_bytes())?;
    Ok(files)
}

/// Writes `bytes` to `path` through `.<name>.tmp-<pid>` in the same directory and a rename:
/// a reader sees the old content or the new, never a part; on error the temporary is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EvalError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| EvalError::Invalid(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_error(path, e));
    }
    Ok(())
}

/// Per-example values of one metric in one run, base and adapter measured on the same
/// examples (`base[i]` and `adapter[i]` belong to example `ids[i]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricSamples {
    pub suite: String,
    pub metric: String,
    pub higher_is_better: bool,
    /// Example ids aligned with the values; empty: examples are matched by position.
    #[serde(default)]
    pub ids: Vec<String>,
    pub base: Vec<f64>,
    pub adapter: Vec<f64>,
}

/// The per-example values of a whole run (`samples.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSamples {
    pub base: String,
    pub adapter: String,
    pub metrics: Vec<MetricSamples>,
}

/// What `--compare` reads from a run: its per-example values or only its report.
#[derive(Debug, Clone, PartialEq)]
pub enum RunResults {
    Samples(RunSamples),
    Report(Report),
}

impl RunResults {
    /// Reads `path`: a `samples.json` or `report.json` file, or a directory holding one of
    /// them (`samples.json` preferred, it allows exact paired intervals).
    pub fn load(path: &Path) -> Result<Self, EvalError> {
        let file = if path.is_dir() {
            let samples = path.join(SAMPLES_JSON);
            let report = path.join(REPORT_JSON);
            if samples.is_file() {
                samples
            } else if report.is_file() {
                report
            } else {
                return Err(EvalError::Invalid(format!(
                    "{}: neither {SAMPLES_JSON} nor {REPORT_JSON} in this directory \
                     (expected an eval run directory)",
                    path.display()
                )));
            }
        } else {
            path.to_path_buf()
        };
        let text = fs::read_to_string(&file).map_err(|e| io_error(&file, e))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| EvalError::Io {
            path: file.clone(),
            message: format!("not JSON: {e}"),
        })?;
        let parsed = if value.get("rows").is_some() {
            serde_json::from_value(value).map(RunResults::Report)
        } else if value.get("metrics").is_some() {
            serde_json::from_value(value).map(RunResults::Samples)
        } else {
            return Err(EvalError::Io {
                path: file,
                message: "expected a report (with \"rows\") or per-example samples \
                          (with \"metrics\")"
                    .into(),
            });
        };
        parsed.map_err(|e| EvalError::Io {
            path: file,
            message: e.to_string(),
        })
    }

    fn adapter_label(&self) -> &str {
        match self {
            RunResults::Samples(s) => &s.adapter,
            RunResults::Report(r) => &r.adapter,
        }
    }

    fn base_label(&self) -> &str {
        match self {
            RunResults::Samples(s) => &s.base,
            RunResults::Report(r) => &r.base,
        }
    }
}

/// Run A vs run B: the adapter of A in the `base` column, the adapter of B in the `adapter`
/// column, matched by suite/metric.
///
/// With the per-example values of both runs the examples are matched by id (by position when
/// a side has no ids) and every row gets the paired bootstrap interval of the delta. With a
/// report on either side only the values are known: rows that had a Wilson interval in B get
/// the Wilson interval of B's proportion again, the others no interval. Suites/metrics present
/// on one side only, and examples dropped by the matching, are listed in the notes.
pub fn compare(
    a_label: &str,
    a: &RunResults,
    b_label: &str,
    b: &RunResults,
    seed: u64,
) -> Result<Report, EvalError> {
    let mut report = Report::new(
        &format!("{a_label} vs {b_label}"),
        &format!("{a_label}: {}", a.adapter_label()),
        &format!("{b_label}: {}", b.adapter_label()),
    );
    if a.base_label() != b.base_label() {
        report.notes.push(format!(
            "the runs have different base models: {a_label} `{}`, {b_label} `{}`",
            a.base_label(),
            b.base_label()
        ));
    }
    match (a, b) {
        (RunResults::Samples(sa), RunResults::Samples(sb)) => {
            compare_samples(a_label, sa, b_label, sb, seed, &mut report)?
        }
        _ => {
            let ra = as_report(a, seed)?;
            let rb = as_report(b, seed)?;
            compare_reports(a_label, &ra, b_label, &rb, &mut report)?
        }
    }
    Ok(report)
}

fn as_report(r: &RunResults, seed: u64) -> Result<Report, EvalError> {
    match r {
        RunResults::Report(r) => Ok(r.clone()),
        RunResults::Samples(s) => Report::from_samples("", s, seed),
    }
}

fn compare_samples(
    a_label: &str,
    a: &RunSamples,
    b_label: &str,
    b: &RunSamples,
    seed: u64,
    report: &mut Report,
) -> Result<(), EvalError> {
    let b_index: HashMap<(&str, &str), &MetricSamples> = b
        .metrics
        .iter()
        .map(|m| ((m.suite.as_str(), m.metric.as_str()), m))
        .collect();
    for ma in &a.metrics {
        let Some(mb) = b_index.get(&(ma.suite.as_str(), ma.metric.as_str())) else {
            report
                .notes
                .push(format!("{}/{}: only in {a_label}", ma.suite, ma.metric));
            continue;
        };
        let (xa, xb, dropped) = match_examples(ma, mb)?;
        if dropped > 0 {
            report.notes.push(format!(
                "{}/{}: {dropped} examples not in both runs left out, {} compared",
                ma.suite,
                ma.metric,
                xa.len()
            ));
        }
        if xa.is_empty() {
            report
                .notes
                .push(format!("{}/{}: no examples in common", ma.suite, ma.metric));
            continue;
        }
        report.rows.push(MetricRow::paired(
            &ma.suite,
            &ma.metric,
            &xa,
            &xb,
            ma.higher_is_better,
            seed,
        )?);
    }
    note_only_in(report, b_label, &b.metrics, |m| {
        a.metrics
            .iter()
            .any(|x| x.suite == m.suite && x.metric == m.metric)
    });
    Ok(())
}

/// The adapter values of `a` and `b` on the examples both have: by id when both have ids,
/// else by position (equal lengths required). Also returns how many examples were dropped.
fn match_examples(
    a: &MetricSamples,
    b: &MetricSamples,
) -> Result<(Vec<f64>, Vec<f64>, usize), EvalError> {
    if a.ids.is_empty() || b.ids.is_empty() {
        if a.adapter.len() != b.adapter.len() {
            return Err(EvalError::Invalid(format!(
                "{}/{}: {} and {} examples without ids to match them by",
                a.suite,
                a.metric,
                a.adapter.len(),
                b.adapter.len()
            )));
        }
        return Ok((a.adapter.clone(), b.adapter.clone(), 0));
    }
    let b_by_id: HashMap<&str, f64> = b
        .ids
        .iter()
        .map(String::as_str)
        .zip(b.adapter.iter().copied())
        .collect();
    let (mut xa, mut xb) = (Vec::new(), Vec::new());
    for (id, &va) in a.ids.iter().zip(&a.adapter) {
        if let Some(&vb) = b_by_id.get(id.as_str()) {
            xa.push(va);
            xb.push(vb);
        }
    }
    let dropped = a.adapter.len() + b.adapter.len() - 2 * xa.len();
    Ok((xa, xb, dropped))
}

fn compare_reports(
    a_label: &str,
    a: &Report,
    b_label: &str,
    b: &Report,
    report: &mut Report,
) -> Result<(), EvalError> {
    let b_index: HashMap<(&str, &str), &MetricRow> = b
        .rows
        .iter()
        .map(|r| ((r.suite.as_str(), r.metric.as_str()), r))
        .collect();
    for ra in &a.rows {
        let Some(rb) = b_index.get(&(ra.suite.as_str(), ra.metric.as_str())) else {
            report
                .notes
                .push(format!("{}/{}: only in {a_label}", ra.suite, ra.metric));
            continue;
        };
        let mut row = MetricRow {
            suite: ra.suite.clone(),
            metric: ra.metric.clone(),
            base: ra.adapter,
            adapter: rb.adapter,
            delta: rb.adapter - ra.adapter,
            n: ra.n.min(rb.n),
            ci_low: f64::NAN,
            ci_high: f64::NAN,
            interval: INTERVAL_NONE.into(),
            higher_is_better: ra.higher_is_better,
        };
        if rb.interval == INTERVAL_WILSON && rb.n > 0 {
            let k = (rb.adapter * rb.n as f64).round() as usize;
            let ci = stats::wilson(k.min(rb.n), rb.n)?;
            row.ci_low = ci.low;
            row.ci_high = ci.high;
            row.interval = INTERVAL_WILSON.into();
            row.n = rb.n;
        }
        report.rows.push(row);
    }
    note_only_in(report, b_label, &b.rows, |r| {
        a.rows
            .iter()
            .any(|x| x.suite == r.suite && x.metric == r.metric)
    });
    report.notes.push(format!(
        "compared from reports without per-example values: no interval of the delta \
         (with {SAMPLES_JSON} in both runs every row gets a paired bootstrap interval)"
    ));
    Ok(())
}

trait SuiteMetric {
    fn key(&self) -> (&str, &str);
}
impl SuiteMetric for MetricSamples {
    fn key(&self) -> (&str, &str) {
        (&self.suite, &self.metric)
    }
}
impl SuiteMetric for MetricRow {
    fn key(&self) -> (&str, &str) {
        (&self.suite, &self.metric)
    }
}

fn note_only_in<T: SuiteMetric>(
    report: &mut Report,
    label: &str,
    items: &[T],
    in_other: impl Fn(&T) -> bool,
) {
    for item in items.iter().filter(|i| !in_other(i)) {
        let (suite, metric) = item.key();
        report
            .notes
            .push(format!("{suite}/{metric}: only in {label}"));
    }
}

fn render_svg(report: &Report) -> Result<String, Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};

    let labels: Vec<String> = report
        .rows
        .iter()
        .map(|r| format!("{}/{}", r.suite, r.metric))
        .collect();
    let groups = labels.len().max(1);
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let group_px = (longest as u32 * 7 + 16).max(110);
    let width = (groups as u32 * group_px + 120).max(640);
    let height = 440;

    let values = report
        .rows
        .iter()
        .flat_map(|r| [r.base, r.adapter])
        .filter(|v| v.is_finite());
    let (lo, hi) = values.fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (y_lo, y_hi) = if hi - lo > 0.0 {
        // Headroom for the value labels and the legend.
        let pad = (hi - lo) * 0.3;
        (if lo < 0.0 { lo - pad } else { 0.0 }, hi + pad)
    } else {
        (0.0, 1.0)
    };

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&report.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..groups as f64, y_lo..y_hi)?;
        // The x axis is drawn without labels; each group's "suite/metric" goes under its centre.
        let no_label = |_: &f64| String::new();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(TRANSPARENT)
            .x_label_formatter(&no_label)
            .y_desc("value")
            .draw()?;
        let label_style = ("sans-serif", 13)
            .into_font()
            .into_text_style(&root)
            .pos(Pos::new(HPos::Center, VPos::Top));
        for (i, label) in labels.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(i as f64 + 0.5, y_lo));
            root.draw(&Text::new(label.clone(), (px, py + 10), &label_style))?;
        }

        let base_colour = RGBColor(0x8c, 0x8c, 0x8c);
        let adapter_colour = RGBColor(0x1f, 0x77, 0xb4);
        let bars = |offset: f64, pick: fn(&MetricRow) -> f64| {
            report
                .rows
                .iter()
                .enumerate()
                .filter(move |(_, r)| pick(r).is_finite())
                .map(move |(i, r)| {
                    let x = i as f64 + offset;
                    ([(x, 0.0), (x + 0.35, pick(r))], pick(r))
                })
        };
        for (name, offset, colour, pick) in [
            (
                format!("base: {}", report.base),
                0.15,
                base_colour,
                (|r: &MetricRow| r.base) as fn(&MetricRow) -> f64,
            ),
            (
                format!("adapter: {}", report.adapter),
                0.5,
                adapter_colour,
                |r: &MetricRow| r.adapter,
            ),
        ] {
            chart
                .draw_series(
                    bars(offset, pick)
                        .map(move |(corners, _)| Rectangle::new(corners, colour.filled())),
                )?
                .label(name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled())
                });
            // The value above the bar (below it when negative).
            let value_style = ("sans-serif", 11).into_font().into_text_style(&root);
            chart.draw_series(bars(offset, pick).map(|(corners, v)| {
                let (x, y) = (corners[0].0 + 0.175, corners[1].1);
                let vpos = if v >= 0.0 { VPos::Bottom } else { VPos::Top };
                Text::new(
                    fmt_value(v),
                    (x, y),
                    value_style.pos(Pos::new(HPos::Center, vpos)),
                )
            }))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

fn mean_or_nan(xs: &[f64]) -> f64 {
    stats::mean(xs).unwrap_or(f64::NAN)
}

fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v != 0.0 && v.abs() < 0.001 {
        format!("{v:.2e}")
    } else if v.abs() >= 1000.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn fmt_signed(v: f64) -> String {
    if v.is_finite() && v >= 0.0 {
        format!("+{}", fmt_value(v))
    } else {
        fmt_value(v)
    }
}

/// A markdown table cell: no pipes or line breaks.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn io_error(path: &Path, e: std::io::Error) -> EvalError {
    EvalError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// `f64` fields that are NaN when absent: `null` in JSON (which has no NaN).
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bernoulli(n: usize, every: usize) -> Vec<f64> {
        (0..n)
            .map(|i| if i % every == 0 { 1.0 } else { 0.0 })
            .collect()
    }

    /// heldout/pass@1: 0.25 → 0.50 on 40 pairs (better, significant); heldout/loss: lower is
    /// better and goes down; humaneval/pass@1: 6/10 → 5/10 (worse, Wilson); repo/apply: same.
    fn sample_report() -> Report {
        let base = bernoulli(40, 4);
        let adapter = bernoulli(40, 2);
        let loss_base: Vec<f64> = (0..30).map(|i| 1.5 + 0.01 * i as f64).collect();
        let loss_adapter: Vec<f64> = loss_base.iter().map(|x| x - 0.25).collect();
        let mut r = Report::new("tiny: base vs adapter", "tiny", "tiny+runs/1");
        r.rows = vec![
            MetricRow::paired("heldout", "pass@1", &base, &adapter, true, 1).unwrap(),
            MetricRow::paired("heldout", "loss", &loss_base, &loss_adapter, false, 1).unwrap(),
            MetricRow::proportion("humaneval", "pass@1", 6, 5, 10, true).unwrap(),
            MetricRow::paired("repo", "apply", &[1.0, 0.0], &[1.0, 0.0], true, 1).unwrap(),
        ];
        r.notes.push("seed 1".into());
        r
    }

    fn table_rows(md: &str) -> Vec<Vec<String>> {
        md.lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| suite"))
            .map(|l| {
                l.trim_matches('|')
                    .split(" | ")
                    .map(|c| c.trim().to_string())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn rows_carry_means_deltas_and_intervals() {
        let r = sample_report();
        let p = &r.rows[0];
        assert_eq!((p.base, p.adapter, p.n), (0.25, 0.5, 40));
        assert!((p.delta - 0.25).abs() < 1e-12);
        assert!(p.ci_low > 0.0 && p.ci_low < p.delta && p.delta < p.ci_high);
        assert_eq!(p.significant(), Some(true));
        assert_eq!(p.verdict(), Verdict::Better);
        let loss = &r.rows[1];
        assert!(loss.delta < 0.0);
        assert_eq!(loss.verdict(), Verdict::Better);
        let he = &r.rows[2];
        assert_eq!(he.interval, INTERVAL_WILSON);
        assert_eq!(he.verdict(), Verdict::Worse);
        assert_eq!(he.significant(), None);
        let w = stats::wilson(5, 10).unwrap();
        assert_eq!((he.ci_low, he.ci_high), (w.low, w.high));
        assert_eq!(r.rows[3].verdict(), Verdict::Same);
    }

    #[test]
    fn markdown_table_has_one_row_per_metric_with_signed_deltas() {
        let md = sample_report().to_markdown();
        assert!(md.contains("| suite | metric | base | adapter | delta | n | 95% interval |"));
        let rows = table_rows(&md);
        assert_eq!(rows.len(), 4, "{md}");
        assert_eq!(rows[0][..2], ["heldout", "pass@1 ↑"]);
        assert_eq!(rows[0][2..4], ["0.250", "0.500"]);
        assert_eq!(rows[0][4], "**+0.250 (better)**");
        assert_eq!(rows[0][5], "40");
        assert!(rows[0][6].starts_with("Δ [+0."), "{}", rows[0][6]);
        assert_eq!(rows[1][1], "loss ↓");
        assert_eq!(rows[1][4], "**-0.250 (better)**");
        assert_eq!(rows[2][0], "humaneval");
        assert_eq!(rows[2][4], "-0.100 (worse)");
        assert_eq!(rows[2][6], "adapter [0.237, 0.763] Wilson");
        assert_eq!(rows[3][4], "+0.000 (same)");
        assert!(md.contains("## Notes\n\n- seed 1\n"));
    }

    #[test]
    fn markdown_cells_cannot_break_the_table() {
        let mut r = sample_report();
        r.rows[0].suite = "a|b\nc".into();
        let rows = table_rows(&r.to_markdown());
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0][0], "a\\|b c");
    }

    #[test]
    fn svg_has_a_bar_per_value_and_the_suite_names() {
        let mut r = sample_report();
        r.rows[3].suite = "a<b&c".into();
        let svg = r.to_svg().unwrap();
        assert!(svg.trim_start().starts_with("<svg"), "{}", &svg[..80]);
        assert!(svg.trim_end().ends_with("</svg>"));
        // Background + 2 bars per row + 2 legend swatches (+ the legend box).
        let rects = svg.matches("<rect").count();
        assert!(rects > 2 * r.rows.len(), "{rects} rects");
        for suite in ["heldout", "humaneval", "a&lt;b&amp;c"] {
            assert!(svg.contains(suite), "{suite} missing");
        }
        assert!(!svg.contains("a<b"));
        assert!(svg.contains("tiny+runs/1"), "legend names the adapter");
        // Balanced tags: every opened element is closed (or self-closing).
        let opened = svg.matches('<').count() - svg.matches("</").count() * 2;
        assert_eq!(opened, svg.matches("/>").count(), "unbalanced tags");
    }

    #[test]
    fn svg_of_an_empty_or_negative_report_draws() {
        let mut r = Report::new("empty", "b", "a");
        assert!(r.to_svg().unwrap().contains("<svg"));
        r.rows
            .push(MetricRow::paired("s", "m", &[-1.0, -2.0], &[-0.5, -1.5], true, 0).unwrap());
        assert!(r.to_svg().unwrap().contains("s/m"));
    }

    #[test]
    fn json_round_trips_and_missing_intervals_are_null() {
        let dir = tempfile::tempdir().unwrap();
        let r = sample_report();
        let files = write_report(&r, dir.path()).unwrap();
        let text = fs::read_to_string(&files.json).unwrap();
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);

        let mut none = r.rows[0].clone();
        none.ci_low = f64::NAN;
        none.ci_high = f64::NAN;
        none.interval = INTERVAL_NONE.into();
        let json = serde_json::to_string(&none).unwrap();
        assert!(json.contains("\"ci_low\":null,\"ci_high\":null"), "{json}");
        let back: MetricRow = serde_json::from_str(&json).unwrap();
        assert!(back.ci_low.is_nan() && back.ci_high.is_nan());
        assert!(none.to_owned().significant().is_none());
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn write_report_replaces_files_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("eval");
        fs::create_dir(&out).unwrap();
        fs::write(out.join(REPORT_MD), "old").unwrap();
        let files = write_report(&sample_report(), &out).unwrap();
        assert_eq!(listing(&out), ["report.json", "report.md", "report.svg"]);
        assert!(fs::read_to_string(files.markdown)
            .unwrap()
            .starts_with("# tiny"));
        // Again over the existing files.
        write_report(&sample_report(), &out).unwrap();
        assert_eq!(listing(&out), ["report.json", "report.md", "report.svg"]);
    }

    #[test]
    fn a_failed_write_names_the_file_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        // The target is a directory: the rename fails after the temporary was written.
        fs::create_dir(dir.path().join(REPORT_JSON)).unwrap();
        fs::write(dir.path().join(REPORT_JSON).join("keep"), "x").unwrap();
        let e = write_report(&sample_report(), dir.path()).unwrap_err();
        assert!(e.to_string().contains(REPORT_JSON), "{e}");
        assert_eq!(listing(dir.path()), ["report.json"]);
        assert_eq!(listing(&dir.path().join(REPORT_JSON)), ["keep"]);
    }

    fn samples(adapter: &str, ids: &[&str], values: &[f64]) -> RunSamples {
        RunSamples {
            base: "tiny".into(),
            adapter: adapter.into(),
            metrics: vec![
                MetricSamples {
                    suite: "heldout".into(),
                    metric: "pass@1".into(),
                    higher_is_better: true,
                    ids: ids.iter().map(|s| s.to_string()).collect(),
                    base: vec![0.0; values.len()],
                    adapter: values.to_vec(),
                },
                MetricSamples {
                    suite: format!("only-{adapter}"),
                    metric: "loss".into(),
                    higher_is_better: false,
                    ids: vec![],
                    base: vec![1.0],
                    adapter: vec![0.5],
                },
            ],
        }
    }

    #[test]
    fn compare_two_runs_pairs_examples_by_id() {
        let a = samples("A", &["e1", "e2", "e3", "e4"], &[1.0, 0.0, 0.0, 1.0]);
        let b = samples("B", &["e4", "e3", "e2", "e5"], &[1.0, 1.0, 1.0, 0.0]);
        let r = compare(
            "runs/a",
            &RunResults::Samples(a),
            "runs/b",
            &RunResults::Samples(b),
            0,
        )
        .unwrap();
        assert_eq!(r.title, "runs/a vs runs/b");
        assert_eq!(r.base, "runs/a: A");
        assert_eq!(r.adapter, "runs/b: B");
        assert_eq!(r.rows.len(), 1);
        let row = &r.rows[0];
        // Common examples e2, e3, e4: A = 0, 0, 1; B = 1, 1, 1.
        assert_eq!(row.n, 3);
        assert!((row.base - 1.0 / 3.0).abs() < 1e-12 && row.adapter == 1.0);
        assert_eq!(row.interval, INTERVAL_BOOTSTRAP);
        assert!(row.contains_delta());
        let notes = r.notes.join("\n");
        assert!(notes.contains("heldout/pass@1: 2 examples not in both runs left out, 3 compared"));
        assert!(notes.contains("only-A/loss: only in runs/a"), "{notes}");
        assert!(notes.contains("only-B/loss: only in runs/b"), "{notes}");
    }

    #[test]
    fn compare_two_reports_keeps_values_and_redraws_wilson() {
        let a = sample_report();
        let mut b = sample_report();
        b.adapter = "tiny+runs/2".into();
        b.rows[2] = MetricRow::proportion("humaneval", "pass@1", 6, 8, 10, true).unwrap();
        let r = compare("a", &RunResults::Report(a), "b", &RunResults::Report(b), 0).unwrap();
        assert_eq!(r.rows.len(), 4);
        let he = &r.rows[2];
        assert_eq!((he.base, he.adapter), (0.5, 0.8));
        assert!((he.delta - 0.3).abs() < 1e-12);
        assert_eq!(he.interval, INTERVAL_WILSON);
        assert!((he.ci_low - 0.490162).abs() < 1e-6 && (he.ci_high - 0.943318).abs() < 1e-6);
        assert_eq!(r.rows[0].interval, INTERVAL_NONE);
        assert!(r.rows[0].ci_low.is_nan());
        assert!(r
            .notes
            .iter()
            .any(|n| n.contains("without per-example values")));
        // A report with missing intervals still renders.
        assert!(r
            .to_markdown()
            .contains("| heldout | pass@1 ↑ | 0.500 | 0.500 | +0.000 (same) | 40 | – |"));
    }

    #[test]
    fn compare_loads_run_directories_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let (ra, rb) = (dir.path().join("a"), dir.path().join("b"));
        // Run a has per-example values and a report: the values win.
        write_report(&sample_report(), &ra).unwrap();
        let a = samples("A", &[], &[1.0, 0.0]);
        fs::write(ra.join(SAMPLES_JSON), serde_json::to_string(&a).unwrap()).unwrap();
        write_report(&sample_report(), &rb).unwrap();
        assert_eq!(RunResults::load(&ra).unwrap(), RunResults::Samples(a));
        let b = RunResults::load(&rb.join(REPORT_JSON)).unwrap();
        assert!(matches!(b, RunResults::Report(_)));
        let r = compare("a", &RunResults::load(&ra).unwrap(), "b", &b, 0).unwrap();
        assert_eq!(r.rows.len(), 1, "only heldout/pass@1 is in both");

        let empty = dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        let e = RunResults::load(&empty).unwrap_err().to_string();
        assert!(e.contains("neither samples.json nor report.json"), "{e}");
        fs::write(empty.join(REPORT_JSON), "{\"x\": 1}").unwrap();
        let e = RunResults::load(&empty).unwrap_err().to_string();
        assert!(e.contains("report.json") && e.contains("\"rows\""), "{e}");
    }

    #[test]
    fn samples_with_mismatched_lengths_are_refused_by_name() {
        let mut s = samples("A", &[], &[1.0, 0.0]);
        s.metrics[0].base.pop();
        let e = Report::from_samples("t", &s, 0).unwrap_err().to_string();
        assert!(
            e.contains("heldout/pass@1: 1 base values and 2 adapter values"),
            "{e}"
        );
    }

    impl MetricRow {
        fn contains_delta(&self) -> bool {
            self.ci_low <= self.delta && self.delta <= self.ci_high
        }
    }
}
