//! Checkpoints: everything a run needs to continue bit-identically.
//!
//! `checkpoints/step-NNNNNN/` holds
//! - `adapter/`: the LoRA weights as a PEFT adapter (servable and usable for warm starts as is),
//!   or, for a full-parameter run (`finetune pretrain`), `model.safetensors`: every weight in
//!   f32 by its checkpoint name;
//! - `optimizer.safetensors`: AdamW's first and second moments (`m.<i>`, `v.<i>`, in the
//!   adapter's per-module (PEFT) order: A then B of each module, modules sorted by name,
//!   whatever the in-memory storage: stacked expert adapters are split on save and stacked on
//!   load, so a checkpoint does not depend on the layout that wrote it);
//! - `trainer_state.json`: step, the data cursor, each parameter's update count (dropout masks
//!   follow from the step: `finetune_model::dropout`; the `dropout_position` of checkpoints
//!   written before the masks were counter-based is ignored), counters, the recipe the run was started with, and an xxh3 checksum of
//!   each tensor file so that a damaged checkpoint is refused instead of resumed from.
//!
//! A checkpoint is assembled in a hidden temp directory next to its final place and renamed
//! into place only when every file is written and synced: a crash or a full disk leaves the
//! previous checkpoint as it was. Only then are checkpoints beyond the last K removed.

use crate::TrainError;
use candle_core::{Device, Tensor};
use finetune_data::Cursor;
use finetune_model::peft::{self, AdapterMeta};
use finetune_model::Lora;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT: u32 = 1;

/// `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format: u32,
    /// Optimizer steps done.
    pub step: u64,
    pub total_steps: u64,
    pub cursor: Cursor,
    /// Updates of each parameter (AdamW's t).
    pub adam_t: Vec<u64>,
    pub tokens_seen: u64,
    pub skipped_steps: u64,
    pub bad_steps_in_a_row: u64,
    pub elapsed_secs: f64,
    pub last_heldout_loss: Option<f64>,
    /// The resolved settings the run started with; a resume must match them.
    pub recipe: serde_json::Value,
    /// xxh3-64 of `adapter/adapter_model.safetensors` and `optimizer.safetensors`, hex.
    pub checksums: HashMap<String, String>,
}

/// A loaded checkpoint. `m`, `v` and `state.adam_t` are aligned with `lora.vars()` (stacked
/// like the adapter; on disk they are per module).
pub struct Checkpoint {
    pub dir: PathBuf,
    pub lora: Lora,
    pub meta: AdapterMeta,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub state: TrainerState,
}

fn io(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// xxh3-64 of the file at `path`, 16 hex digits (the checkpoint checksums, and the data hash
/// a resume compares).
pub fn checksum(path: &Path) -> Result<String, TrainError> {
    let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
    Ok(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes)))
}

fn sync_file(path: &Path) -> Result<(), TrainError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(path, e))
}

/// `step-NNNNNN`.
pub fn dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

/// Writes a checkpoint under `root` (e.g. `<run>/checkpoints`) atomically and keeps the last
/// `keep` (≥ 1). Returns its directory. `moments` and `state.adam_t` are aligned with
/// `lora.vars()`; they are written per module (module doc).
pub fn save(
    root: &Path,
    lora: &Lora,
    meta: &AdapterMeta,
    moments: (&[Tensor], &[Tensor]),
    mut state: TrainerState,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let here = |e: candle_core::Error| io(root, e);
    let m = lora.unstack_params(moments.0).map_err(here)?;
    let v = lora.unstack_params(moments.1).map_err(here)?;
    state.adam_t = lora.unstack_counts(&state.adam_t).map_err(here)?;
    let moments = (m.as_slice(), v.as_slice());
    let write = |tmp: &Path| -> Result<Vec<PathBuf>, TrainError> {
        let adapter_dir = tmp.join("adapter");
        peft::write_adapter(lora, meta, &adapter_dir).map_err(|e| io(&adapter_dir, e))?;
        Ok(vec![
            adapter_dir.join("adapter_model.safetensors"),
            adapter_dir.join("adapter_config.json"),
        ])
    };
    save_with(root, write, moments, state, keep)
}

