//! Per-rank sharded loading of the base weights, for parallel training: a [`BaseShard`] names
//! the experts, query heads and vocabulary rows one rank computes with, and the [`Weights`]
//! methods here read only those bytes from the memory-mapped safetensors (one file or the
//! shards of an index):
//! - an expert the rank does not hold is checked by name and shape and never read;
//! - q/k/v are cut to the rows of the rank's query heads and their key/value heads, o_proj to
//!   the matching columns ([`Cut::Rows`], [`Cut::Cols`]);
//! - embed_tokens and lm_head to the rank's vocabulary rows (vocabulary parallelism);
//! - everything else (norms, routers, dense MLPs) is read whole.
//!
//! FP8 block-128 weights (`W[i][j] = q[i][j] · scale_inv[i/128][j/128]`) are cut on block
//! boundaries together with their `weight_scale_inv` rows or columns and stay FP8 (1 byte per
//! weight). A cut that does not fall on a block boundary — a slice of `heads · head_dim` rows with
//! `head_dim · heads` not a multiple of 128, which no Qwen3-Coder checkpoint has (head_dim 128)
//! but toy models do — falls back to dequantizing just that slice: the covering blocks are read,
//! dequantized in f32 and narrowed, and the rank holds the slice as a dense f32 weight (exactly
//! the values of dequantize-then-slice; 4 bytes per weight for that tensor). A vocabulary cut of
//! an FP8 lm_head takes the same fallback unless its rows fall on block boundaries.

use crate::config::Qwen3MoeConfig;
use crate::weights::{BaseWeight, Weights, WeightsError, FP8_BLOCK};
use candle_core::{DType, Device, Tensor};
use std::ops::Range;

/// The part of the base weights a rank holds, in global indices: experts (of every MoE layer),
/// query heads (with their key/value heads: whole groups), vocabulary rows (of embed_tokens and
/// lm_head). [`BaseShard::whole`] is the single-device model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseShard {
    pub experts: Range<usize>,
    pub heads: Range<usize>,
    pub vocab: Range<usize>,
}

impl BaseShard {
    /// Every expert, head and vocabulary row of `config`.
    pub fn whole(config: &Qwen3MoeConfig) -> Self {
        Self {
            experts: 0..config.num_experts,
            heads: 0..config.num_attention_heads,
            vocab: 0..config.vocab_size,
        }
    }

    pub fn is_whole(&self, config: &Qwen3MoeConfig) -> bool {
        *self == Self::whole(config)
    }

    /// The key/value heads of the shard's query heads.
    pub fn kv_heads(&self, config: &Qwen3MoeConfig) -> Range<usize> {
        let group = config.num_attention_heads / config.num_key_value_heads.max(1);
        self.heads.start / group..self.heads.end / group
    }

    /// Whether this shard holds everything `other` needs.
    pub fn covers(&self, other: &BaseShard) -> bool {
        let within = |a: &Range<usize>, b: &Range<usize>| {
            b.is_empty() || (a.start <= b.start && b.end <= a.end)
        };
        within(&self.experts, &other.experts)
            && within(&self.heads, &other.heads)
            && within(&self.vocab, &other.vocab)
    }

    /// Checks the ranges against `config`: inside it, heads non-empty and covering whole
    /// key/value groups, vocabulary non-empty, experts non-empty when a layer has experts.
    pub fn check(&self, config: &Qwen3MoeConfig) -> Result<(), String> {
        let (nh, nkv) = (config.num_attention_heads, config.num_key_value_heads);
        let group = nh / nkv.max(1);
        let has_moe = (0..config.num_hidden_layers).any(|i| config.is_moe_layer(i));
        if self.heads.is_empty()
            || self.heads.end > nh
            || self.heads.start % group != 0
            || self.heads.end % group != 0
        {
            return Err(format!(
                "heads {:?} are not whole groups of {group} query heads within {nh} heads",
                self.heads
            ));
        }
        if self.vocab.is_empty() || self.vocab.end > config.vocab_size {
            return Err(format!(
                "vocabulary rows {:?} of a vocabulary of {}",
                self.vocab, config.vocab_size
            ));
        }
        if self.experts.end > config.num_experts || (has_moe && self.experts.is_empty()) {
            return Err(format!(
                "experts {:?} of {} experts",
                self.experts, config.num_experts
            ));
        }
        Ok(())
    }
}

