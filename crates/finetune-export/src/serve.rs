//! The commands that serve an export with vLLM and SGLang.
//!
//! vLLM: `vllm serve BASE --enable-lora --lora-modules NAME=PATH --max-lora-rank M`, M the
//! smallest of its allowed values (1, 8, 16, 32, 64, 128, 256, 320, 512; default 16) that is at
//! least the adapter's rank. SGLang: `python -m sglang.launch_server --model-path BASE
//! --enable-lora --lora-paths NAME=PATH --max-lora-rank R` (SGLang infers the rank from the
//! adapters when the flag is left out; giving it keeps the memory reservation explicit).
//! A merged checkpoint is served as a plain model.

use crate::vllm_max_lora_rank;
use std::path::Path;

/// `s` as one shell word: unchanged when it is made of safe characters, else single-quoted.
pub fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-=:,+@%".contains(c));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn path(p: &Path) -> String {
    shell_quote(&p.display().to_string())
}

/// vLLM serving the base with the per-expert PEFT adapter in `adapter` under `name`.
pub fn vllm_adapter(base: &Path, name: &str, adapter: &Path, r: usize) -> String {
    let max = vllm_max_lora_rank(r).unwrap_or(r);
    format!(
        "vllm serve {} --enable-lora --lora-modules {} --max-lora-rank {max}",
        path(base),
        shell_quote(&format!("{name}={}", adapter.display()))
    )
}

/// SGLang serving the base with the per-expert PEFT adapter in `adapter` under `name`.
pub fn sglang_adapter(base: &Path, name: &str, adapter: &Path, r: usize) -> String {
    format!(
        "python -m sglang.launch_server --model-path {} --enable-lora --lora-paths {} --max-lora-rank {r}",
        path(base),
        shell_quote(&format!("{name}={}", adapter.display()))
    )
}

/// vLLM serving a merged checkpoint.
pub fn vllm_model(model: &Path) -> String {
    format!("vllm serve {}", path(model))
}

/// SGLang serving a merged checkpoint.
pub fn sglang_model(model: &Path) -> String {
    format!(
        "python -m sglang.launch_server --model-path {}",
        path(model)
    )
}

/// Python that loads a PEFT adapter directory onto its base with transformers + PEFT (for the
/// fused layout).
pub fn peft_load(base: &Path, adapter: &Path) -> String {
    // A JSON string is a valid Python string literal.
    let lit = |p: &Path| serde_json::Value::from(p.display().to_string()).to_string();
    format!(
        "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({}), {})",
        lit(base),
        lit(adapter)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_name_the_smallest_allowed_rank_and_quote_paths() {
        let base = Path::new("/models/Qwen3-Coder-30B-A3B-Instruct");
        let adapter = Path::new("/runs/x/export/peft");
        assert_eq!(
            vllm_adapter(base, "repo", adapter, 12),
            "vllm serve /models/Qwen3-Coder-30B-A3B-Instruct --enable-lora --lora-modules \
             repo=/runs/x/export/peft --max-lora-rank 16"
        );
        assert_eq!(
            sglang_adapter(base, "repo", adapter, 12),
            "python -m sglang.launch_server --model-path /models/Qwen3-Coder-30B-A3B-Instruct \
             --enable-lora --lora-paths repo=/runs/x/export/peft --max-lora-rank 12"
        );
        assert_eq!(
            vllm_model(Path::new("/a b/it's")),
            r"vllm serve '/a b/it'\''s'"
        );
    }
}