/// [`save`] of a full-parameter run (`finetune pretrain`): `model.safetensors` holds every
/// weight (f32 master copy) by its checkpoint name instead of `adapter/`.
pub fn save_full(
    root: &Path,
    params: &[(String, Tensor)],
    moments: (&[Tensor], &[Tensor]),
    state: TrainerState,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let write = |tmp: &Path| -> Result<Vec<PathBuf>, TrainError> {
        let path = tmp.join(MODEL_FILE);
        let tensors: HashMap<String, Tensor> = params.iter().cloned().collect();
        candle_core::safetensors::save(&tensors, &path).map_err(|e| io(&path, e))?;
        Ok(vec![path])
    };
    save_with(root, write, moments, state, keep)
}

/// The weights file of a full-parameter checkpoint.
pub const MODEL_FILE: &str = "model.safetensors";

/// The checkpoint protocol: `write` puts the trained parameters into the temp directory and
/// returns the files it wrote (the first is checksummed), then the moments and the state
/// follow, everything is synced and the directory renamed into place.
fn save_with(
    root: &Path,
    write: impl FnOnce(&Path) -> Result<Vec<PathBuf>, TrainError>,
    moments: (&[Tensor], &[Tensor]),
    mut state: TrainerState,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
    let name = dir_name(state.step);
    let final_dir = root.join(&name);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        let written = write(&tmp)?;
        let opt_path = tmp.join("optimizer.safetensors");
        let (m, v) = moments;
        let mut tensors = HashMap::new();
        for (i, (m, v)) in m.iter().zip(v).enumerate() {
            tensors.insert(format!("m.{i}"), m.clone());
            tensors.insert(format!("v.{i}"), v.clone());
        }
        candle_core::safetensors::save(&tensors, &opt_path).map_err(|e| io(&opt_path, e))?;
        let params_file = &written[0];
        let relative = params_file
            .strip_prefix(&tmp)
            .unwrap_or(params_file)
            .display()
            .to_string();
        state.checksums = HashMap::from([
            (relative, checksum(params_file)?),
            ("optimizer.safetensors".to_string(), checksum(&opt_path)?),
        ]);
        let state_path = tmp.join("trainer_state.json");
        let text = serde_json::to_string_pretty(&state).map_err(|e| io(&state_path, e))?;
        let mut f = std::fs::File::create(&state_path).map_err(|e| io(&state_path, e))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.write_all(b"\n"))
            .and_then(|_| f.sync_all())
            .map_err(|e| io(&state_path, e))?;
        for p in written.iter().chain([&opt_path]) {
            sync_file(p)?;
        }
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(|e| io(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| io(&final_dir, e))?;
        // The rename itself must reach the disk before older checkpoints go.
        let _ = std::fs::File::open(root).and_then(|d| d.sync_all());
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    prune(root, keep.max(1))?;
    Ok(final_dir)
}

