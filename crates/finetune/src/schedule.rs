//! `finetune schedule`: the files that rerun `finetune run --incremental` on a schedule — a
//! crontab line, a systemd service + timer, or a Kubernetes CronJob — written into
//! `<out>/schedule/` and printed.

use crate::cli::{Emit, ScheduleArgs};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// A schedule as a cron expression and a systemd `OnCalendar` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct When {
    pub cron: String,
    pub on_calendar: String,
}

/// `1d` (daily at 03:00), `1w` (Sundays at 03:00), `Nh` (every N hours, N in 1..=23), or a
/// five-field cron expression (systemd accepts only `M H * * *` and `M H * * D` forms of it).
pub fn parse_every(every: &str) -> Result<When> {
    let e = every.trim();
    if e == "1d" {
        return Ok(When {
            cron: "0 3 * * *".into(),
            on_calendar: "*-*-* 03:00:00".into(),
        });
    }
    if e == "1w" {
        return Ok(When {
            cron: "0 3 * * 0".into(),
            on_calendar: "Sun *-*-* 03:00:00".into(),
        });
    }
    if let Some(h) = e.strip_suffix('h').and_then(|h| h.parse::<u32>().ok()) {
        if !(1..=23).contains(&h) {
            bail!("flag --every: `{every}`: hours must be 1 to 23 (use 1d for daily)");
        }
        return Ok(When {
            cron: format!("0 */{h} * * *"),
            on_calendar: format!("*-*-* 00/{h}:00:00"),
        });
    }
    let fields: Vec<&str> = e.split_whitespace().collect();
    if fields.len() != 5 {
        bail!("flag --every: `{every}`: expected 1d, 1w, Nh or a cron expression of 5 fields (minute hour day month weekday)");
    }
    let num = |s: &str, max: u32| s.parse::<u32>().ok().filter(|v| *v <= max);
    let on_calendar = match (
        num(fields[0], 59),
        num(fields[1], 23),
        fields[2],
        fields[3],
        fields[4],
    ) {
        (Some(m), Some(h), "*", "*", "*") => format!("*-*-* {h:02}:{m:02}:00"),
        (Some(m), Some(h), "*", "*", d) => match num(d, 7) {
            Some(d) => format!(
                "{} *-*-* {h:02}:{m:02}:00",
                ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][d as usize]
            ),
            None => String::new(),
        },
        _ => String::new(),
    };
    Ok(When {
        cron: fields.join(" "),
        on_calendar,
    })
}

