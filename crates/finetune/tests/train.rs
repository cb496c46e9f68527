//! `finetune train` through the binary: what a run writes, interruption and bit-identical
//! resume, and each kind of bad input (empty dataset, every pair too long, resume with another
//! recipe, corrupt checkpoint, wrong-shape warm start, disk full while checkpointing).

use std::path::Path;
use std::process::{Command, Stdio};

mod common;
use common::*;

#[test]
fn train_writes_adapter_metrics_and_checkpoints_and_refuses_a_changed_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let data = mined(dir.path());
    let run = dir.path().join("run");
    let o = train(
        &data,
        &run,
        &[
            "--max-steps",
            "4",
            "--save-every",
            "1",
            "--keep-checkpoints",
            "2",
            "--eval-every",
            "2",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("train: 4 steps") && out.contains("held-out loss"),
        "{out}"
    );
    assert_eq!(checkpoints(&run), ["step-000003", "step-000004"]);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for (i, m) in lines.iter().enumerate() {
        assert_eq!(m["step"], i as u64 + 1);
        for key in [
            "loss",
            "lr",
            "grad_norm",
            "tokens",
            "tokens_per_sec",
            "peak_rss_mib",
        ] {
            assert!(m[key].as_f64().is_some(), "{key} missing in {m}");
        }
    }
    assert!(
        lines[1]["heldout_loss"].as_f64().is_some() && lines[3]["heldout_loss"].as_f64().is_some()
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["r"], 4);
    assert_eq!(config["peft_type"], "LORA");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("train.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 4);
    assert!(summary["data"]["train"]["kept"].as_u64().unwrap() >= 8);

    // Resuming with a different learning rate and rank is refused, naming both keys.
    let o = resume(&run, &["--rank", "8", "--lr", "5e-2"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("train.lr") && e.contains("lora.r") && !e.contains("train.seq_len"),
        "{e}"
    );

    // A damaged checkpoint is refused by name.
    let opt = run.join("checkpoints/step-000004/optimizer.safetensors");
    let mut bytes = std::fs::read(&opt).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 1;
    std::fs::write(&opt, bytes).unwrap();
    let o = resume(&run, &["--max-steps", "6"]);
    assert_eq!(o.status.code(), Some(1));
    // The recipe is compared before the checkpoint is read: --max-steps 6 is named first.
    let e = stderr(&o);
    assert!(e.contains("train.max_steps"), "{e}");
    let o = resume(
        &run.join("checkpoints/step-000004"),
        &[
            "--max-steps",
            "4",
            "--save-every",
            "1",
            "--keep-checkpoints",
            "2",
            "--eval-every",
            "2",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("optimizer.safetensors") && e.contains("corrupt"),
        "{e}"
    );
}

#[test]
fn sigterm_checkpoints_and_resume_gives_the_uninterrupted_weights() {
    let dir = tempfile::tempdir().unwrap();
    let data = mined(dir.path());
    let steps = [
        "--max-steps",
        "30",
        "--save-every",
        "100",
        "--lora-dropout",
        "0.1",
    ];
    let whole = dir.path().join("whole");
    let o = train(&data, &whole, &steps);
    assert!(o.status.success(), "{}", stderr(&o));

    let cut = dir.path().join("cut");
    let mut args = vec![
        "train",
        "--data",
        data.to_str().unwrap(),
        "--run-dir",
        cut.to_str().unwrap(),
    ];
    args.extend_from_slice(FAST);
    args.extend_from_slice(&steps);
    let child = Command::new(env!("CARGO_BIN_EXE_finetune"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once training is under way (a metrics line exists), ask it to stop.
    let metrics = cut.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |s| s.lines().count()) < 2 {
        assert!(t0.elapsed().as_secs() < 300, "training never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("interrupted; continue with `finetune train --resume"),
        "{out}"
    );
    let saved = checkpoints(&cut);
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert_ne!(saved[0], "step-000030", "stopped before the end");

    let o = resume(&cut, &steps);
    assert!(o.status.success(), "{}", stderr(&o));
    let a = std::fs::read(whole.join("adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(cut.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(a == b, "resumed adapter differs from the uninterrupted one");
    let lines = std::fs::read_to_string(&metrics).unwrap().lines().count();
    assert_eq!(lines, 30);
}

#[test]
fn bad_inputs_fail_with_the_file_or_flag_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = mined(dir.path());

    // Every pair longer than the sequence.
    let o = train(
        &data,
        &dir.path().join("r1"),
        &["--seq-len", "24", "--max-steps", "1"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("longer than train.seq_len = 24"),
        "{}",
        stderr(&o)
    );

    // An empty dataset.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("train.jsonl"), "").unwrap();
    let o = train(&empty, &dir.path().join("r2"), &["--max-steps", "1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("train.jsonl: no training pairs"),
        "{}",
        stderr(&o)
    );
    let o = train(
        &dir.path().join("nowhere"),
        &dir.path().join("r3"),
        &["--max-steps", "1"],
    );
    assert!(
        stderr(&o).contains("nowhere/train.jsonl: no such file"),
        "{}",
        stderr(&o)
    );

    // Warm start from an adapter of another rank, then of the wrong shape.
    let run = dir.path().join("r4");
    let o = train(&data, &run, &["--max-steps", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let adapter = run.join("adapter");
    let o = train(
        &data,
        &dir.path().join("r5"),
        &[
            "--max-steps",
            "1",
            "--init-adapter",
            adapter.to_str().unwrap(),
            "--rank",
            "8",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("rank"), "{}", stderr(&o));
    let config = adapter.join("adapter_config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"r\": 4", "\"r\": 8");
    std::fs::write(&config, text).unwrap();
    let o = train(
        &data,
        &dir.path().join("r6"),
        &[
            "--max-steps",
            "1",
            "--init-adapter",
            adapter.to_str().unwrap(),
            "--rank",
            "8",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("adapter_model.safetensors")
            && e.contains("lora_A.weight")
            && e.contains("[8, 128]"),
        "{e}"
    );

    // A warm start that fits trains on from the adapter.
    let o = train(
        &data,
        &dir.path().join("r7"),
        &[
            "--max-steps",
            "1",
            "--init-adapter",
            run.join("checkpoints/step-000001/adapter")
                .to_str()
                .unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A full disk while writing a checkpoint: the run fails naming the checkpoint, the previous
/// checkpoint stays whole and no temp directory is left. Needs a small tmpfs, mounted in a
/// user + mount namespace (`unshare -rm`); skipped, saying so, where that is not allowed.
#[test]
fn disk_full_while_checkpointing_keeps_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    if !Command::new("unshare")
        .args(["-rm", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("SKIPPED: unshare -rm is not permitted here");
        return;
    }
    let data = mined(dir.path());
    // Sizes of what the run writes, from a normal run.
    let probe = dir.path().join("probe");
    let o = train(&data, &probe, &["--max-steps", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let du = |p: &Path| -> u64 {
        let o = Command::new("du")
            .args(["-sb", p.to_str().unwrap()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let base = du(&probe.join("base"));
    let ckpt = du(&probe.join("checkpoints/step-000001"));
    // Room for the base, one checkpoint and half of the next.
    let size = base + ckpt + ckpt / 2 + 256 * 1024;
    let mnt = dir.path().join("mnt");
    let saved = dir.path().join("saved");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut cmd = format!(
        "mount -t tmpfs -o size={size} tmpfs {mnt} && mkdir -p {mnt}/run && cp -r {base_dir} {mnt}/run/base && {bin} train --data {data} --run-dir {mnt}/run --max-steps 3 --save-every 1 --keep-checkpoints 1",
        mnt = mnt.display(),
        base_dir = probe.join("base").display(),
        bin = env!("CARGO_BIN_EXE_finetune"),
        data = data.display(),
    );
    for f in FAST {
        cmd.push(' ');
        cmd.push_str(f);
    }
    cmd.push_str(&format!(
        "; echo \"exit=$?\"; ls -a {mnt}/run/checkpoints; cp -r {mnt}/run {saved}",
        mnt = mnt.display(),
        saved = saved.display()
    ));
    let o = Command::new("unshare")
        .args(["-rm", "sh", "-c", &cmd])
        .output()
        .unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert!(out.contains("exit=1"), "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains("checkpoints") && err.contains("No space left on device"),
        "{err}"
    );
    // Step 1's checkpoint is complete (and loadable: resume reads it).
    let names = checkpoints(&saved);
    assert_eq!(names, ["step-000001"], "stdout: {out}\nstderr: {err}");
    let o = resume(
        &saved,
        &[
            "--max-steps",
            "3",
            "--save-every",
            "1",
            "--keep-checkpoints",
            "1",
        ],
    );
    assert!(
        o.status.success(),
        "resume from the surviving checkpoint: {}",
        stderr(&o)
    );
}

/// `--model DIR` trains on a Hugging Face checkpoint with its own tokenizer: here the
/// transformers-made fixture model with a BPE of its 300-token vocabulary next to it; the
/// adapter it writes has that model's shapes and loads back in `finetune score`.
#[test]
fn a_hugging_face_model_directory_trains_with_its_own_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let data = mined(dir.path());
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/fixtures/tiny-qwen3-moe/bf16");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), model.join(f)).unwrap();
    }
    let texts: Vec<String> = (0..40)
        .map(|i| format!("pub fn add_{i}(x: u32) -> u32 {{ x + {i} }}\n"))
        .collect();
    finetune_data::train_byte_level_bpe(texts.iter(), 300, &model.join("tokenizer.json")).unwrap();
    let run = dir.path().join("run");
    let o = train(
        &data,
        &run,
        &["--model", model.to_str().unwrap(), "--max-steps", "2"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let tensors = candle_core::safetensors::load(
        run.join("adapter/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let a = &tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    assert_eq!(a.dims(), [4, 160], "the fixture's hidden size is 160");
    assert!(
        !run.join("base").exists(),
        "no embedded base for a model directory"
    );
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"ids\": [1, 2, 3, 4]}\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let o = finetune(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        run.join("adapter").to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `--gpus 2 --ep 2` on a CPU build runs two ranks as threads (experts split, tokens exchanged
/// by all-to-all): the same losses as `--gpus 1` (LoRA dropout on), a whole adapter, and a checkpoint that
/// resumes on one rank. An impossible layout is refused with its numbers.
#[test]
fn two_ranks_train_like_one_and_their_checkpoint_resumes_on_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = mined(dir.path());
    let steps = [
        "--max-steps",
        "3",
        "--save-every",
        "2",
        // Dropout draws the same counter-based masks on one rank and on two.
        "--lora-dropout",
        "0.1",
        "--micro-batch",
        "2",
    ];
    let one = dir.path().join("one");
    let o = train(&data, &one, &[&steps[..], &["--gpus", "1"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let two = dir.path().join("two");
    let o = train(
        &data,
        &two,
        &[&steps[..], &["--gpus", "2", "--ep", "2"]].concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // Each rank loads only its shard: rank 0 the first half of the experts.
    let err = stderr(&o);
    let line = err
        .lines()
        .find(|l| l.starts_with("train: rank 0 loaded experts 0.."))
        .unwrap_or_else(|| panic!("no shard line in {err}"));
    let (half, all) = line["train: rank 0 loaded experts 0..".len()..]
        .split_once(" of ")
        .unwrap();
    let all: usize = all.split(',').next().unwrap().parse().unwrap();
    assert_eq!(half.parse::<usize>().unwrap() * 2, all, "{line}");
    assert!(line.ends_with("MiB of base weights"), "{line}");
    let losses = |run: &Path| -> Vec<f64> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let (a, b) = (losses(&one), losses(&two));
    assert_eq!(a.len(), 3);
    assert_eq!(b.len(), 3, "rank 0 alone writes metrics");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-4, "losses {a:?} vs {b:?}");
    }
    let keys = |run: &Path| -> Vec<String> {
        let t = candle_core::safetensors::load(
            run.join("adapter/adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mut k: Vec<String> = t.into_keys().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&one), keys(&two), "the two-rank adapter is whole");
    // The two-rank checkpoint at step 2 resumes on one rank (train.gpus/ep may change).
    let o = resume(
        &two.join("checkpoints/step-000002"),
        &[&steps[..], &["--gpus", "1", "--ep", "0"]].concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let c = losses(&two);
    assert_eq!(
        c.len(),
        4,
        "step 3 appended again by the resumed run: {c:?}"
    );
    assert!(
        (c[3] - a[2]).abs() <= 1e-4,
        "resumed step 3: {} vs {}",
        c[3],
        a[2]
    );
    // 8 experts do not split over 3 ranks.
    let o = train(
        &data,
        &dir.path().join("bad"),
        &[&steps[..], &["--gpus", "3", "--ep", "3"]].concat(),
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("8 experts") && e.contains("ep 3"), "{e}");
}
