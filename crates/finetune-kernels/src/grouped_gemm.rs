//! `grouped_gemm`: the MoE experts' frozen GEMM for all experts in one kernel launch, reading
//! an FP8 E4M3 block-128 expert stack directly (or a bf16 one):
//!   nt: y[n] = x[n]·W[e(n)]ᵀ   x `[N, K]`, W `[E, O, K]` → y `[N, O]`   (the forward)
//!   nn: y[n] = x[n]·W[e(n)]    x `[N, O]`, W `[E, O, K]` → y `[N, K]`   (dx of the forward)
//! for the rows n = offsets[e]..offsets[e + 1] of each expert e, with W[e][o][k] =
//! e4m3(q[e][o][k]) · scale_inv[e][o/128][k/128] rounded to bf16 (exactly the weight the default
//! path's `fp8_dequant` materializes before its per-expert cuBLAS GEMMs), bf16 x, f32 sums, y
//! rounded to bf16 once. No backward of its own: the weight is frozen and nn is nt's input
//! gradient.
//!
//! Why: the grouped path runs one cuBLAS GEMM per expert (128 launches per projection, ~37
//! TFLOPS each at 256 rows on the H200, session 4) after dequantizing the whole FP8 stack into a
//! transient bf16 copy (1.2 GB per layer at the 30B-A3B shape). This kernel does both in one
//! launch, dequantizing 64 × 32 weight tiles in shared memory. Not wired into the model: its
//! speed against that path is the open question (`finetune bench kernels` has both rows; a
//! GPU session decides).
//!
//! - CPU (the reference): per row and column, the f32 sum over k of x · bf16(W) in k order.
//! - CUDA (`cuda` feature, kernels/grouped_gemm.cu): WMMA bf16 → f32, 64 × 64 tiles of y per
//!   block of 4 warps, grid = the tile table ([`grouped_tiles`]) × ⌈columns / 64⌉. Written
//!   without a GPU: run on the CPU by the kernel emulator in the tests, never on a GPU yet.

use crate::common::LaunchShape;
use crate::fp8_dequant::{e4m3_table, FP8_BLOCK};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Rows and columns of y per block (GG_M, GG_N in grouped_gemm.cu).
const TILE: usize = 64;

/// The tile table of `offsets`: one (expert, first row, end row) triple per 64 rows of an
/// expert (a partial last tile; nothing for an empty expert).
pub fn grouped_tiles(offsets: &[usize]) -> Vec<u32> {
    let mut tiles = Vec::new();
    for (e, pair) in offsets.windows(2).enumerate() {
        let mut r = pair[0];
        while r < pair[1] {
            let end = (r + TILE).min(pair[1]);
            tiles.extend([e as u32, r as u32, end as u32]);
            r = end;
        }
    }
    tiles
}