fn quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-=:".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// `finetune schedule`.
pub fn command(args: &ScheduleArgs) -> Result<crate::Outcome> {
    let Some(resolved) = crate::resolve(&args.recipe)? else {
        return Ok(crate::Outcome::Done);
    };
    resolved.check_repo()?;
    resolved.check_model_dir()?;
    let when = parse_every(&args.every)?;
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let repo = abs(&resolved.recipe.mine.repo);
    let out = abs(&resolved.recipe.run.out);
    let exe = std::env::current_exe().context("locating the finetune binary")?;
    let mut argv = vec![
        exe.display().to_string(),
        "run".into(),
        "--incremental".into(),
        "--repo".into(),
        repo.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    if let Some(r) = &resolved.file {
        argv.extend(["--recipe".into(), abs(r).display().to_string()]);
    }
    let line = argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ");
    let dir = out.join("schedule");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut files: Vec<(String, String)> = Vec::new();
    match args.emit {
        Emit::Cron => files.push((
            "finetune.cron".into(),
            format!(
                "# finetune: retrain on {} ({})\n{} {line} >> {}/schedule/finetune.log 2>&1\n",
                repo.display(),
                args.every,
                when.cron,
                out.display()
            ),
        )),
        Emit::Systemd => {
            if when.on_calendar.is_empty() {
                bail!("flag --every: `{}`: systemd timers are written for 1d, 1w, Nh or cron expressions of the form `M H * * *` / `M H * * D`", args.every);
            }
            files.push((
                "finetune-retrain.service".into(),
                format!(
                    "[Unit]\nDescription=finetune: retrain the LoRA adapter of {repo}\nAfter=network-online.target\n\n[Service]\nType=oneshot\nWorkingDirectory={out}\nExecStart={line}\n",
                    repo = repo.display(),
                    out = out.display()
                ),
            ));
            files.push((
                "finetune-retrain.timer".into(),
                format!("[Unit]\nDescription=finetune: retrain {} ({})\n\n[Timer]\nOnCalendar={}\nPersistent=true\n\n[Install]\nWantedBy=timers.target\n", repo.display(), args.every, when.on_calendar),
            ));
        }
        Emit::K8s => {
            let gpus = resolved.recipe.train.gpus.max(1);
            let mut k8s_args = vec![
                "run".to_string(),
                "--incremental".into(),
                "--repo".into(),
                "/repo".into(),
                "--out".into(),
                "/out".into(),
            ];
            if resolved.file.is_some() {
                k8s_args.extend(["--recipe".into(), "/out/recipe.toml".into()]);
            }
            let args_yaml: String = k8s_args
                .iter()
                .map(|a| {
                    format!(
                        "            - {}\n",
                        serde_json::to_string(a).unwrap_or_default()
                    )
                })
                .collect();
            files.push((
                "cronjob.yaml".into(),
                format!(
"# finetune: retrain on a schedule. Build an image holding the finetune binary (with --features cuda
# for GPUs) as `finetune:latest`, put the repository on the `finetune-repo` volume and give the
# `finetune-out` volume room for runs; concurrencyPolicy Forbid and finetune's own lock keep
# runs from overlapping.{recipe_note}
apiVersion: batch/v1
kind: CronJob
metadata:
  name: finetune-retrain
spec:
  schedule: \"{cron}\"
  concurrencyPolicy: Forbid
  successfulJobsHistoryLimit: 3
  failedJobsHistoryLimit: 3
  jobTemplate:
    spec:
      backoffLimit: 0
      template:
        spec:
          restartPolicy: Never
          containers:
          - name: finetune
            image: finetune:latest
            command: [\"finetune\"]
            args:
{args_yaml}            resources:
              limits:
                nvidia.com/gpu: {gpus}
            volumeMounts:
            - name: repo
              mountPath: /repo
            - name: out
              mountPath: /out
          volumes:
          - name: repo
            persistentVolumeClaim:
              claimName: finetune-repo
          - name: out
            persistentVolumeClaim:
              claimName: finetune-out
",
                    cron = when.cron,
                    recipe_note = if resolved.file.is_some() { "\n# Copy the recipe to /out/recipe.toml on the finetune-out volume." } else { "" },
                ),
            ));
        }
    }
    for (name, text) in &files {
        crate::run_dir::write_atomic(&dir.join(name), text.as_bytes())?;
        println!("# {}\n{text}", dir.join(name).display());
    }
    match args.emit {
        Emit::Cron => eprintln!("schedule: install with `crontab -l | cat - {} | crontab -`", dir.join("finetune.cron").display()),
        Emit::Systemd => eprintln!("schedule: install with `cp {0}/finetune-retrain.* /etc/systemd/system/ && systemctl enable --now finetune-retrain.timer`", dir.display()),
        Emit::K8s => eprintln!("schedule: install with `kubectl apply -f {}`", dir.join("cronjob.yaml").display()),
    }
    Ok(crate::Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_becomes_cron_and_on_calendar() {
        assert_eq!(
            parse_every("1d").unwrap(),
            When {
                cron: "0 3 * * *".into(),
                on_calendar: "*-*-* 03:00:00".into()
            }
        );
        assert_eq!(parse_every("1w").unwrap().on_calendar, "Sun *-*-* 03:00:00");
        assert_eq!(parse_every("6h").unwrap().cron, "0 */6 * * *");
        assert_eq!(
            parse_every("30 2 * * *").unwrap().on_calendar,
            "*-*-* 02:30:00"
        );
        assert_eq!(
            parse_every("0 4 * * 1").unwrap().on_calendar,
            "Mon *-*-* 04:00:00"
        );
        assert_eq!(parse_every("*/15 * * * *").unwrap().on_calendar, "");
        for bad in ["2x", "0h", "24h", "* * *"] {
            assert!(
                parse_every(bad)
                    .unwrap_err()
                    .to_string()
                    .contains("--every"),
                "{bad}"
            );
        }
    }
}
