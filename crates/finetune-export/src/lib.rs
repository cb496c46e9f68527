//! Export of a trained LoRA adapter to where it is served.
//!
//! Three formats, all written into a hidden temporary directory next to the destination and
//! renamed into place ([`write_dir_atomically`]), so an export exists whole or not at all:
//!
//! - [`adapter::export_peft`]: the per-expert PEFT layout of DESIGN.md ("Export and serving"):
//!   `adapter_config.json` + `adapter_model.safetensors` with keys
//!   `base_model.model.model.layers.{L}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight` and
//!   `….mlp.experts.{E}.{gate,up,down}_proj.lora_{A,B}.weight`, which vLLM and SGLang load.
//!   Checked by construction: every expert of every MoE layer carries gate, up and down with one
//!   rank (vLLM requires it and silently accepts less), missing ones filled with zeros
//!   ([`adapter::complete`], which changes nothing the adapter computes), and read back.
//! - [`fused`]: PEFT's `target_parameters` layout for transformers ≥ 5, which fuses each MoE
//!   layer's experts into 3D `gate_up_proj` / `down_proj` parameters; the same tensors PEFT 0.21
//!   itself builds when it loads the per-expert layout.
//! - [`merge`]: a full Hugging Face checkpoint with W' = W + s·B·A in every adapted
//!   projection, in bf16, f32 or FP8 E4M3 with fresh 128×128 block scales.
//!
//! [`serve`] prints the vLLM / SGLang commands, with the smallest `--max-lora-rank` vLLM
//! accepts for the adapter's rank ([`vllm_max_lora_rank`]).

pub mod adapter;
pub mod fused;
pub mod merge;
pub mod serve;

use finetune_model::peft::{AdapterMeta, PeftError};
use finetune_model::{ConfigError, Lora, Qwen3MoeConfig, WeightsError};
use std::path::{Path, PathBuf};

/// Why an export failed; every message names the file, directory or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A file or directory that cannot be read or written, or holds something unexpected.
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    /// An adapter or model this export cannot write in the asked format.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Peft(#[from] PeftError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