/// The launch for `tiles` table entries and `columns` of y: 128 threads a block.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn launch_shape(tiles: usize, columns: usize) -> LaunchShape {
    LaunchShape {
        grid: (tiles as u32, columns.div_ceil(TILE) as u32, 1),
        block: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The expert stack: FP8 bit patterns (`U8` `[E, O, K]`) with their `[E, ⌈O/128⌉, ⌈K/128⌉]`
/// f32 scales, or bf16 `[E, O, K]`.
pub enum Experts<'a> {
    Fp8 {
        q: &'a Tensor,
        scale_inv: &'a Tensor,
    },
    Bf16(&'a Tensor),
}

/// y = x·W[e]ᵀ (`transposed` false, the forward) or x·W[e] (true, its input gradient) per row
/// group (module doc). x bf16, rows sorted by expert (`offsets`, from 0 to N).
pub fn grouped_gemm(
    x: &Tensor,
    experts: Experts<'_>,
    offsets: &Arc<Vec<usize>>,
    transposed: bool,
) -> candle_core::Result<Tensor> {
    let (w, scale) = match experts {
        Experts::Fp8 { q, scale_inv } => (q.clone(), Some(scale_inv.clone())),
        Experts::Bf16(w) => (w.clone(), None),
    };
    let (e, o, k) = w.dims3()?;
    let (n, inp) = x.dims2()?;
    let want_in = if transposed { o } else { k };
    if inp != want_in || offsets.len() != e + 1 || offsets[0] != 0 || offsets[e] != n {
        candle_core::bail!(
            "grouped-gemm: x {:?}, W {:?}, {} offsets ending at {:?}: expected x [N, {want_in}] and E + 1 offsets from 0 to N",
            x.dims(),
            w.dims(),
            offsets.len(),
            offsets.last()
        );
    }
    if offsets.windows(2).any(|p| p[0] > p[1]) || x.dtype() != DType::BF16 {
        candle_core::bail!("grouped-gemm: offsets must not decrease and x must be bf16");
    }
    let fp8 = scale.is_some();
    let scale = match scale {
        Some(s) => {
            let want = [e, o.div_ceil(FP8_BLOCK), k.div_ceil(FP8_BLOCK)];
            if s.dims() != want || s.dtype() != DType::F32 || w.dtype() != DType::U8 {
                candle_core::bail!(
                    "grouped-gemm: FP8 weight {:?} {:?} needs U8 bytes and f32 scales {want:?}, got {:?} {:?}",
                    w.dims(),
                    w.dtype(),
                    s.dims(),
                    s.dtype()
                );
            }
            s
        }
        None => {
            if w.dtype() != DType::BF16 {
                candle_core::bail!("grouped-gemm: weight is {:?}, expected bf16", w.dtype());
            }
            // Unused by the bf16 kernels; an input so that the op has one shape.
            Tensor::zeros(1, DType::F32, x.device())?
        }
    };
    let op = GroupedGemm {
        offsets: offsets.clone(),
        dims: (e, o, k),
        fp8,
        transposed,
    };
    x.contiguous()?
        .apply_op3_no_bwd(&w.contiguous()?, &scale.contiguous()?, &op)
}

struct GroupedGemm {
    offsets: Arc<Vec<usize>>,
    dims: (usize, usize, usize),
    fp8: bool,
    transposed: bool,
}

impl GroupedGemm {
    /// (reduction length, columns of y).
    fn kn(&self) -> (usize, usize) {
        let (_, o, k) = self.dims;
        if self.transposed {
            (o, k)
        } else {
            (k, o)
        }
    }
}

impl CustomOp3 for GroupedGemm {
    fn name(&self) -> &'static str {
        "grouped-gemm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let contiguous = |l: &Layout, what: &str| {
            l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg(format!("grouped-gemm: {what} is not contiguous"))
            })
        };
        let (xa, xb) = contiguous(xl, "x")?;
        let (wa, wb) = contiguous(wl, "W")?;
        let (sa, sb) = contiguous(sl, "scale_inv")?;
        let (CpuStorage::BF16(x), CpuStorage::F32(s)) = (xs, ss) else {
            candle_core::bail!("grouped-gemm: x must be bf16 and the scales f32");
        };
        let (x, s) = (&x[xa..xb], &s[sa..sb]);
        let (e_count, o, k) = self.dims;
        // The weight as the kernel sees it: bf16(e4m3 · scale) or the bf16 value, widened.
        let table = e4m3_table();
        let (s_rows, s_cols) = (o.div_ceil(FP8_BLOCK), k.div_ceil(FP8_BLOCK));
        let weight: Vec<f32> = match ws {
            CpuStorage::U8(q) if self.fp8 => q[wa..wb]
                .iter()
                .enumerate()
                .map(|(i, &b)| {
                    let (e, r, c) = (i / (o * k), (i / k) % o, i % k);
                    let scale = s[(e * s_rows + r / FP8_BLOCK) * s_cols + c / FP8_BLOCK];
                    half::bf16::from_f32(table[b as usize] * scale).to_f32()
                })
                .collect(),
            CpuStorage::BF16(w) if !self.fp8 => w[wa..wb].iter().map(|v| v.to_f32()).collect(),
            other => candle_core::bail!("grouped-gemm: weight storage {:?}", other.dtype()),
        };
        let (red, cols) = self.kn();
        let n = self.offsets[e_count];
        let mut y = vec![half::bf16::ZERO; n * cols];
        let expert_of: Vec<usize> = (0..e_count)
            .flat_map(|e| std::iter::repeat_n(e, self.offsets[e + 1] - self.offsets[e]))
            .collect();
        y.par_chunks_mut(cols.max(1))
            .enumerate()
            .for_each(|(row, out)| {
                let w_e = &weight[expert_of[row] * o * k..];
                let x_row = &x[row * red..(row + 1) * red];
                for (c, y_c) in out.iter_mut().enumerate() {
                    let mut sum = 0f32;
                    for (kk, xv) in x_row.iter().enumerate() {
                        let wv = if self.transposed {
                            w_e[kk * k + c]
                        } else {
                            w_e[c * k + kk]
                        };
                        sum += xv.to_f32() * wv;
                    }
                    *y_c = half::bf16::from_f32(sum);
                }
            });
        Ok((CpuStorage::BF16(y), Shape::from((n, cols))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use crate::common::cuda::view;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let dev = xs.device.clone();
        let (e_count, o, k) = self.dims;
        let (red, cols) = self.kn();
        let n = self.offsets[e_count];
        let x = view::<half::bf16>(xs, xl, self.name(), "x")?;
        let scale = view::<f32>(ss, sl, self.name(), "scale_inv")?;
        // SAFETY: every row belongs to one expert's tile and every column to a column tile, so
        // the kernel writes all of y.
        let y = unsafe { dev.alloc::<half::bf16>(n * cols) }?;
        let tiles = grouped_tiles(&self.offsets);
        if !tiles.is_empty() && cols > 0 {
            let tiles_d = dev.clone_htod(&tiles)?;
            let name = match (self.fp8, self.transposed) {
                (true, false) => "grouped_gemm_fp8_nt",
                (true, true) => "grouped_gemm_fp8_nn",
                (false, false) => "grouped_gemm_bf16_nt",
                (false, true) => "grouped_gemm_bf16_nn",
            };
            let f = dev.get_or_load_custom_func(name, "grouped_gemm", crate::ptx::GROUPED_GEMM)?;
            let (red_i, cols_i, o_i, k_i) = (red as i32, cols as i32, o as i32, k as i32);
            let cfg = LaunchConfig::from(launch_shape(tiles.len() / 3, cols));
            if self.fp8 {
                let w = view::<u8>(ws, wl, self.name(), "W")?;
                let mut b = f.builder();
                b.arg(&x).arg(&w).arg(&scale).arg(&tiles_d).arg(&y);
                b.arg(&red_i).arg(&cols_i).arg(&o_i).arg(&k_i);
                unsafe { b.launch(cfg) }.w()?;
            } else {
                let w = view::<half::bf16>(ws, wl, self.name(), "W")?;
                let mut b = f.builder();
                b.arg(&x).arg(&w).arg(&scale).arg(&tiles_d).arg(&y);
                b.arg(&red_i).arg(&cols_i).arg(&o_i).arg(&k_i);
                unsafe { b.launch(cfg) }.w()?;
            }
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(y, dev),
            Shape::from((n, cols)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::test::data;
    use candle_core::Device;

    /// E4M3 bytes from a stream (NaN patterns 0x7f/0xff replaced: real checkpoints have none).
    fn bytes(n: usize, salt: u64) -> Vec<u8> {
        data(n, salt)
            .iter()
            .map(|v| {
                let b = (v.to_bits() >> 7) as u8;
                if b & 0x7f == 0x7f {
                    b & 0xf0
                } else {
                    b
                }
            })
            .collect()
    }

    struct Case {
        offsets: Vec<usize>,
        o: usize,
        k: usize,
    }

    fn cases() -> Vec<Case> {
        vec![
            // An empty expert first and in the middle, one of 70 rows (a partial second tile),
            // one of 5; O = 192 (a partial column tile, 1.5 scale blocks), K = 160 (a partial
            // reduction step and scale block).
            Case {
                offsets: vec![0, 0, 70, 70, 75],
                o: 192,
                k: 160,
            },
            Case {
                offsets: vec![0, 64, 129],
                o: 64,
                k: 256,
            },
        ]
    }

    fn inputs(c: &Case, transposed: bool) -> (Tensor, Tensor, Tensor, Tensor) {
        let (e, n) = (c.offsets.len() - 1, *c.offsets.last().unwrap());
        let red = if transposed { c.o } else { c.k };
        let x = Tensor::from_vec(data(n * red, 1), (n, red), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let q = Tensor::from_vec(bytes(e * c.o * c.k, 2), (e, c.o, c.k), &Device::Cpu).unwrap();
        let (sr, sc) = (c.o.div_ceil(FP8_BLOCK), c.k.div_ceil(FP8_BLOCK));
        let scale: Vec<f32> = (0..e * sr * sc)
            .map(|i| 0.01 * (1 + i % 7) as f32)
            .collect();
        let scale = Tensor::from_vec(scale, (e, sr, sc), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(data(e * c.o * c.k, 3), (e, c.o, c.k), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        (x, q, scale, w)
    }

    /// The CPU reference against the default path's composition: fp8_dequant to bf16 per
    /// expert, then a matmul per expert (f32), rounded once.
    #[test]
    fn reference_equals_dequantize_then_matmul_per_expert() {
        for c in cases() {
            for transposed in [false, true] {
                let (x, q, scale, w) = inputs(&c, transposed);
                let offsets = Arc::new(c.offsets.clone());
                let got_fp8 = grouped_gemm(
                    &x,
                    Experts::Fp8 {
                        q: &q,
                        scale_inv: &scale,
                    },
                    &offsets,
                    transposed,
                )
                .unwrap();
                let got_bf16 = grouped_gemm(&x, Experts::Bf16(&w), &offsets, transposed).unwrap();
                for (got, fp8) in [(got_fp8, true), (got_bf16, false)] {
                    let mut rows = Vec::new();
                    for (e, pair) in c.offsets.windows(2).enumerate() {
                        if pair[0] == pair[1] {
                            continue;
                        }
                        let we = if fp8 {
                            crate::fp8_dequant(
                                &q.get(e).unwrap(),
                                &scale.get(e).unwrap(),
                                DType::BF16,
                            )
                            .unwrap()
                        } else {
                            w.get(e).unwrap()
                        };
                        let we = we.to_dtype(DType::F32).unwrap();
                        let we = if transposed { we } else { we.t().unwrap() };
                        let xe = x
                            .narrow(0, pair[0], pair[1] - pair[0])
                            .unwrap()
                            .to_dtype(DType::F32)
                            .unwrap();
                        rows.push(xe.matmul(&we).unwrap());
                    }
                    let want = Tensor::cat(&rows, 0)
                        .unwrap()
                        .to_dtype(DType::BF16)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap();
                    let got = got.to_dtype(DType::F32).unwrap();
                    // Sums in another order before the one bf16 rounding: at most one bf16 ulp.
                    let d = crate::common::test::rel_diff(&got, &want);
                    assert!(d < 1e-2, "fp8 {fp8} transposed {transposed}: {d}");
                }
            }
        }
    }

    /// kernels/grouped_gemm.cu (all four entry points) on the CPU by the kernel emulator, with
    /// the CUDA launch's tile table, geometry and arguments, both fiber orders, against the CPU
    /// reference: within one bf16 rounding (the WMMA sums run in another order than the
    /// reference's, in f32, before the same single rounding).
    #[test]
    fn emulated_kernels_equal_the_cpu_reference() {
        use finetune_kernel_emu::{launch, Buffer, Order};
        use std::ffi::c_void;
        type Entry = unsafe extern "C" fn(
            *const u16,
            *const c_void,
            *const f32,
            *const u32,
            *mut u16,
            i32,
            i32,
            i32,
            i32,
        );
        /// The four entry points share one signature (grouped_gemm.cu's GG_ENTRY).
        macro_rules! entries {
            ($($name:ident),*) => {
                extern "C" {
                    $(fn $name(x: *const u16, w: *const c_void, s: *const f32, t: *const u32,
                        y: *mut u16, kd: i32, nd: i32, wr: i32, wc: i32);)*
                }
            };
        }
        entries!(
            grouped_gemm_fp8_nt,
            grouped_gemm_fp8_nn,
            grouped_gemm_bf16_nt,
            grouped_gemm_bf16_nn
        );
        let bits = |t: &Tensor| -> Vec<u16> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<half::bf16>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        for c in cases() {
            let n = *c.offsets.last().unwrap();
            let offsets = Arc::new(c.offsets.clone());
            let tiles = grouped_tiles(&c.offsets);
            for transposed in [false, true] {
                let (x, q, scale, w) = inputs(&c, transposed);
                let (red, cols) = if transposed { (c.o, c.k) } else { (c.k, c.o) };
                for fp8 in [true, false] {
                    let experts = if fp8 {
                        Experts::Fp8 {
                            q: &q,
                            scale_inv: &scale,
                        }
                    } else {
                        Experts::Bf16(&w)
                    };
                    let want = grouped_gemm(&x, experts, &offsets, transposed)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap();
                    let entry: Entry = match (fp8, transposed) {
                        (true, false) => grouped_gemm_fp8_nt,
                        (true, true) => grouped_gemm_fp8_nn,
                        (false, false) => grouped_gemm_bf16_nt,
                        (false, true) => grouped_gemm_bf16_nn,
                    };
                    for order in Order::BOTH {
                        let xb = Buffer::from_slice(&bits(&x));
                        let wq =
                            Buffer::from_slice(&q.flatten_all().unwrap().to_vec1::<u8>().unwrap());
                        let wb = Buffer::from_slice(&bits(&w));
                        let sb = Buffer::from_slice(
                            &scale.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        );
                        let tb = Buffer::from_slice(&tiles);
                        let y = Buffer::filled(n * cols, 0x7fc0u16); // bf16 NaN
                        let weights: *const c_void = if fp8 {
                            wq.ptr().cast()
                        } else {
                            wb.ptr().cast()
                        };
                        launch(
                            launch_shape(tiles.len() / 3, cols).into(),
                            order,
                            || unsafe {
                                entry(
                                    xb.ptr(),
                                    weights,
                                    sb.ptr(),
                                    tb.ptr(),
                                    y.mut_ptr(),
                                    red as i32,
                                    cols as i32,
                                    c.o as i32,
                                    c.k as i32,
                                )
                            },
                        )
                        .unwrap();
                        let got: Vec<f32> = y
                            .to_vec()
                            .iter()
                            .map(|&b| half::bf16::from_bits(b).to_f32())
                            .collect();
                        let got = Tensor::from_vec(got, (n, cols), &Device::Cpu).unwrap();
                        let d = crate::common::test::rel_diff(&got, &want);
                        eprintln!("emulated grouped-gemm {:?} fp8 {fp8} nn {transposed} {order:?}: {d:.2e}", c.offsets);
                        assert!(
                            d < 1e-2,
                            "{:?} fp8 {fp8} transposed {transposed} {order:?}: {d}",
                            c.offsets
                        );
                    }
                }
            }
        }
    }

    /// On a GPU: the CUDA op against the CPU reference (within one bf16 rounding).
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_equals_the_cpu_reference() {
        let Some(gpu) = crate::common::test::gpu() else {
            eprintln!("no CUDA device: skipped");
            return;
        };
        for c in cases() {
            let offsets = Arc::new(c.offsets.clone());
            for transposed in [false, true] {
                let (x, q, scale, w) = inputs(&c, transposed);
                let on = |t: &Tensor| t.to_device(&gpu).unwrap();
                let (xg, qg, sg, wg) = (on(&x), on(&q), on(&scale), on(&w));
                for fp8 in [true, false] {
                    let (cpu, dev) = if fp8 {
                        (
                            Experts::Fp8 {
                                q: &q,
                                scale_inv: &scale,
                            },
                            Experts::Fp8 {
                                q: &qg,
                                scale_inv: &sg,
                            },
                        )
                    } else {
                        (Experts::Bf16(&w), Experts::Bf16(&wg))
                    };
                    let want = grouped_gemm(&x, cpu, &offsets, transposed).unwrap();
                    let got = grouped_gemm(&xg, dev, &offsets, transposed).unwrap();
                    let d = crate::common::test::rel_diff(&got, &want);
                    eprintln!(
                        "grouped-gemm cuda {:?} fp8 {fp8} nn {transposed}: {d:e}",
                        c.offsets
                    );
                    assert!(d < 1e-2, "fp8 {fp8} transposed {transposed}: {d}");
                }
            }
        }
    }

    #[test]
    fn tiles_cover_each_expert_in_64_row_pieces() {
        assert_eq!(
            grouped_tiles(&[0, 0, 70, 70, 75]),
            vec![1, 0, 64, 1, 64, 70, 3, 70, 75]
        );
        assert!(grouped_tiles(&[0, 0, 0]).is_empty());
    }
}
