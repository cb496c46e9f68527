//! Fused ops for LoRA training of sparse Mixture-of-Experts models.
//!
//! One module per fused op, each a candle `CustomOp` with `cpu_fwd` (the plain, readable
//! reference that is also the test oracle), `cuda_fwd` (behind the `cuda` feature, sources in
//! the workspace's `kernels/<op>.cu`) and `bwd` side by side. Here so far: [`frozen_linear`]
//! (a frozen projection whose backward returns dX only; CPU reference, CUDA forward as one cuBLAS
//! GEMM through candle, no custom kernel) and
//! [`device`]: which compute devices this build can use and a smoke check that runs a small
//! computation on each and compares it with a plain Rust reference (`finetune doctor`).

pub mod device;
pub mod frozen_linear;

pub use frozen_linear::frozen_linear;

/// Errors of the kernel crate.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// candle refused or failed an operation.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// A CUDA driver call failed (e.g. no GPU, driver too old, library missing).
    #[error("CUDA driver: {0}")]
    Cuda(String),
    /// A device produced a result that differs from the CPU reference.
    #[error(
        "{device}: {what} differs from the reference by {max_abs_err:e} (tolerance {tolerance:e})"
    )]
    Mismatch {
        device: String,
        what: &'static str,
        max_abs_err: f32,
        tolerance: f32,
    },
}

pub type Result<T> = std::result::Result<T, KernelError>;

/// Whether this build was compiled with CUDA support (`--features cuda`).
pub const BUILT_WITH_CUDA: bool = cfg!(feature = "cuda");