pub(crate) fn file_error(path: &Path, message: impl std::fmt::Display) -> ExportError {
    ExportError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// The values vLLM accepts for `--max-lora-rank` (its default is 16).
pub const VLLM_MAX_LORA_RANKS: [usize; 9] = [1, 8, 16, 32, 64, 128, 256, 320, 512];

/// The largest LoRA rank exported (vLLM's largest `--max-lora-rank`; DESIGN.md: never emit more).
pub const MAX_RANK: usize = 512;

/// The smallest `--max-lora-rank` vLLM accepts that serves an adapter of rank `r`; `None`
/// above 512.
pub fn vllm_max_lora_rank(r: usize) -> Option<usize> {
    VLLM_MAX_LORA_RANKS.into_iter().find(|&m| m >= r)
}

/// The LoRA-adaptable projections of a model, `(name, out, in)`, in the order of
/// [`finetune_model::Qwen3Moe::lora_targets`], from its configuration alone (no weights read).
pub fn lora_targets(config: &Qwen3MoeConfig) -> Vec<(String, usize, usize)> {
    finetune_model::init::tensor_shapes(config)
        .into_iter()
        .filter_map(|(name, shape)| {
            let module = name.strip_suffix(".weight")?;
            (module.starts_with("model.layers.") && module.ends_with("_proj") && shape.len() == 2)
                .then(|| (module.to_string(), shape[0], shape[1]))
        })
        .collect()
}

/// An adapter to export, read and checked against the base model it was trained on.
pub struct Source {
    pub lora: Lora,
    pub meta: AdapterMeta,
    pub config: Qwen3MoeConfig,
    /// The PEFT adapter directory it was read from.
    pub adapter_dir: PathBuf,
    /// The base model's Hugging Face directory (config.json, weights, tokenizer).
    pub base_dir: PathBuf,
}

impl Source {
    /// Reads the PEFT adapter in `adapter_dir` for the model in `base_dir` (only its
    /// config.json is read here). Tensors for modules the model does not have, shapes that do
    /// not fit it, and a rank above [`MAX_RANK`] are refused, naming the file.
    pub fn read(adapter_dir: &Path, base_dir: &Path) -> Result<Self, ExportError> {
        let config = Qwen3MoeConfig::from_file(&base_dir.join("config.json"))?;
        let targets = lora_targets(&config);
        let (lora, meta) = finetune_model::peft::read_adapter(adapter_dir, &targets)?;
        if meta.r > MAX_RANK {
            return Err(file_error(
                &adapter_dir.join("adapter_config.json"),
                format!(
                    "r = {}: above {MAX_RANK}, the largest LoRA rank vLLM serves (its \
                     --max-lora-rank takes {VLLM_MAX_LORA_RANKS:?}); an adapter of this rank \
                     is never exported",
                    meta.r
                ),
            ));
        }
        Ok(Self {
            lora,
            meta,
            config,
            adapter_dir: adapter_dir.to_path_buf(),
            base_dir: base_dir.to_path_buf(),
        })
    }

    /// The base directory as recorded in exported configs (`base_model_name_or_path`): its
    /// absolute path where it can be resolved.
    pub fn base_name(&self) -> String {
        self.base_dir
            .canonicalize()
            .unwrap_or_else(|_| self.base_dir.clone())
            .display()
            .to_string()
    }
}

/// Creates `out` atomically: `fill` writes into a fresh hidden directory next to it, which is
/// then renamed to `out`. An existing `out` is refused unless `replace`; then it is moved aside
/// and deleted only once the new one is in place. On any error nothing is left behind and an
/// existing `out` is untouched.
pub fn write_dir_atomically<T>(
    out: &Path,
    replace: bool,
    fill: impl FnOnce(&Path) -> Result<T, ExportError>,
) -> Result<T, ExportError> {
    if out.exists() && !replace {
        return Err(file_error(
            out,
            "already exists (pass --force to replace it)",
        ));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out
        .file_name()
        .ok_or_else(|| file_error(out, "not a directory path"))?
        .to_string_lossy()
        .into_owned();
    std::fs::create_dir_all(&parent).map_err(|e| file_error(&parent, e))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| file_error(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| file_error(&tmp, e))?;
    let result = fill(&tmp).and_then(|value| {
        make_readable(&tmp)?;
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        let had_old = out.exists();
        if had_old {
            std::fs::rename(out, &old).map_err(|e| file_error(out, e))?;
        }
        if let Err(e) = std::fs::rename(&tmp, out) {
            if had_old {
                let _ = std::fs::rename(&old, out);
            }
            return Err(file_error(out, e));
        }
        if had_old {
            std::fs::remove_dir_all(&old).map_err(|e| file_error(&old, e))?;
        }
        Ok(value)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Gives every file in `dir` read permission for group and others (safetensors writes its
/// files 0600; a served model is often read by another user, e.g. a container's).
fn make_readable(dir: &Path) -> Result<(), ExportError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for entry in std::fs::read_dir(dir).map_err(|e| file_error(dir, e))? {
            let path = entry.map_err(|e| file_error(dir, e))?.path();
            let meta = std::fs::metadata(&path).map_err(|e| file_error(&path, e))?;
            let mode = meta.permissions().mode();
            if meta.is_file() && mode & 0o044 != 0o044 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode | 0o044))
                    .map_err(|e| file_error(&path, e))?;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Writes `bytes` to `path` through a temporary name in the same directory and a rename.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| file_error(path, "not a file path"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    std::fs::write(&tmp, bytes).map_err(|e| file_error(path, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use finetune_model::Preset;

    #[test]
    fn max_lora_rank_is_the_smallest_allowed_value_at_least_r() {
        let cases = [
            (1, 1),
            (2, 8),
            (4, 8),
            (8, 8),
            (9, 16),
            (16, 16),
            (17, 32),
            (200, 256),
            (257, 320),
            (320, 320),
            (321, 512),
            (512, 512),
        ];
        for (r, want) in cases {
            assert_eq!(vllm_max_lora_rank(r), Some(want), "r = {r}");
        }
        assert_eq!(vllm_max_lora_rank(513), None);
    }

    #[test]
    fn targets_from_the_config_equal_the_loaded_models() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Preset::Tiny.config();
        config.num_hidden_layers = 3;
        config.mlp_only_layers = vec![1];
        config.vocab_size = 64;
        finetune_model::init::write_random_checkpoint(&config, 1, dir.path()).unwrap();
        let weights = finetune_model::Weights::open(dir.path(), &candle_core::Device::Cpu).unwrap();
        let model =
            finetune_model::Qwen3Moe::load(config.clone(), &weights, &candle_core::Device::Cpu)
                .unwrap();
        assert_eq!(lora_targets(&config), model.lora_targets());
    }

    #[test]
    fn atomic_directories_appear_whole_and_replace_only_when_asked() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("a/b/export");
        write_dir_atomically(&out, false, |d| {
            std::fs::write(d.join("x"), "1").map_err(|e| file_error(d, e))
        })
        .unwrap();
        assert_eq!(std::fs::read_to_string(out.join("x")).unwrap(), "1");
        let e = write_dir_atomically(&out, false, |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("export") && e.contains("--force"), "{e}");
        // A failing fill leaves the old directory untouched and no temporary behind.
        let e = write_dir_atomically(&out, true, |d| {
            std::fs::write(d.join("y"), "2").unwrap();
            Err::<(), _>(ExportError::Refused("no".into()))
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read_to_string(out.join("x")).unwrap(), "1");
        write_dir_atomically(&out, true, |d| {
            std::fs::write(d.join("y"), "2").map_err(|e| file_error(d, e))
        })
        .unwrap();
        assert!(!out.join("x").exists());
        assert_eq!(std::fs::read_to_string(out.join("y")).unwrap(), "2");
        let names: Vec<_> = std::fs::read_dir(root.path().join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["export"]);
    }
}
