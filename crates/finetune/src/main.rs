//! The `finetune` binary: sets the CPU runtime up (allocator and thread settings, see
//! [`runtime_defaults`]), parses the command line and hands over to the library.
use clap::Parser;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    /// mimalloc's option setter (the C library linked in by the `mimalloc` crate, v3).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_t` (include/mimalloc.h of
/// libmimalloc-sys 0.1.49: show_errors = 0 … deprecated_eager_commit_delay = 14,
/// purge_delay = 15; the same index in v2). A test below reads it back by name.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// The runtime settings of DESIGN.md "CPU speed" that cost nothing, each applied only where
/// the user has not set it in the environment:
/// - mimalloc keeps freed memory instead of returning it to the OS after 10 ms
///   (`MIMALLOC_PURGE_DELAY=-1`): a training step frees and re-allocates the same large
///   buffers, and every return made the next step fault the pages in and zero them again;
/// - `RAYON_NUM_THREADS` = the available cores: candle reads it on every matmul and would
///   otherwise count the physical cores from /proc/cpuinfo each time;
/// - `CANDLE_NUM_THREADS=1`: candle's element-wise ops run on the calling thread instead of
///   its own spin-waiting barrier pool, whose threads fought the rayon threads (gemm and our
///   fused ops) for the cores: measured 30% of a step's cycles spent spinning on 2 cores.
fn runtime_defaults() {
    let unset = |name: &str| std::env::var_os(name).is_none();
    if unset("MIMALLOC_PURGE_DELAY") {
        // SAFETY: a plain option store in the allocator, before any other thread exists.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    // Environment writes happen here, before any thread is started (edition 2021: safe).
    if unset("RAYON_NUM_THREADS") {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if unset("CANDLE_NUM_THREADS") {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // NCCL ≥ 2.26 orders the collectives of a GPU's several communicators (the gradient
    // all-reduce's side stream beside the compute stream's) by their host launch order, which
    // is the same on every rank (finetune-train's `parallel::nccl` module doc); read by NCCL
    // when it makes its first communicator.
    if unset("NCCL_LAUNCH_ORDER_IMPLICIT") {
        std::env::set_var("NCCL_LAUNCH_ORDER_IMPLICIT", "1");
    }
}

fn main() -> ExitCode {
    runtime_defaults();
    let cli = finetune::cli::Cli::parse();
    match finetune::execute(cli) {
        Ok(outcome) => outcome.exit_code(),
        Err(e) => {
            eprintln!("finetune: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    extern "C" {
        fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
    }

    /// Run by [`purge_delay_index_is_mimallocs_purge_delay`] in a child process: prints the
    /// option at our index, which mimalloc read from the environment at process start.
    #[test]
    fn probe_purge_delay() {
        if std::env::var_os("FINETUNE_PROBE_PURGE_DELAY").is_some() {
            println!("purge_delay={}", unsafe {
                mi_option_get(super::MI_OPTION_PURGE_DELAY)
            });
        }
    }

    /// A wrong index would silently change another allocator option: a child started with
    /// MIMALLOC_PURGE_DELAY=777 must read 777 at our index.
    #[test]
    fn purge_delay_index_is_mimallocs_purge_delay() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "tests::probe_purge_delay", "--nocapture"])
            .env("FINETUNE_PROBE_PURGE_DELAY", "1")
            .env("MIMALLOC_PURGE_DELAY", "777")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("purge_delay=777"), "{stdout}");
    }
}
