//! Export of a trained adapter to where it is served.
//!
//! Writes and reads PEFT adapters (`adapter_config.json` + `adapter_model.safetensors`, the
//! per-expert key layout that vLLM, SGLang and PEFT load), merges an adapter into the base
//! weights (bf16 or FP8 block-128 re-quantized), and prints the vLLM / SGLang commands that
//! serve it, with the smallest `--max-lora-rank` vLLM accepts for the adapter's rank.
//!
//! Not implemented yet: this crate is the export issue's work.
