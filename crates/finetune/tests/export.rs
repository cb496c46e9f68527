//! `finetune export` through the binary, checked against what transformers + PEFT made of the
//! same exports (`scripts/verify_peft.py` → `datasets/fixtures/export/`), without Python:
//!
//! (a) `finetune score` with the exported per-expert adapter, and on each merged checkpoint,
//!     equals the log-probabilities of the logits PEFT / transformers computed on them (1e-4);
//! (b) the peft-fused tensors equal those PEFT itself builds from the per-expert layout;
//! (c) export peft → `read_adapter` gives back the source tensors bit for bit;
//!
//! and the refusals: a rank above 512, an existing export without --force, an output that
//! holds an input, missing inputs.

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const R: usize = 4;
const ALPHA: f64 = 8.0;

fn finetune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_finetune"))
        .args(args)
        .output()
        .expect("finetune runs")
}

fn ok(args: &[&str]) -> String {
    let o = finetune(args);
    assert!(
        o.status.success(),
        "finetune {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(args: &[&str]) -> String {
    let o = finetune(args);
    assert_eq!(o.status.code(), Some(1), "finetune {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn datasets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../datasets/fixtures")
        .canonicalize()
        .unwrap()
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// The make_fixtures.py LoRA (r = 4, alpha 8) as a PEFT adapter directory, as verify_peft.py
/// writes it: every module (`full`), or without the dense layer's MLP (`moe`).
fn write_adapter(dir: &Path, moe_only: bool, rslora: bool) {
    let reference = load(&datasets().join("tiny-qwen3-moe/reference.safetensors"));
    std::fs::create_dir_all(dir).unwrap();
    let mut tensors = HashMap::new();
    for key in reference.keys() {
        let Some(rest) = key.strip_prefix("lora.") else {
            continue;
        };
        let (name, which) = rest.rsplit_once('.').unwrap();
        if moe_only && name.starts_with("model.layers.2.mlp.") {
            continue;
        }
        tensors.insert(
            format!("base_model.model.{name}.lora_{which}.weight"),
            reference[key].clone(),
        );
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "use_rslora": rslora,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Log-probabilities of `ids` by `finetune score` under `model` (+ `adapter`).
fn score(tmp: &Path, model: &Path, adapter: Option<&Path>, ids: &[i64]) -> Vec<f64> {
    let input = tmp.join("in.jsonl");
    let out = tmp.join("out.jsonl");
    std::fs::write(&input, serde_json::json!({ "ids": ids }).to_string() + "\n").unwrap();
    let mut args = vec![
        "score",
        "--model",
        s(model),
        "--input",
        s(&input),
        "--out",
        s(&out),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", s(a)]);
    }
    ok(&args);
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim()).unwrap();
    let lp: Vec<Option<f64>> = serde_json::from_value(line["logprobs"].clone()).unwrap();
    lp[1..].iter().map(|v| v.unwrap()).collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn exports_match_peft_and_transformers() {
    let fixtures = datasets();
    let base = fixtures.join("tiny-qwen3-moe/bf16");
    let base_fp8 = fixtures.join("tiny-qwen3-moe/fp8");
    let want = load(&fixtures.join("export/reference.safetensors"));
    let ids: Vec<i64> = want["input_ids"].to_vec1().unwrap();
    let ids_u32: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let expected =
        |key: &str| finetune_model::Qwen3Moe::token_logprobs(&want[key], &ids_u32).unwrap();
    let tmp = tempfile::tempdir().unwrap();

    // Three runs; `moe` has the base in <RUN>/base and is exported with every default.
    let full = tmp.path().join("full");
    let moe = tmp.path().join("moe");
    let rslora = tmp.path().join("full-rslora");
    write_adapter(&full.join("adapter"), false, false);
    write_adapter(&moe.join("adapter"), true, false);
    write_adapter(&rslora.join("adapter"), false, true);
    std::fs::create_dir_all(moe.join("base")).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(base.join(f), moe.join("base").join(f)).unwrap();
    }
    let formats = "peft,peft-fused,merged";
    let stdout = ok(&[
        "export",
        "--run",
        s(&full),
        "--model",
        s(&base),
        "--format",
        formats,
    ]);
    ok(&[
        "export",
        "--run",
        s(&rslora),
        "--model",
        s(&base),
        "--format",
        formats,
    ]);
    ok(&["export", "--run", s(&moe), "--format", formats]);
    for (dtype, from, out) in [
        ("f32", &base, "merged-f32"),
        ("fp8", &base, "merged-fp8"),
        ("fp8", &base_fp8, "merged-fp8-from-fp8"),
    ] {
        let out = full.join("export").join(out);
        ok(&[
            "export",
            "--run",
            s(&full),
            "--model",
            s(from),
            "--format",
            "merged",
            "--merged-dtype",
            dtype,
            "--out",
            s(&out),
        ]);
    }

    // The serve commands: vLLM's smallest allowed --max-lora-rank >= 4 is 8.
    let peft_dir = full.join("export/peft").canonicalize().unwrap();
    assert!(
        stdout.contains(&format!(
            "vllm serve {} --enable-lora --lora-modules finetune={} --max-lora-rank 8",
            base.display(),
            peft_dir.display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "python -m sglang.launch_server --model-path {} --enable-lora --lora-paths finetune={} --max-lora-rank 4",
            base.display(),
            peft_dir.display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("vllm serve ") && stdout.contains("export/merged\n"),
        "{stdout}"
    );

    // (a) finetune score = PEFT / transformers on the same exports.
    let cases: [(&str, PathBuf, Option<PathBuf>); 7] = [
        ("logits_peft", base.clone(), Some(moe.join("export/peft"))),
        (
            "logits_peft_fused",
            base.clone(),
            Some(full.join("export/peft")),
        ),
        (
            "logits_peft_fused_rslora",
            base.clone(),
            Some(rslora.join("export/peft")),
        ),
        ("logits_merged_bf16", full.join("export/merged"), None),
        ("logits_merged_f32", full.join("export/merged-f32"), None),
        ("logits_merged_fp8", full.join("export/merged-fp8"), None),
        (
            "logits_merged_fp8_from_fp8",
            full.join("export/merged-fp8-from-fp8"),
            None,
        ),
    ];
    for (key, model, adapter) in &cases {
        let got = score(tmp.path(), model, adapter.as_deref(), &ids);
        let d = max_diff(&got, &expected(key));
        assert!(d <= 1e-4, "{key}: log-probs differ by {d}");
    }

    // (b) Our fused layout is PEFT's own conversion of the per-expert one.
    let fused = load(&moe.join("export/peft-fused/adapter_model.safetensors"));
    let peft_saved: HashMap<&str, &Tensor> = want
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("peft_saved.").map(|k| (k, v)))
        .collect();
    let mut keys: Vec<&str> = fused.keys().map(String::as_str).collect();
    keys.sort();
    let mut want_keys: Vec<&str> = peft_saved.keys().copied().collect();
    want_keys.sort();
    assert_eq!(keys, want_keys);
    for k in keys {
        assert_eq!(bits(&fused[k]), bits(peft_saved[k]), "{k}");
    }
    let ours: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(moe.join("export/peft-fused/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let theirs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("export/peft_saved_config.json")).unwrap(),
    )
    .unwrap();
    for key in [
        "r",
        "lora_alpha",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "target_modules",
    ] {
        let sorted = |v: &serde_json::Value| -> serde_json::Value {
            match v.as_array() {
                Some(a) => {
                    let mut a = a.clone();
                    a.sort_by_key(|x| x.to_string());
                    a.into()
                }
                None => v.clone(),
            }
        };
        assert_eq!(sorted(&ours[key]), sorted(&theirs[key]), "{key}");
    }

    // (c) Round trip: the exported peft adapter reads back as the source, bit for bit.
    let config = finetune_model::Qwen3MoeConfig::from_file(&base.join("config.json")).unwrap();
    let targets = finetune_export::lora_targets(&config);
    let (src, _) = finetune_model::peft::read_adapter(&full.join("adapter"), &targets).unwrap();
    let (back, meta) =
        finetune_model::peft::read_adapter(&full.join("export/peft"), &targets).unwrap();
    assert_eq!(back.len(), src.len());
    assert_eq!(back.scale, src.scale);
    for ((n1, a1, b1), (n2, a2, b2)) in src.tensors().zip(back.tensors()) {
        assert_eq!(n1, n2);
        assert_eq!(bits(&a1), bits(&a2), "{n1}");
        assert_eq!(bits(&b1), bits(&b2), "{n1}");
    }
    assert_eq!(meta.r, R);
    assert_eq!(meta.lora_alpha, ALPHA);
    assert_eq!(meta.base_model_name_or_path, base.display().to_string());
}

#[test]
fn export_refuses_what_it_cannot_write_naming_it() {
    let fixtures = datasets();
    let base = fixtures.join("tiny-qwen3-moe/bf16");
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    write_adapter(&run.join("adapter"), false, false);

    // No run, no adapter.
    let e = fails(&["export", "--model", s(&base)]);
    assert!(e.contains("--run"), "{e}");
    let e = fails(&[
        "export",
        "--run",
        s(&tmp.path().join("nope")),
        "--model",
        s(&base),
    ]);
    assert!(e.contains("--run") && e.contains("nope"), "{e}");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = fails(&["export", "--run", s(&empty), "--model", s(&base)]);
    assert!(
        e.contains("adapter_config.json") && e.contains("--adapter"),
        "{e}"
    );
    // No base: the run has no base/ and no manifest; a preset is no directory.
    let e = fails(&["export", "--run", s(&run)]);
    assert!(e.contains("--model"), "{e}");
    let e = fails(&["export", "--run", s(&run), "--model", "tiny"]);
    assert!(e.contains("--model") && e.contains("preset"), "{e}");

    // An existing export is kept unless --force.
    let out = tmp.path().join("out");
    ok(&[
        "export",
        "--run",
        s(&run),
        "--model",
        s(&base),
        "--out",
        s(&out),
    ]);
    let before = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let e = fails(&[
        "export",
        "--run",
        s(&run),
        "--model",
        s(&base),
        "--out",
        s(&out),
    ]);
    assert!(
        e.contains("already exists") && e.contains("--force") && e.contains("out"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        before
    );
    ok(&[
        "export",
        "--run",
        s(&run),
        "--model",
        s(&base),
        "--out",
        s(&out),
        "--force",
    ]);
    // Replacing the directory that holds the adapter would delete it.
    let e = fails(&[
        "export",
        "--run",
        s(&run),
        "--model",
        s(&base),
        "--out",
        s(&run),
        "--force",
    ]);
    assert!(e.contains("--out") && e.contains("adapter"), "{e}");
    assert!(run.join("adapter/adapter_config.json").is_file());

    // A rank above 512 is never exported.
    let big = tmp.path().join("big");
    std::fs::create_dir_all(&big).unwrap();
    let mut tensors = HashMap::new();
    let name = "base_model.model.model.layers.0.self_attn.q_proj";
    tensors.insert(
        format!("{name}.lora_A.weight"),
        Tensor::zeros((600, 160), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    tensors.insert(
        format!("{name}.lora_B.weight"),
        Tensor::zeros((160, 600), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, big.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        big.join("adapter_config.json"),
        r#"{"r": 600, "lora_alpha": 16, "target_modules": ["q_proj"]}"#,
    )
    .unwrap();
    let e = fails(&[
        "export",
        "--adapter",
        s(&big),
        "--model",
        s(&base),
        "--out",
        s(&tmp.path().join("o")),
        "--format",
        "merged",
    ]);
    assert!(
        e.contains("adapter_config.json") && e.contains("r = 600") && e.contains("512"),
        "{e}"
    );
    assert!(!tmp.path().join("o").exists());
    // Nothing temporary is left anywhere.
    let leftovers: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
