//! From mined pairs to training batches.
//!
//! Loads the model's `tokenizer.json` (or trains a byte-level BPE for the embedded `tiny`
//! base, [`tokenizer`]), renders each pair with the model's chat template so that the loss
//! falls on target tokens only ([`render`]), packs documents into fixed-length sequences with
//! per-document position ids, and reads them deterministically from a seed with an exact
//! cursor for resume ([`pack`]).

pub mod pack;
pub mod render;
pub mod tokenizer;

pub use pack::{pack, Batches, Cursor, Sequence};
pub use render::{
    encode_pairs, prompt_ids, read_pairs, EncodeStats, Example, OverLength, PairMeta, PairText,
    Template,
};
pub use tokenizer::{load_tokenizer, train_byte_level_bpe, SPECIAL_TOKENS};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {message}", path.display())]
    Io { path: PathBuf, message: String },
    #[error("{}: tokenizer: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    #[error("{}:{line}: not a training pair: {message}", path.display())]
    BadPair {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("tokenizing failed: {0}")]
    Encode(String),
}
