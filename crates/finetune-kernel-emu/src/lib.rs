//! Runs the CUDA kernels of `kernels/*.cu` on the CPU, so that a machine without a GPU (CI,
//! most development sessions) executes every kernel and compares it with its CPU reference.
//!
//! `build.rs` compiles the kernel files as C++ against `emu/cuda_emu.h`; each kernel keeps its
//! `extern "C"` name, so a test declares it as an `extern "C"` function with the argument list
//! the crate's CUDA launch passes and calls it inside [`launch`]'s thread body. A launch runs
//! its blocks one after the other; a block's threads are fibers scheduled cooperatively at
//! every `__syncthreads`, `__syncwarp` and shuffle (see `emu/runtime.cpp`). What this checks:
//! the kernel's arithmetic and indexing, its barriers (a thread runs alone until it blocks, so
//! a read of shared memory before the barrier that orders it sees stale data — run both
//! [`Order`]s), warp operations whose mask names an exited or absent lane, deadlocks, WMMA
//! alignment rules, reads past the end of a [`Buffer`] or of the dynamic shared memory (guard
//! pages: the test process faults). What it cannot: timing, memory-model subtleties between
//! warps that the cooperative schedule hides, the tensor cores' internal summation order, and
//! whatever the host code does with the CUDA driver (that stays for the GPU tests).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;

/// The order in which a block's fibers are resumed. A kernel whose result depends on it reads
/// shared memory without the barrier that would order the read after the write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Thread 0 first.
    Ascending,
    /// The last thread first.
    Descending,
}

impl Order {
    /// Both orders, for tests that run every launch twice.
    pub const BOTH: [Order; 2] = [Order::Ascending, Order::Descending];
}

/// A launch's geometry, as in `cudarc::driver::LaunchConfig`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

/// What made a launch fail: undefined behaviour the scheduler saw, or a geometry the device
/// would refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchError(pub String);

impl fmt::Display for LaunchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "emulated kernel launch failed: {}", self.0)
    }
}

impl std::error::Error for LaunchError {}

extern "C" {
    fn finetune_emu_launch(
        gx: u32,
        gy: u32,
        gz: u32,
        bx: u32,
        by: u32,
        bz: u32,
        shared_bytes: u32,
        order: c_int,
        body: extern "C" fn(*const c_void),
        context: *const c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

/// Runs `thread` once per CUDA thread of `geometry`, each call seeing its own `threadIdx` and
/// `blockIdx` inside the kernel it calls. `thread` must call exactly one kernel and must not
/// panic (it runs on a fiber stack; a panic aborts the process).
pub fn launch<F: Fn()>(geometry: Geometry, order: Order, thread: F) -> Result<(), LaunchError> {
    extern "C" fn trampoline<F: Fn()>(context: *const c_void) {
        // SAFETY: `context` is the `&F` passed below, alive for the whole launch.
        let thread = unsafe { &*(context as *const F) };
        thread();
    }
    let mut error = vec![0 as c_char; 1024];
    let Geometry {
        grid,
        block,
        shared_mem_bytes,
    } = geometry;
    // SAFETY: the runtime calls `trampoline::<F>` with `&thread` only during this call, on this
    // OS thread; `error` is writable for its length.
    let rc = unsafe {
        finetune_emu_launch(
            grid.0,
            grid.1,
            grid.2,
            block.0,
            block.1,
            block.2,
            shared_mem_bytes,
            match order {
                Order::Ascending => 0,
                Order::Descending => 1,
            },
            trampoline::<F>,
            &thread as *const F as *const c_void,
            error.as_mut_ptr(),
            error.len(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        // SAFETY: the runtime NUL-terminates the message within the buffer.
        let msg = unsafe { CStr::from_ptr(error.as_ptr()) };
        Err(LaunchError(msg.to_string_lossy().into_owned()))
    }
}

/// "Device" memory for an emulated kernel: `len` elements that end exactly at an inaccessible
/// page, so a kernel reading or writing past the end faults instead of passing by chance.
pub struct Buffer<T: Copy> {
    map: *mut c_void,
    map_len: usize,
    data: *mut T,
    len: usize,
}

impl<T: Copy> Buffer<T> {
    /// A copy of `values`.
    pub fn from_slice(values: &[T]) -> Self {
        let buffer = Self::uninit(values.len());
        // SAFETY: `data` has room for `values.len()` elements and does not overlap `values`.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), buffer.data, values.len()) };
        buffer
    }

    /// `len` copies of `value` (a kernel's output buffer: fill it with a value the kernel
    /// must overwrite, such as NaN, to see what it leaves out).
    pub fn filled(len: usize, value: T) -> Self {
        let buffer = Self::uninit(len);
        for i in 0..len {
            // SAFETY: i < len.
            unsafe { buffer.data.add(i).write(value) };
        }
        buffer
    }

    fn uninit(len: usize) -> Self {
        // SAFETY: plain anonymous mappings; the last page is made inaccessible.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
            let bytes = len * std::mem::size_of::<T>();
            let map_len = bytes.div_ceil(page) * page + page;
            let map = libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert!(map != libc::MAP_FAILED, "mmap of {map_len} bytes failed");
            let guard = (map as *mut u8).add(map_len - page);
            assert_eq!(
                libc::mprotect(guard as *mut c_void, page, libc::PROT_NONE),
                0
            );
            // The last element ends at the guard page. The start is aligned for T (the guard
            // is page-aligned and `bytes` a multiple of T's size) and 16-byte aligned when
            // `bytes` is a multiple of 16, as a kernel's vector loads of whole rows expect.
            let start = guard as usize - bytes;
            Buffer {
                map,
                map_len,
                data: start as *mut T,
                len,
            }
        }
    }

    /// The device pointer to pass to a kernel.
    pub fn ptr(&self) -> *const T {
        self.data
    }

    /// The device pointer to pass to a kernel that writes the buffer.
    pub fn mut_ptr(&self) -> *mut T {
        self.data
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer's contents.
    pub fn to_vec(&self) -> Vec<T> {
        // SAFETY: `data` holds `len` initialised elements.
        unsafe { std::slice::from_raw_parts(self.data, self.len).to_vec() }
    }
}

impl<T: Copy> Drop for Buffer<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `uninit`.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

/// The first index where `got` and `want` differ bit for bit (NaN payloads included), with
/// both values: `None` when equal. For assertions that stay readable on large outputs.
pub fn first_bit_difference(got: &[f32], want: &[f32]) -> Option<(usize, f32, f32)> {
    if got.len() != want.len() {
        return Some((got.len().min(want.len()), f32::NAN, f32::NAN));
    }
    got.iter()
        .zip(want)
        .position(|(a, b)| a.to_bits() != b.to_bits())
        .map(|i| (i, got[i], want[i]))
}

/// The largest |got − want| relative to max(1, |want|) and where it is; NaN in either side
/// where the other is not NaN counts as infinite. For comparisons within a tolerance.
pub fn max_relative_difference(got: &[f32], want: &[f32]) -> (f32, usize) {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let mut worst = (0f32, 0usize);
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let d = if a.is_nan() || b.is_nan() {
            if a.is_nan() && b.is_nan() {
                0.0
            } else {
                f32::INFINITY
            }
        } else {
            (a - b).abs() / b.abs().max(1.0)
        };
        if d > worst.0 {
            worst = (d, i);
        }
    }
    worst
}