/// Which part of a 2-D `[out, in]` tensor to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cut {
    Rows(Range<usize>),
    Cols(Range<usize>),
}

impl Cut {
    /// The cut's range and the length of the dimension it cuts, of a `[rows, cols]` tensor.
    fn range_of(&self, rows: usize, cols: usize) -> (&Range<usize>, usize) {
        match self {
            Cut::Rows(r) => (r, rows),
            Cut::Cols(c) => (c, cols),
        }
    }

    /// The shape of the cut.
    fn shape(&self, rows: usize, cols: usize) -> [usize; 2] {
        match self {
            Cut::Rows(r) => [r.len(), cols],
            Cut::Cols(c) => [rows, c.len()],
        }
    }

    /// The same cut over `range` instead.
    fn with(&self, range: Range<usize>) -> Cut {
        match self {
            Cut::Rows(_) => Cut::Rows(range),
            Cut::Cols(_) => Cut::Cols(range),
        }
    }

    fn dim(&self) -> usize {
        match self {
            Cut::Rows(_) => 0,
            Cut::Cols(_) => 1,
        }
    }
}

/// The bytes of `cut` of a row-major `[rows, cols]` tensor of `elem`-byte elements.
fn cut_bytes(data: &[u8], rows: usize, cols: usize, elem: usize, cut: &Cut) -> Vec<u8> {
    match cut {
        // Contiguous: one copy.
        Cut::Rows(r) => data[r.start * cols * elem..r.end * cols * elem].to_vec(),
        Cut::Cols(c) => {
            let mut out = Vec::with_capacity(rows * c.len() * elem);
            for i in 0..rows {
                out.extend_from_slice(
                    &data[(i * cols + c.start) * elem..(i * cols + c.end) * elem],
                );
            }
            out
        }
    }
}

