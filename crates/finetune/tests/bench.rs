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

/// `finetune bench kernels` on the CPU at the tiny preset's shapes: one row per op with the
/// work the module documents (checked here from the preset's numbers by hand), positive times
/// and a baseline measured in the same run.
#[test]
fn bench_kernels_reports_every_op_with_its_work_and_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("kernels.jsonl");
    let o = finetune(&[
        "bench",
        "kernels",
        "--cpu",
        "--preset",
        "tiny",
        "--seq",
        "64",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&json)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ops: Vec<&str> = rows.iter().map(|r| r["op"].as_str().unwrap()).collect();
    assert_eq!(
        ops,
        [
            "frozen_linear",
            "lora_linear",
            "grouped_linear",
            "causal_attention",
            "linear_cross_entropy",
            "rms_norm",
            "swiglu",
            "rope"
        ]
    );
    let work = |op: &str| {
        rows.iter().find(|r| r["op"] == op).unwrap()["work"]
            .as_f64()
            .unwrap()
    };
    // tiny: hidden 128, 4 heads of 32, 8 experts of 128 with 2 active, vocabulary 8192; T = 64.
    assert_eq!(work("frozen_linear"), 2.0 * 64.0 * 128.0 * 128.0);
    assert_eq!(work("grouped_linear"), 2.0 * (64.0 * 2.0) * 128.0 * 128.0);
    assert_eq!(work("causal_attention"), 2.0 * 64.0 * 64.0 * 32.0 * 4.0);
    assert_eq!(work("linear_cross_entropy"), 4.0 * 64.0 * 128.0 * 8192.0);
    assert_eq!(work("rms_norm"), 2.0 * 64.0 * 128.0 * 4.0);
    for r in &rows {
        for key in ["fwd_s", "baseline_s", "fwd_rate", "baseline_rate", "ratio"] {
            let v = r[key].as_f64().unwrap();
            assert!(v.is_finite() && v > 0.0, "{}: {key} = {v}", r["op"]);
        }
    }
    let printed = String::from_utf8_lossy(&o.stdout);
    assert!(
        printed.contains("finetune bench kernels --preset tiny --seq 64"),
        "{printed}"
    );
    let o = finetune(&["bench", "kernels", "--cpu", "--preset", "huge"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--preset = huge"), "{}", stderr(&o));
}
