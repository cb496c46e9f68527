//! Scheduled retraining through the binary: `finetune run --incremental` promotes a first
//! adapter, keeps the current one when a worse run comes, promotes a better one, does nothing
//! without new commits, refuses to overlap a running job; `finetune schedule` writes the files.

mod common;
use common::*;
use std::path::Path;

fn run_incremental(repo: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "run",
        "--incremental",
        "--repo",
        repo.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--rank",
        "4",
        "--seq-len",
        "384",
        "--micro-batch",
        "1",
        "--max-new-tokens",
        "8",
        "--heldout",
        "0.25",
    ];
    if !extra.contains(&"--warmup") {
        args.extend(["--warmup", "1"]);
    }
    args.extend_from_slice(extra);
    finetune(&args)
}

fn registry(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("registry.json")).unwrap()).unwrap()
}

#[test]
fn the_registry_promotes_only_better_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, out) = (dir.path().join("repo"), dir.path().join("out"));
    add_commits(&repo, 0..12);

    // First run: nothing to beat.
    let o = run_incremental(&repo, &out, &["--max-steps", "20", "--lr", "2e-2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = registry(&out);
    let first = r["current"]["run"].as_str().unwrap().to_string();
    assert_eq!(r["history"][0]["reason"], "first adapter");
    let link = std::fs::read_link(out.join("current")).unwrap();
    assert_eq!(link, Path::new(&format!("runs/{first}/adapter")));
    assert!(out.join("current/adapter_model.safetensors").is_file());

    // No new commits: nothing is trained.
    let runs = std::fs::read_dir(out.join("runs")).unwrap().count();
    let o = run_incremental(&repo, &out, &["--max-steps", "20", "--lr", "2e-2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("no new commits"));
    assert_eq!(std::fs::read_dir(out.join("runs")).unwrap().count(), runs);

    // New commits and an absurd learning rate: the run fails (non-finite steps); the registry
    // and the link stay as they were. (lr 1e25: the first update makes the adapter overflow
    // f32 in the next forward. lr 3 diverged only by chance of rounding, and stopped doing so
    // when the CPU kernels changed their summation order.)
    add_commits(&repo, 12..16);
    let before = std::fs::read(out.join("registry.json")).unwrap();
    let o = run_incremental(
        &repo,
        &out,
        &[
            "--max-steps",
            "6",
            "--lr",
            "1e25",
            "--warmup",
            "0",
            "--max-grad-norm",
            "0",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("registry.json")).unwrap(), before);
    assert!(
        !out.join(".finetune.lock").exists(),
        "the lock is released after a failure"
    );

    // A destructive but finite learning rate: a worse adapter, not promoted.
    add_commits(&repo, 16..18);
    let o = run_incremental(
        &repo,
        &out,
        &["--max-steps", "3", "--lr", "0.3", "--warmup", "0"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("not promoted"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let r = registry(&out);
    assert_eq!(r["current"]["run"], first.as_str());
    let worse = &r["history"][1];
    assert_eq!(worse["promoted"], false);
    assert!(
        worse["heldout_loss"].as_f64().unwrap() > worse["current_loss"].as_f64().unwrap(),
        "{worse}"
    );
    assert_eq!(
        std::fs::read_link(out.join("current")).unwrap(),
        Path::new(&format!("runs/{first}/adapter"))
    );

    // More commits and more training from the current adapter: better, promoted.
    add_commits(&repo, 18..22);
    let o = run_incremental(&repo, &out, &["--max-steps", "30", "--lr", "2e-2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = registry(&out);
    let better = &r["history"][2];
    assert_eq!(better["promoted"], true, "{better}");
    assert!(better["heldout_loss"].as_f64().unwrap() < better["current_loss"].as_f64().unwrap());
    assert_ne!(r["current"]["run"], first.as_str());
    assert_eq!(
        std::fs::read_link(out.join("current")).unwrap(),
        Path::new(better["adapter"].as_str().unwrap())
    );
}

#[test]
fn a_running_job_holds_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, out) = (dir.path().join("repo"), dir.path().join("out"));
    add_commits(&repo, 0..4);
    std::fs::create_dir_all(&out).unwrap();
    // This test process stands for the running job.
    let host = gethostname_of_this_machine();
    std::fs::write(
        out.join(".finetune.lock"),
        format!("{} {host} now\n", std::process::id()),
    )
    .unwrap();
    let o = run_incremental(&repo, &out, &["--max-steps", "1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("another finetune run holds this output directory"),
        "{}",
        stderr(&o)
    );
    assert!(!out.join("runs").exists());
}

fn gethostname_of_this_machine() -> String {
    let o = std::process::Command::new("hostname").output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn schedule_writes_cron_systemd_and_kubernetes_files() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, out) = (dir.path().join("repo"), dir.path().join("out"));
    add_commits(&repo, 0..2);
    let sched = |emit: &str, every: &str| {
        finetune(&[
            "schedule",
            "--repo",
            repo.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--emit",
            emit,
            "--every",
            every,
        ])
    };
    let o = sched("cron", "1d");
    assert!(o.status.success(), "{}", stderr(&o));
    let cron = std::fs::read_to_string(out.join("schedule/finetune.cron")).unwrap();
    let line = cron.lines().find(|l| !l.starts_with('#')).unwrap();
    assert!(
        line.starts_with("0 3 * * * ")
            && line.contains(" run --incremental --repo ")
            && line.contains(out.to_str().unwrap()),
        "{line}"
    );
    let o = sched("systemd", "30 2 * * *");
    assert!(o.status.success(), "{}", stderr(&o));
    let timer = std::fs::read_to_string(out.join("schedule/finetune-retrain.timer")).unwrap();
    assert!(timer.contains("OnCalendar=*-*-* 02:30:00"), "{timer}");
    let service = std::fs::read_to_string(out.join("schedule/finetune-retrain.service")).unwrap();
    assert!(
        service.contains("ExecStart=") && service.contains("--incremental"),
        "{service}"
    );
    let o = sched("k8s", "6h");
    assert!(o.status.success(), "{}", stderr(&o));
    let k8s = std::fs::read_to_string(out.join("schedule/cronjob.yaml")).unwrap();
    assert!(
        k8s.contains("kind: CronJob")
            && k8s.contains("schedule: \"0 */6 * * *\"")
            && k8s.contains("nvidia.com/gpu: 1")
            && k8s.contains("concurrencyPolicy: Forbid"),
        "{k8s}"
    );
    let o = sched("cron", "25h");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--every"), "{}", stderr(&o));
}
