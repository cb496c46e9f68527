//! `finetune bench train` through the binary, on the CPU and the committed tiny fixtures: the
//! JSON it prints carries the step times it measured and the losses of the training loop.

mod common;
use common::{finetune, stderr};
use std::path::Path;

fn fixture(kind: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../datasets/fixtures/tiny-qwen3-moe")
        .join(kind)
        .display()
        .to_string()
}

#[test]
fn bench_train_reports_step_times_and_a_falling_loss() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    for (kind, moe) in [("bf16", "per-expert"), ("fp8", "batched")] {
        let o = finetune(&[
            "bench",
            "train",
            "--cpu",
            "--model",
            &fixture(kind),
            "--seq",
            "48",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--rank",
            "4",
            "--moe",
            moe,
            "--json",
            json.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{kind}: {}", stderr(&o));
        let line = String::from_utf8(o.stdout).unwrap();
        let printed: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(printed, written, "{kind}");
        assert_eq!(printed["moe"], moe, "{kind}");
        assert_eq!(
            printed["step_secs"].as_array().unwrap().len(),
            3,
            "{kind}: measured steps"
        );
        let losses: Vec<f64> = printed["losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(losses.len(), 4, "{kind}: warm-up + measured steps");
        assert!(losses.iter().all(|l| l.is_finite()), "{kind}: {losses:?}");
        assert!(
            losses[3] < losses[0],
            "{kind}: training lowers the loss: {losses:?}"
        );
        let tps = printed["tokens_per_sec"].as_f64().unwrap();
        assert!(tps.is_finite() && tps > 0.0, "{kind}: {tps}");
    }
}

#[test]
fn bench_train_refuses_bf16_on_the_cpu_and_a_missing_model() {
    let o = finetune(&[
        "bench",
        "train",
        "--cpu",
        "--bf16",
        "--model",
        &fixture("bf16"),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("needs a GPU"), "{}", stderr(&o));
    let o = finetune(&["bench", "train", "--model", "/nonexistent/model"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("/nonexistent/model/config.json"),
        "{}",
        stderr(&o)
    );
}
