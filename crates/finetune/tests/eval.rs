//! `finetune eval` through the binary: the report of a trained adapter, a damaged adapter
//! scoring worse, endpoint mode against a local OpenAI-compatible server, and `--compare`.

mod common;
use common::*;
use std::path::Path;

fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

fn row<'a>(r: &'a serde_json::Value, suite: &str, metric: &str) -> &'a serde_json::Value {
    r["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["suite"] == suite && row["metric"] == metric)
        .unwrap_or_else(|| panic!("no {suite}/{metric} row in {r}"))
}

/// A trained run: 30 fast steps on the fixture repository, on the random tiny base (at this
/// learning rate an adapter learns the fixture's pattern from scratch; on the pretrained base
/// 30 steps of 2e-2 overshoot its two held-out pairs).
fn trained(dir: &Path) -> std::path::PathBuf {
    let data = mined(dir);
    let run = dir.join("run");
    let o = train(
        &data,
        &run,
        &[
            "--max-steps",
            "30",
            "--lr",
            "2e-2",
            "--model",
            "tiny-random",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::create_dir_all(run.join("data")).unwrap();
    for f in ["train.jsonl", "heldout.jsonl", "manifest.json"] {
        std::fs::copy(data.join(f), run.join("data").join(f)).unwrap();
    }
    run
}

#[test]
fn eval_reports_real_numbers_and_a_damaged_adapter_scores_worse() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained(dir.path());
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--run",
            run.to_str().unwrap(),
            "--max-new-tokens",
            "24",
            "--seq-len",
            "384",
            "-q",
        ];
        args.extend_from_slice(extra);
        finetune(&args)
    };
    let o = eval(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["report.json", "report.md", "report.svg", "samples.json"] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    let r = report(&run);
    let loss = row(&r, "repo-heldout", "loss");
    let (base, trained_loss) = (
        loss["base"].as_f64().unwrap(),
        loss["adapter"].as_f64().unwrap(),
    );
    assert!(
        base.is_finite() && trained_loss.is_finite() && loss["n"].as_u64().unwrap() >= 2,
        "{loss}"
    );
    assert!(
        trained_loss < base,
        "the trained adapter must beat the random base: {loss}"
    );
    for metric in ["applies cleanly", "exact match", "similarity"] {
        let v = row(&r, "repo-heldout", metric);
        assert!(
            v["base"].as_f64().is_some() && v["adapter"].as_f64().is_some(),
            "{v}"
        );
    }
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(md.contains("| repo-heldout | loss"), "{md}");
    assert!(std::fs::read_to_string(run.join("report.svg"))
        .unwrap()
        .contains("<svg"));
    assert!(String::from_utf8_lossy(&o.stdout).contains("| suite | metric |"));

    // The same adapter with its B matrices scaled by 30: a damaged adapter, worse held-out loss.
    let damaged = dir.path().join("damaged");
    std::fs::create_dir_all(&damaged).unwrap();
    std::fs::copy(
        run.join("adapter/adapter_config.json"),
        damaged.join("adapter_config.json"),
    )
    .unwrap();
    let tensors = candle_core::safetensors::load(
        run.join("adapter/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let tensors: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, t)| {
            let t = if k.contains("lora_B") {
                (t * 30.0).unwrap()
            } else {
                t
            };
            (k, t)
        })
        .collect();
    candle_core::safetensors::save(&tensors, damaged.join("adapter_model.safetensors")).unwrap();
    let out = dir.path().join("damaged-report");
    let o = eval(&[
        "--adapter",
        damaged.to_str().unwrap(),
        "--report-dir",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let damaged_loss = row(&report(&out), "repo-heldout", "loss")["adapter"]
        .as_f64()
        .unwrap();
    assert!(
        damaged_loss > trained_loss + 0.1,
        "damaged {damaged_loss} vs trained {trained_loss}"
    );

    // --compare: the trained run against the damaged evaluation.
    let cmp = dir.path().join("cmp");
    let o = finetune(&[
        "eval",
        "--compare",
        run.to_str().unwrap(),
        out.to_str().unwrap(),
        "--report-dir",
        cmp.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let c = report(&cmp);
    let l = row(&c, "repo-heldout", "loss");
    assert!(
        (l["base"].as_f64().unwrap() - trained_loss).abs() < 1e-9
            && (l["adapter"].as_f64().unwrap() - damaged_loss).abs() < 1e-9,
        "{l}"
    );
}

#[test]
fn endpoint_mode_scores_generated_edits_from_a_served_model() {
    use finetune_eval::testing::TestServer;
    let dir = tempfile::tempdir().unwrap();
    let run = trained(dir.path());
    // The "served adapter" answers with the prompt's first line, the "base" with nothing useful.
    let server = TestServer::start_with(|req| {
        if req.model == "repo-lora" {
            "src/lib.rs\n<<<<<<< SEARCH\n=======\nx\n>>>>>>> REPLACE\n".to_string()
        } else {
            "no idea".to_string()
        }
    });
    let o = finetune(&[
        "eval",
        "--run",
        run.to_str().unwrap(),
        "--endpoint",
        &server.url(),
        "--endpoint-base",
        "tiny-base",
        "--endpoint-adapter",
        "repo-lora",
        "--concurrency",
        "2",
        "--max-new-tokens",
        "16",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = report(&run);
    let sim = row(&r, "repo-heldout", "similarity");
    assert!(sim["n"].as_u64().unwrap() >= 2, "{sim}");
    assert!(
        r["rows"]
            .as_array()
            .unwrap()
            .iter()
            .all(|row| row["metric"] != "loss"),
        "no loss without the local model"
    );
    assert!(
        r["notes"].to_string().contains("endpoint"),
        "{}",
        r["notes"]
    );
    let models: std::collections::BTreeSet<String> = server
        .requests()
        .iter()
        .filter_map(|q| q.completion.as_ref().map(|c| c.model.clone()))
        .collect();
    assert_eq!(
        models.into_iter().collect::<Vec<_>>(),
        ["repo-lora", "tiny-base"]
    );
    assert!(server.max_in_flight() <= 2);
}

/// The suites that run code: pr-replay (the fixture's own test command: lib.rs still parses as
/// the file it was, i.e. the real change replays green), HumanEval (3 problems) and a user
/// suite, each in the report for base and adapter.
#[test]
fn code_suites_run_in_the_sandbox_and_reach_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained(dir.path());
    let suite = dir.path().join("suite.jsonl");
    std::fs::write(
        &suite,
        concat!(
            r#"{"id": "one", "prompt": "def one():\n", "test": "assert one() == 1\n", "language": "python"}"#, "\n",
            r#"{"id": "echo", "prompt": "echo ", "test": "\ntrue\n", "language": "bash"}"#, "\n",
        ),
    )
    .unwrap();
    let suites = format!("repo-heldout,pr-replay,humaneval,{}", suite.display());
    let o = finetune(&[
        "eval",
        "--run",
        run.to_str().unwrap(),
        "--suites",
        &suites,
        "--test-cmd",
        "grep -q 'pub fn add_' lib.rs",
        "--max-examples",
        "3",
        "--max-new-tokens",
        "16",
        "--seq-len",
        "384",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = report(&run);
    let replay = row(&r, "pr-replay", "green first try");
    assert!(replay["n"].as_u64().unwrap() >= 1, "{replay}");
    let he = row(&r, "humaneval", "pass@1");
    assert_eq!(he["n"], 3);
    let user = row(&r, suite.to_str().unwrap(), "pass@1");
    assert_eq!(user["n"], 2);
    // bash `echo <anything>` then `true` passes whatever was generated.
    let samples: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("samples.json")).unwrap()).unwrap();
    let user_samples = samples["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["suite"] == suite.to_str().unwrap())
        .unwrap();
    assert_eq!(user_samples["base"][1], 1.0, "{user_samples}");
}