/// Checkpoint directories under `root`, oldest first.
pub fn list(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The newest checkpoint under `root`.
pub fn latest(root: &Path) -> Option<PathBuf> {
    list(root).pop().map(|(_, p)| p)
}

fn prune(root: &Path, keep: usize) -> Result<(), TrainError> {
    let all = list(root);
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    Ok(())
}

/// Reads only `trainer_state.json` of the checkpoint in `dir`.
pub fn read_state(dir: &Path) -> Result<TrainerState, TrainError> {
    let path = dir.join("trainer_state.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| io(&path, format!("cannot read: {e}")))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| io(&path, format!("corrupt checkpoint state: {e}")))?;
    if state.format != FORMAT {
        return Err(io(
            &path,
            format!(
                "checkpoint format {} (this build reads {FORMAT})",
                state.format
            ),
        ));
    }
    Ok(state)
}

/// Reads the state of the checkpoint in `dir` and checks every file against its checksum.
fn verified_state(dir: &Path) -> Result<TrainerState, TrainError> {
    let state = read_state(dir)?;
    for (file, want) in &state.checksums {
        let path = dir.join(file);
        let got = checksum(&path)?;
        if &got != want {
            return Err(io(
                &path,
                format!("corrupt checkpoint: checksum {got}, trainer_state.json recorded {want}"),
            ));
        }
    }
    if state.checksums.len() != 2 {
        return Err(io(
            &dir.join("trainer_state.json"),
            "corrupt checkpoint: checksums missing",
        ));
    }
    Ok(state)
}

/// AdamW's moments of `n` parameters from `dir/optimizer.safetensors`.
fn moments(
    dir: &Path,
    n: usize,
    state: &TrainerState,
) -> Result<(Vec<Tensor>, Vec<Tensor>), TrainError> {
    let opt_path = dir.join("optimizer.safetensors");
    let tensors =
        candle_core::safetensors::load(&opt_path, &Device::Cpu).map_err(|e| io(&opt_path, e))?;
    let take = |prefix: &str| -> Result<Vec<Tensor>, TrainError> {
        (0..n)
            .map(|i| {
                tensors
                    .get(&format!("{prefix}.{i}"))
                    .cloned()
                    .ok_or_else(|| io(&opt_path, format!("missing `{prefix}.{i}`")))
            })
            .collect()
    };
    let (m, v) = (take("m")?, take("v")?);
    if state.adam_t.len() != n {
        return Err(io(
            dir,
            format!("{} update counts for {n} parameters", state.adam_t.len()),
        ));
    }
    Ok((m, v))
}

/// Loads and verifies the checkpoint in `dir` for a model with `targets`.
pub fn load(dir: &Path, targets: &[(String, usize, usize)]) -> Result<Checkpoint, TrainError> {
    let state = verified_state(dir)?;
    let (lora, meta) = peft::read_adapter(&dir.join("adapter"), targets).map_err(|e| io(dir, e))?;
    let (m, v) = moments(dir, 2 * lora.len(), &state)?;
    // Per module on disk; stacked like the adapter in memory.
    let mut state = state;
    let stacked = |e: candle_core::Error| io(&dir.join("optimizer.safetensors"), e);
    let m = lora.stack_params(&m).map_err(stacked)?;
    let v = lora.stack_params(&v).map_err(stacked)?;
    state.adam_t = lora
        .stack_counts(&state.adam_t)
        .map_err(|e| io(&dir.join("trainer_state.json"), e))?;
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        lora,
        meta,
        m,
        v,
        state,
    })
}

/// A loaded full-parameter checkpoint ([`save_full`]).
pub struct FullCheckpoint {
    pub dir: PathBuf,
    /// Every weight by name, in the order of `names` given to [`load_full`].
    pub params: Vec<(String, Tensor)>,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub state: TrainerState,
}

/// Loads and verifies the full-parameter checkpoint in `dir`; it must hold exactly `names`.
pub fn load_full(dir: &Path, names: &[String]) -> Result<FullCheckpoint, TrainError> {
    let state = verified_state(dir)?;
    let path = dir.join(MODEL_FILE);
    let mut tensors =
        candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| io(&path, e))?;
    let params = names
        .iter()
        .map(|n| {
            tensors
                .remove(n)
                .map(|t| (n.clone(), t))
                .ok_or_else(|| io(&path, format!("missing tensor `{n}`")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(extra) = tensors.keys().next() {
        return Err(io(&path, format!("unexpected tensor `{extra}`")));
    }
    let (m, v) = moments(dir, names.len(), &state)?;
    Ok(FullCheckpoint {
        dir: dir.to_path_buf(),
        params,
        m,
        v,
        state,
    })
}