impl Weights {
    /// The stored view of `name`, checked against `expected` and marked used.
    pub(crate) fn checked_view(
        &self,
        name: &str,
        expected: &[usize],
    ) -> Result<safetensors::tensor::TensorView<'_>, WeightsError> {
        if !self.contains(name) {
            return Err(WeightsError::Missing {
                name: name.into(),
                expected: expected.to_vec(),
            });
        }
        let view = self.st.get(name)?;
        if view.shape() != expected {
            return Err(WeightsError::Shape {
                name: name.into(),
                found: view.shape().to_vec(),
                expected: expected.to_vec(),
            });
        }
        self.used.borrow_mut().insert(name.into());
        Ok(view)
    }

    /// Checks that projection `prefix.weight` `[out, in]` (and its FP8 scales, if it has them)
    /// is there with its shape, without reading it: another rank holds it. It then counts as
    /// used for [`Weights::check_all_used`].
    pub fn skip_base_weight(
        &self,
        prefix: &str,
        out: usize,
        inp: usize,
    ) -> Result<(), WeightsError> {
        let name = format!("{prefix}.weight");
        let view = self.checked_view(&name, &[out, inp])?;
        if DType::try_from(view.dtype())? == DType::F8E4M3 {
            let blocks = [out.div_ceil(FP8_BLOCK), inp.div_ceil(FP8_BLOCK)];
            self.checked_view(&format!("{prefix}.weight_scale_inv"), &blocks)?;
        }
        Ok(())
    }

    /// `cut` of the 2-D tensor `name` of shape `expected` (stored dtype), read alone from the
    /// files; the whole tensor when the cut spans it.
    pub fn tensor_cut(
        &self,
        name: &str,
        expected: [usize; 2],
        cut: &Cut,
    ) -> Result<Tensor, WeightsError> {
        let [rows, cols] = expected;
        let (range, len) = cut.range_of(rows, cols);
        if *range == (0..len) {
            return self.tensor(name, &expected);
        }
        let view = self.checked_view(name, &expected)?;
        check_range(name, range, len)?;
        let dtype = DType::try_from(view.dtype())?;
        let bytes = cut_bytes(view.data(), rows, cols, dtype.size_in_bytes(), cut);
        Ok(Tensor::from_raw_buffer(
            &bytes,
            dtype,
            &cut.shape(rows, cols),
            &self.device,
        )?)
    }

    /// `cut` of projection `prefix.weight` `[out, in]` in its stored precision, read alone
    /// from the files: [`Weights::base_weight`] when the cut spans it. FP8 stays FP8 when the
    /// cut falls on 128-block boundaries (its scales cut to the same blocks); otherwise that
    /// slice alone is dequantized to f32 (the module doc).
    pub fn base_weight_cut(
        &self,
        prefix: &str,
        out: usize,
        inp: usize,
        cut: &Cut,
    ) -> Result<BaseWeight, WeightsError> {
        let (range, len) = cut.range_of(out, inp);
        if *range == (0..len) {
            return self.base_weight(prefix, out, inp);
        }
        let name = format!("{prefix}.weight");
        let view = self.checked_view(&name, &[out, inp])?;
        check_range(&name, range, len)?;
        let dtype = DType::try_from(view.dtype())?;
        match dtype {
            DType::F32 | DType::BF16 | DType::F16 => {
                let bytes = cut_bytes(view.data(), out, inp, dtype.size_in_bytes(), cut);
                Ok(BaseWeight::Dense(Tensor::from_raw_buffer(
                    &bytes,
                    dtype,
                    &cut.shape(out, inp),
                    &self.device,
                )?))
            }
            DType::F8E4M3 => {
                let scale_name = format!("{prefix}.weight_scale_inv");
                let blocks = [out.div_ceil(FP8_BLOCK), inp.div_ceil(FP8_BLOCK)];
                let scales = self.checked_view(&scale_name, &blocks)?;
                let scale_dtype = DType::try_from(scales.dtype())?;
                // The blocks the cut touches, and the weights they cover.
                let block_range = range.start / FP8_BLOCK..range.end.div_ceil(FP8_BLOCK);
                let covered = block_range.start * FP8_BLOCK..(block_range.end * FP8_BLOCK).min(len);
                let aligned = covered == *range;
                let q_bytes = cut_bytes(view.data(), out, inp, 1, &cut.with(covered.clone()));
                let s_bytes = cut_bytes(
                    scales.data(),
                    blocks[0],
                    blocks[1],
                    scale_dtype.size_in_bytes(),
                    &cut.with(block_range.clone()),
                );
                let q_shape = cut.with(covered.clone()).shape(out, inp);
                let s_shape = cut.with(block_range).shape(blocks[0], blocks[1]);
                if aligned {
                    let q = if self.device.is_cpu() {
                        Tensor::from_raw_buffer(&q_bytes, DType::F8E4M3, &q_shape, &Device::Cpu)?
                    } else {
                        // The E4M3 bit patterns as U8 (see BaseWeight::Fp8).
                        Tensor::from_raw_buffer(&q_bytes, DType::U8, &q_shape, &self.device)?
                    };
                    let scale_inv =
                        Tensor::from_raw_buffer(&s_bytes, scale_dtype, &s_shape, &self.device)?;
                    return Ok(BaseWeight::Fp8 { q, scale_inv });
                }
                // Not on block boundaries: dequantize the covering blocks on the CPU, keep the
                // slice in f32.
                let q = Tensor::from_raw_buffer(&q_bytes, DType::F8E4M3, &q_shape, &Device::Cpu)?;
                let scale_inv =
                    Tensor::from_raw_buffer(&s_bytes, scale_dtype, &s_shape, &Device::Cpu)?
                        .to_dtype(DType::F32)?;
                let w = BaseWeight::Fp8 { q, scale_inv }
                    .dequantize(DType::F32)?
                    .narrow(cut.dim(), range.start - covered.start, range.len())?
                    .contiguous()?
                    .to_device(&self.device)?;
                Ok(BaseWeight::Dense(w))
            }
            found => Err(WeightsError::Dtype {
                name,
                found,
                expected: "f32, bf16, f16 or FP8 E4M3 with weight_scale_inv",
            }),
        }
    }
}

