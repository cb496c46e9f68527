//! A full Hugging Face checkpoint with the adapter merged into the base weights
//! (`--format merged`): W' = W + s·B·A for every adapted projection, computed in f32 from the
//! base weight in its stored precision (FP8 dequantized), in the per-expert layout of the base.
//!
//! Output dtypes: bf16 (everything floating-point in bf16), f32, or FP8 E4M3 where every
//! decoder projection is stored as E4M3 with one f32 `weight_scale_inv` per 128×128 block,
//! scale = amax / 448 (as `scripts/make_fixtures.py` and the Qwen3-Coder-*-FP8 checkpoints),
//! and the rest (embeddings, norms, routers, lm_head) in bf16; `config.json` then carries the
//! `quantization_config` (the base's own when the base is FP8, with its choice of quantized
//! projections kept). Projections the adapter does not touch keep their stored bytes when the
//! stored and the output format agree.
//!
//! Tensors are written in shards of at most `shard_bytes` (one `model.safetensors` when
//! everything fits, else `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`),
//! so memory holds one shard at a time; `config.json` and tokenizer files are copied.

use crate::{file_error, lora_targets, write_file, ExportError};
use candle_core::{DType, Device, Tensor};
use finetune_model::weights::FP8_BLOCK;
use finetune_model::{BaseWeight, Lora, Qwen3MoeConfig, Weights};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The largest finite FP8 E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// Shard size when none is given: 5 GB, as transformers' `save_pretrained`.
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

/// Files copied from the base directory when present (tokenizer, chat template, generation
/// defaults).
pub const COPIED_FILES: [&str; 7] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
];

/// Dtype of a merged checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergedDtype {
    Bf16,
    F32,
    /// FP8 E4M3 projections with fresh 128×128 block scales.
    Fp8,
}

impl MergedDtype {
    fn torch_name(self) -> &'static str {
        match self {
            MergedDtype::F32 => "float32",
            MergedDtype::Bf16 | MergedDtype::Fp8 => "bfloat16",
        }
    }
}

/// Quantizes `w` `[out, in]` to FP8 E4M3 with one scale per 128×128 block (partial blocks at the
/// edges): scale_inv = max(amax / 448, 1e-12), q = round-to-nearest-E4M3(w / scale_inv), so
/// that W ≈ q · scale_inv. Returns (q as F8E4M3, scale_inv f32 `[ceil(out/128), ceil(in/128)]`).
pub fn quantize_fp8_block(w: &Tensor) -> Result<(Tensor, Tensor), ExportError> {
    let (out, inp) = w.dims2()?;
    let values: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (rows, cols) = (out.div_ceil(FP8_BLOCK), inp.div_ceil(FP8_BLOCK));
    let block = |k: usize| (k / inp / FP8_BLOCK) * cols + (k % inp) / FP8_BLOCK;
    let mut scales = vec![0f32; rows * cols];
    for (k, v) in values.iter().enumerate() {
        let s = &mut scales[block(k)];
        *s = s.max(v.abs());
    }
    for s in &mut scales {
        *s = ((*s as f64) / E4M3_MAX as f64).max(1e-12) as f32;
    }
    let scaled: Vec<f32> = values
        .iter()
        .enumerate()
        .map(|(k, v)| v / scales[block(k)])
        .collect();
    let q = Tensor::from_vec(scaled, (out, inp), &Device::Cpu)?.to_dtype(DType::F8E4M3)?;
    let scale_inv = Tensor::from_vec(scales, (rows, cols), &Device::Cpu)?;
    Ok((q, scale_inv))
}

/// Collects output tensors and writes them shard by shard.
struct ShardWriter {
    dir: PathBuf,
    limit: u64,
    current: HashMap<String, Tensor>,
    current_bytes: u64,
    /// Written shards: temporary file name and the tensors in it.
    shards: Vec<(PathBuf, Vec<String>)>,
    total_bytes: u64,
}

