//! From mined pairs to training batches.
//!
//! Loads the model's `tokenizer.json` (or trains a byte-level BPE for the embedded `tiny`
//! base), renders each pair with the model's chat template so that the loss falls on target
//! tokens only, packs documents into fixed-length sequences with per-document position ids and
//! attention boundaries, and iterates batches deterministically from a seed with an exact
//! cursor for resume.
//!
//! Not implemented yet: this crate is the trainer issue's work.