fn check_range(name: &str, range: &Range<usize>, len: usize) -> Result<(), WeightsError> {
    if range.is_empty() || range.end > len {
        return Err(WeightsError::Slice {
            name: name.into(),
            message: format!("cannot cut {range:?} of a dimension of {len}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A safetensors file of `tensors` (name, dtype, shape, bytes) in `dir`.
    fn write(dir: &std::path::Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            header.insert(
                name.to_string(),
                serde_json::json!({
                    "dtype": dtype,
                    "shape": shape,
                    "data_offsets": [data.len(), data.len() + bytes.len()],
                }),
            );
            data.extend_from_slice(bytes);
        }
        let mut h = serde_json::Value::Object(header).to_string();
        while h.len() % 8 != 0 {
            h.push(' ');
        }
        let mut buf = (h.len() as u64).to_le_bytes().to_vec();
        buf.extend_from_slice(h.as_bytes());
        buf.extend(data);
        std::fs::write(dir.join("model.safetensors"), buf).unwrap();
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// An FP8 weight `[300, 400]` (3 × 4 blocks, the last ones partial) with distinct scales:
    /// every cut — on block boundaries (FP8 kept, its scales cut), across them (the f32
    /// fallback), to the ragged end — equals dequantizing the whole weight and slicing it,
    /// exactly; and an f32 weight's cuts are its slices, byte for byte.
    #[test]
    fn fp8_cuts_equal_dequantize_then_slice() {
        let dir = tempfile::tempdir().unwrap();
        let (out, inp) = (300usize, 400usize);
        // Finite E4M3 patterns only (0x7f / 0xff are NaN).
        let q: Vec<u8> = (0..out * inp)
            .map(|i| {
                let b = ((i * 37 + i / 400 * 11) % 254) as u8;
                if b & 0x7f == 0x7f {
                    0x3c
                } else {
                    b
                }
            })
            .collect();
        let scales: Vec<f32> = (0..3 * 4).map(|i| 0.25 + i as f32 * 0.375).collect();
        let dense: Vec<f32> = (0..out * inp).map(|i| (i as f32 * 0.01).sin()).collect();
        let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        write(
            dir.path(),
            &[
                ("p.weight", "F8_E4M3", vec![out, inp], q),
                ("p.weight_scale_inv", "F32", vec![3, 4], f32_bytes(&scales)),
                ("d.weight", "F32", vec![out, inp], f32_bytes(&dense)),
            ],
        );
        let w = Weights::open(dir.path(), &Device::Cpu).unwrap();
        let whole = w
            .base_weight("p", out, inp)
            .unwrap()
            .dequantize(DType::F32)
            .unwrap();
        let whole_d = Tensor::from_vec(dense, (out, inp), &Device::Cpu).unwrap();
        let cases: Vec<(Cut, bool)> = vec![
            (Cut::Rows(128..256), true),
            (Cut::Rows(256..300), true),
            (Cut::Rows(0..128), true),
            (Cut::Rows(80..200), false),
            (Cut::Rows(130..131), false),
            (Cut::Cols(128..384), true),
            (Cut::Cols(256..400), true),
            (Cut::Cols(40..300), false),
            (Cut::Cols(390..400), false),
        ];
        let mut seen: HashMap<bool, usize> = HashMap::new();
        for (cut, aligned) in cases {
            let (range, _) = cut.range_of(out, inp);
            let want = whole.narrow(cut.dim(), range.start, range.len()).unwrap();
            let got = w.base_weight_cut("p", out, inp, &cut).unwrap();
            match (&got, aligned) {
                (BaseWeight::Fp8 { q, scale_inv }, true) => {
                    assert_eq!(q.dims(), want.dims(), "{cut:?}");
                    let blocks = range.len().div_ceil(FP8_BLOCK);
                    let sd = scale_inv.dims();
                    assert_eq!(sd[cut.dim()], blocks, "{cut:?}: scales {sd:?}");
                }
                (BaseWeight::Dense(t), false) => assert_eq!(t.dtype(), DType::F32, "{cut:?}"),
                _ => panic!("{cut:?}: aligned {aligned}, got {got:?}"),
            }
            let got = got.dequantize(DType::F32).unwrap();
            assert_eq!(got.dims(), want.dims(), "{cut:?}");
            assert_eq!(values(&got), values(&want), "{cut:?}");
            let d = w.base_weight_cut("d", out, inp, &cut).unwrap();
            let wd = whole_d.narrow(cut.dim(), range.start, range.len()).unwrap();
            assert_eq!(
                values(&d.dequantize(DType::F32).unwrap()),
                values(&wd),
                "{cut:?}"
            );
            *seen.entry(aligned).or_default() += 1;
        }
        assert_eq!((seen[&true], seen[&false]), (5, 4));
        // A cut past the end names the tensor.
        let e = w
            .base_weight_cut("p", out, inp, &Cut::Rows(200..301))
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.weight") && e.contains("200..301"), "{e}");
        // Skipping checks the shape without reading, and counts weight and scales as used.
        let e = w
            .skip_base_weight("p", out, inp + 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.weight") && e.contains("[300, 400]"), "{e}");
        w.skip_base_weight("p", out, inp).unwrap();
        w.check_all_used().unwrap();
    }
}