impl ShardWriter {
    fn new(dir: &Path, limit: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            limit: limit.max(1),
            current: HashMap::new(),
            current_bytes: 0,
            shards: Vec::new(),
            total_bytes: 0,
        }
    }

    fn add(&mut self, name: String, t: Tensor) -> Result<(), ExportError> {
        let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        if !self.current.is_empty() && self.current_bytes + bytes > self.limit {
            self.flush()?;
        }
        self.current_bytes += bytes;
        self.total_bytes += bytes;
        self.current.insert(name, t);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ExportError> {
        if self.current.is_empty() {
            return Ok(());
        }
        let path = self
            .dir
            .join(format!(".shard-{:05}.safetensors", self.shards.len() + 1));
        candle_core::safetensors::save(&self.current, &path).map_err(|e| file_error(&path, e))?;
        let mut names: Vec<String> = self.current.drain().map(|(n, _)| n).collect();
        names.sort();
        self.shards.push((path, names));
        self.current_bytes = 0;
        Ok(())
    }

    /// Renames the shards to their final names and writes the index when there are several;
    /// returns the number of shards.
    fn finish(mut self) -> Result<usize, ExportError> {
        self.flush()?;
        let n = self.shards.len();
        if n == 1 {
            let (tmp, _) = &self.shards[0];
            let path = self.dir.join("model.safetensors");
            std::fs::rename(tmp, &path).map_err(|e| file_error(&path, e))?;
            return Ok(1);
        }
        let mut weight_map = serde_json::Map::new();
        for (i, (tmp, names)) in self.shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            let path = self.dir.join(&file);
            std::fs::rename(tmp, &path).map_err(|e| file_error(&path, e))?;
            for name in names {
                weight_map.insert(name.clone(), file.clone().into());
            }
        }
        let index = serde_json::json!({
            "metadata": {"total_size": self.total_bytes},
            "weight_map": weight_map,
        });
        let path = self.dir.join("model.safetensors.index.json");
        let text = serde_json::to_string_pretty(&index).map_err(|e| file_error(&path, e))?;
        write_file(&path, (text + "\n").as_bytes())?;
        Ok(n)
    }
}

/// What [`write_merged`] wrote.
#[derive(Debug, Clone, Default)]
pub struct MergeReport {
    pub tensors: usize,
    /// Projections with W + s·B·A.
    pub merged: usize,
    /// Projections written as FP8 with fresh block scales.
    pub requantized: usize,
    pub shards: usize,
    pub bytes: u64,
}

/// The `quantization_config` of an FP8 output.
fn fp8_quantization_config(base: &serde_json::Value) -> serde_json::Value {
    match base.get("quantization_config") {
        Some(q) if q.is_object() => q.clone(),
        _ => serde_json::json!({
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
            "modules_to_not_convert": ["lm_head", "mlp.gate"],
        }),
    }
}

/// Writes the base model in `base_dir` with `lora` merged into it as a Hugging Face checkpoint
/// into `out` (an existing empty directory).
pub fn write_merged(
    base_dir: &Path,
    lora: &Lora,
    dtype: MergedDtype,
    out: &Path,
    shard_bytes: u64,
) -> Result<MergeReport, ExportError> {
    let config_path = base_dir.join("config.json");
    let config = Qwen3MoeConfig::from_file(&config_path)?;
    let weights = Weights::open(base_dir, &Device::Cpu)?;
    let targets: BTreeMap<String, (usize, usize)> = lora_targets(&config)
        .into_iter()
        .map(|(n, o, i)| (n, (o, i)))
        .collect();
    if let Some(unknown) = lora.names().find(|n| !targets.contains_key(*n)) {
        return Err(ExportError::Refused(format!(
            "the adapter has `{unknown}`, a module the model in {} does not have",
            base_dir.display()
        )));
    }
    let mut writer = ShardWriter::new(out, shard_bytes);
    let mut report = MergeReport::default();
    let names: Vec<String> = weights.names().map(String::from).collect();
    let handled_scales: BTreeSet<String> = targets
        .keys()
        .map(|p| format!("{p}.weight_scale_inv"))
        .collect();
    for name in &names {
        if handled_scales.contains(name) {
            continue; // written with its weight
        }
        let shape = weights
            .shape(name)
            .ok_or_else(|| file_error(base_dir, format!("cannot read tensor `{name}`")))?;
        let projection = name
            .strip_suffix(".weight")
            .and_then(|p| targets.get(p).map(|&(o, i)| (p, o, i)));
        let Some((prefix, o, i)) = projection else {
            // Embeddings, norms, routers, lm_head: as stored, in the output's float dtype.
            let t = weights.tensor(name, &shape)?;
            let t = match (t.dtype(), dtype) {
                _ if name.ends_with("_scale_inv") => t, // a scale stays as stored
                (DType::F32 | DType::F16 | DType::BF16, MergedDtype::F32) => {
                    t.to_dtype(DType::F32)?
                }
                (DType::F32 | DType::F16, _) => t.to_dtype(DType::BF16)?,
                _ => t,
            };
            writer.add(name.clone(), t)?;
            continue;
        };
        let base = weights.base_weight(prefix, o, i)?;
        let stored_fp8 = matches!(base, BaseWeight::Fp8 { .. });
        let adapter = lora.get(prefix);
        if let (None, MergedDtype::Fp8, BaseWeight::Fp8 { q, scale_inv }) = (&adapter, dtype, &base)
        {
            writer.add(name.clone(), q.clone())?;
            writer.add(format!("{prefix}.weight_scale_inv"), scale_inv.clone())?;
            continue;
        }
        let mut w = base.dequantize(DType::F32)?;
        if let Some((a, b)) = adapter {
            let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * lora.scale)?;
            w = (w + delta)?;
            report.merged += 1;
            let finite = w.abs()?.max_all()?.to_scalar::<f32>()?.is_finite();
            if !finite {
                return Err(ExportError::Refused(format!(
                    "merging the adapter into `{name}` gives non-finite weights: the adapter is broken"
                )));
            }
        }
        // FP8 output: every projection of a bf16 base; those the FP8 base stored as FP8.
        let quantize =
            dtype == MergedDtype::Fp8 && (stored_fp8 || config.quantization_config.is_none());
        if quantize {
            let (q, scale_inv) = quantize_fp8_block(&w)?;
            writer.add(name.clone(), q)?;
            writer.add(format!("{prefix}.weight_scale_inv"), scale_inv)?;
            report.requantized += 1;
        } else if dtype == MergedDtype::F32 {
            writer.add(name.clone(), w)?;
        } else {
            writer.add(name.clone(), w.to_dtype(DType::BF16)?)?;
        }
    }
    report.tensors =
        writer.shards.iter().map(|(_, n)| n.len()).sum::<usize>() + writer.current.len();
    report.bytes = writer.total_bytes;
    report.shards = writer.finish()?;

    // config.json: the base's, with the output's dtype and quantization.
    let text = std::fs::read_to_string(&config_path).map_err(|e| file_error(&config_path, e))?;
    let mut json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| file_error(&config_path, e))?;
    let obj = json
        .as_object_mut()
        .ok_or_else(|| file_error(&config_path, "not a JSON object"))?;
    let quantization = fp8_quantization_config(&serde_json::Value::Object(obj.clone()));
    obj.remove("quantization_config");
    if dtype == MergedDtype::Fp8 {
        obj.insert("quantization_config".into(), quantization);
    }
    obj.insert("torch_dtype".into(), dtype.torch_name().into());
    if obj.get("dtype").is_some_and(|d| !d.is_null()) {
        obj.insert("dtype".into(), dtype.torch_name().into());
    }
    let text = serde_json::to_string_pretty(&json).map_err(|e| file_error(&config_path, e))?;
    write_file(&out.join("config.json"), (text + "\n").as_bytes())?;
    for file in COPIED_FILES {
        let from = base_dir.join(file);
        if from.is_file() {
            let to = out.join(file);
            std::fs::copy(&from, &to).map_err(|e| file_error(&to, e))?;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/fixtures/tiny-qwen3-moe")
    }

    /// The FP8 fixture was quantized from the bf16 one by PyTorch (`make_fixtures.py`); our
    /// quantizer gives the same bytes and scales.
    #[test]
    fn quantization_equals_pytorchs_on_the_fixture() {
        let bf16 = Weights::open(&fixtures().join("bf16"), &Device::Cpu).unwrap();
        let fp8 = Weights::open(&fixtures().join("fp8"), &Device::Cpu).unwrap();
        let mut checked = 0;
        let mut differing = 0usize;
        for name in fp8.names().filter(|n| n.ends_with("_proj.weight")) {
            let shape = fp8.shape(name).unwrap();
            let w = bf16.tensor(name, &shape).unwrap();
            let (q, s) = quantize_fp8_block(&w).unwrap();
            let want_q = fp8.tensor(name, &shape).unwrap();
            let scale_name = name.replace(".weight", ".weight_scale_inv");
            let want_s = fp8
                .tensor(&scale_name, &fp8.shape(&scale_name).unwrap())
                .unwrap();
            assert_eq!(
                s.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want_s.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{name} scales"
            );
            let bits = |t: &Tensor| -> Vec<u32> {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            differing += bits(&q)
                .iter()
                .zip(bits(&want_q))
                .filter(|(a, b)| **a != *b)
                .count();
            checked += 1;
        }
        assert_eq!(checked, 3 * 4 + 2 * 4 * 3 + 3);
        assert_eq!(differing, 0);
    }

    #[test]
    fn quantization_handles_zero_blocks_and_saturates_at_448() {
        let mut v = vec![0f32; 130 * 3];
        v[0] = -3.0;
        v[1] = 1.0;
        let w = Tensor::from_vec(v, (130, 3), &Device::Cpu).unwrap();
        let (q, s) = quantize_fp8_block(&w).unwrap();
        let s: Vec<Vec<f32>> = s.to_vec2().unwrap();
        assert_eq!(s, vec![vec![3.0 / 448.0], vec![1e-12]]);
        let q: Vec<Vec<f32>> = q.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
        assert_eq!(q[0][0], -448.0);
        assert_eq!(q[129], vec![0.0, 0.0, 0.0]);
    }

    /// Sharded and single-file outputs hold the same tensors; an untouched FP8 base is copied
    /// byte for byte.
    #[test]
    fn shards_and_the_fp8_copy_path() {
        let dir = tempfile::tempdir().unwrap();
        let empty = Lora::from_tensors(1, 1.0, Vec::new()).unwrap();
        let one = dir.path().join("one");
        let many = dir.path().join("many");
        std::fs::create_dir_all(&one).unwrap();
        std::fs::create_dir_all(&many).unwrap();
        let base = fixtures().join("fp8");
        let r1 = write_merged(&base, &empty, MergedDtype::Fp8, &one, DEFAULT_SHARD_BYTES).unwrap();
        let r2 = write_merged(&base, &empty, MergedDtype::Fp8, &many, 300_000).unwrap();
        assert_eq!((r1.shards, r1.merged, r1.requantized), (1, 0, 0));
        assert!(r2.shards > 1, "{r2:?}");
        assert_eq!(r1.tensors, r2.tensors);
        let original = std::fs::read(base.join("model.safetensors")).unwrap();
        let original = candle_core::safetensors::load_buffer(&original, &Device::Cpu).unwrap();
        let a = Weights::open(&one, &Device::Cpu).unwrap();
        let b = Weights::open(&many, &Device::Cpu).unwrap();
        assert_eq!(a.names().count(), original.len());
        for (name, t) in &original {
            let raw = |x: &Tensor| -> Vec<f32> {
                x.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let x = a.tensor(name, t.dims()).unwrap();
            let y = b.tensor(name, t.dims()).unwrap();
            assert_eq!(x.dtype(), t.dtype(), "{name}");
            assert_eq!(raw(&x), raw(t), "{name}");
            assert_eq!(raw(&y), raw(t), "{name}");
        }
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(many.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            config["quantization_config"]["weight_block_size"],
            serde_json::json!([128, 128])
        );
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(many.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            index["weight_map"].as_object().unwrap().len(),
            original.len()
        );
        assert!(!many.join("model.safetensors").exists());
    }
}
