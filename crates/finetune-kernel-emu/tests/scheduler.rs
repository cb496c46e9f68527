//! The emulator's own checks, each seen to fail on a kernel that breaks the rule it guards
//! (emu/probes.cu), and to pass on the same kernel written correctly.

use finetune_kernel_emu::{launch, Buffer, Geometry, Order};

extern "C" {
    fn probe_neighbour(out: *mut f32, barrier: i32);
    fn probe_warp_sum(out: *mut f32, live: i32);
    fn probe_deadlock();
    fn probe_wmma(a: *const u16, out: *mut f32, offset: i32);
    fn probe_dynamic(out: *mut f32);
    fn probe_e4m3(x: *const f32, q: *mut u8, back: *mut f32, n: i32);
    fn probe_unwritten(out: *mut f32, written: i32);
    fn probe_two_sums(out: *mut f32, first_barrier: i32);
    fn probe_wmma_store_read(out: *mut f32, sync: i32);
}

fn geometry(blocks: u32, threads: u32, shared: u32) -> Geometry {
    Geometry {
        grid: (blocks, 1, 1),
        block: (threads, 1, 1),
        shared_mem_bytes: shared,
    }
}

fn neighbour(barrier: bool, order: Order) -> Vec<f32> {
    let (blocks, n) = (3u32, 64u32);
    let out = Buffer::filled((blocks * n) as usize, f32::NAN);
    launch(geometry(blocks, n, 0), order, || unsafe {
        probe_neighbour(out.mut_ptr(), barrier as i32)
    })
    .unwrap();
    out.to_vec()
}

#[test]
fn a_missing_barrier_changes_the_result_and_the_barrier_restores_it() {
    let want: Vec<f32> = (0..3)
        .flat_map(|b| (0..64).map(move |i| (b * 1000 + (i + 1) % 64) as f32))
        .collect();
    for order in Order::BOTH {
        assert_eq!(neighbour(true, order), want, "{order:?}");
    }
    // Without it, a thread runs ahead of the neighbour whose value it reads (in one order or
    // the other): the results are wrong somewhere.
    let wrong = Order::BOTH
        .iter()
        .filter(|&&o| neighbour(false, o) != want)
        .count();
    assert!(wrong >= 1, "the race went unseen in both orders");
}

/// The race a lane-by-lane schedule misses: one warp reusing shared scratch for a second
/// reduction while another warp still has to read the first one's value from it. Warps run one
/// at a time up to the barrier, so in one of the orders the early warp overwrites the slot.
#[test]
fn a_warp_running_ahead_into_reused_scratch_is_seen() {
    let sums = |first_barrier: bool, order: Order| {
        let out = Buffer::filled(2, f32::NAN);
        launch(geometry(1, 256, 0), order, || unsafe {
            probe_two_sums(out.mut_ptr(), first_barrier as i32)
        })
        .unwrap();
        out.to_vec()
    };
    for order in Order::BOTH {
        assert_eq!(sums(true, order), vec![256.0, 512.0], "{order:?}");
    }
    let wrong = Order::BOTH
        .iter()
        .filter(|&&o| sums(false, o) != vec![256.0, 512.0])
        .count();
    assert!(
        wrong >= 1,
        "the overwritten scratch went unseen in both orders"
    );
}

#[test]
fn shuffles_sum_the_warp_and_a_shuffle_with_an_exited_lane_fails() {
    let out = Buffer::filled(64, f32::NAN);
    launch(geometry(1, 64, 0), Order::Ascending, || unsafe {
        probe_warp_sum(out.mut_ptr(), 32)
    })
    .unwrap();
    assert!(
        out.to_vec().iter().all(|&v| v == 496.0),
        "{:?}",
        out.to_vec()
    );
    let err = launch(geometry(1, 64, 0), Order::Ascending, || unsafe {
        probe_warp_sum(out.mut_ptr(), 20)
    })
    .unwrap_err();
    assert!(err.0.contains("exited"), "{err}");
}

#[test]
fn a_deadlock_is_reported_with_its_block() {
    let err = launch(geometry(2, 64, 0), Order::Descending, || unsafe {
        probe_deadlock()
    })
    .unwrap_err();
    assert!(err.0.contains("deadlock in block (0, 0, 0)"), "{err}");
}

#[test]
fn wmma_multiplies_and_refuses_a_misaligned_tile() {
    // a = the 16×16 matrix with a[i][k] = i − k (small integers: exact in bf16).
    let mut a = vec![0u16; 16 * 16 + 8];
    for i in 0..16 {
        for k in 0..16 {
            a[i * 16 + k] = bf16_bits((i as f32) - (k as f32));
        }
    }
    let a = Buffer::from_slice(&a[..256]);
    let out = Buffer::filled(256, f32::NAN);
    launch(geometry(1, 32, 0), Order::Ascending, || unsafe {
        probe_wmma(a.ptr(), out.mut_ptr(), 0)
    })
    .unwrap();
    // b is read column-major from the same memory: b[k][n] = a[n][k], so out = a·aᵀ.
    let got = out.to_vec();
    for i in 0..16 {
        for j in 0..16 {
            let want: f32 = (0..16)
                .map(|k| ((i as f32) - (k as f32)) * ((j as f32) - (k as f32)))
                .sum();
            assert_eq!(got[i * 16 + j], want, "({i}, {j})");
        }
    }
    // 4 elements = 8 bytes past a 32-byte boundary: WMMA's 256-bit alignment is broken.
    let wide = Buffer::from_slice(&vec![0u16; 512]);
    let err = launch(geometry(1, 32, 0), Order::Ascending, || unsafe {
        probe_wmma(wide.ptr(), out.mut_ptr(), 4)
    })
    .unwrap_err();
    assert!(err.0.contains("not 256-bit aligned"), "{err}");
}

/// A WMMA store is each lane's share of the tile, so reading what other lanes stored needs
/// the __syncwarp the GPU needs.
#[test]
fn reading_a_stored_wmma_tile_needs_a_syncwarp() {
    let read = |sync: bool, order: Order| {
        let out = Buffer::filled(32, f32::NAN);
        launch(geometry(1, 32, 0), order, || unsafe {
            probe_wmma_store_read(out.mut_ptr(), sync as i32)
        })
        .unwrap();
        out.to_vec()
    };
    for order in Order::BOTH {
        assert_eq!(read(true, order), vec![2.0; 32], "{order:?}");
    }
    let wrong = Order::BOTH
        .iter()
        .filter(|&&o| read(false, o) != vec![2.0; 32])
        .count();
    assert_eq!(
        wrong, 2,
        "a read of other lanes' elements before they stored them went unseen"
    );
}

#[test]
fn dynamic_shared_memory_is_per_launch_and_its_size_is_bounded() {
    let out = Buffer::filled(2 * 128, f32::NAN);
    launch(geometry(2, 128, 128 * 4), Order::Descending, || unsafe {
        probe_dynamic(out.mut_ptr())
    })
    .unwrap();
    let want: Vec<f32> = (0..2)
        .flat_map(|_| (0..128).map(|i| 2.0 * ((i + 1) % 128) as f32))
        .collect();
    assert_eq!(out.to_vec(), want);
    let err = launch(geometry(1, 128, 228 * 1024), Order::Ascending, || unsafe {
        probe_dynamic(out.mut_ptr())
    })
    .unwrap_err();
    assert!(err.0.contains("dynamic shared memory"), "{err}");
    let err = launch(geometry(1, 2048, 0), Order::Ascending, || unsafe {
        probe_dynamic(out.mut_ptr())
    })
    .unwrap_err();
    assert!(err.0.contains("2048 threads"), "{err}");
}

/// The emulator's E4M3 conversion (written from the format's definition) against the `float8`
/// crate's (a port of cuda_fp8.hpp, used by the CPU references): every one of the 256 codes
/// decodes to the same value, and rounding agrees on the codes, the midpoints between
/// neighbours (ties to even), values beyond 448 (saturation) and NaN.
#[test]
fn e4m3_conversions_agree_with_the_float8_crate() {
    let mut xs: Vec<f32> = (0u16..256)
        .map(|c| float8::F8E4M3::from_bits(c as u8).to_f32())
        .filter(|v| !v.is_nan())
        .collect();
    let mut sorted = xs.clone();
    sorted.sort_by(f32::total_cmp);
    sorted.dedup();
    for w in sorted.windows(2) {
        xs.push((w[0] + w[1]) / 2.0); // exact midpoints (f32 has the bits)
        xs.push(w[0] + (w[1] - w[0]) * 0.3);
    }
    xs.extend([
        449.0,
        460.0,
        1e6,
        -1e6,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e-9,
    ]);
    let n = xs.len();
    let x = Buffer::from_slice(&xs);
    let q = Buffer::filled(n, 0u8);
    let back = Buffer::filled(n, f32::NAN);
    launch(
        geometry(n.div_ceil(128) as u32, 128, 0),
        Order::Ascending,
        || unsafe { probe_e4m3(x.ptr(), q.mut_ptr(), back.mut_ptr(), n as i32) },
    )
    .unwrap();
    let (q, back) = (q.to_vec(), back.to_vec());
    for i in 0..n {
        let reference = float8::F8E4M3::from_f32(xs[i].clamp(-448.0, 448.0));
        if xs[i].is_nan() {
            assert_eq!(q[i] & 0x7f, 0x7f, "NaN → {:#x}", q[i]);
            assert!(back[i].is_nan());
            continue;
        }
        assert_eq!(q[i], reference.to_bits(), "x = {:e}", xs[i]);
        assert_eq!(back[i], reference.to_f32(), "x = {:e}", xs[i]);
    }
}

#[test]
fn static_shared_memory_starts_each_block_poisoned() {
    let out = Buffer::filled(3 * 64, 0f32);
    let run = |written: i32| {
        launch(geometry(3, 64, 0), Order::Ascending, || unsafe {
            probe_unwritten(out.mut_ptr(), written)
        })
        .unwrap();
        out.to_vec()
    };
    // Every cell written: each block sees its own values (none left from the block before).
    let full = run(64);
    assert!(
        full.iter().enumerate().all(|(i, &v)| v == (i / 64) as f32),
        "{full:?}"
    );
    // Half written: the other half reads the poison (NaN) in every block, not the previous
    // block's values.
    let half = run(32);
    for (i, &v) in half.iter().enumerate() {
        if i % 64 < 32 {
            assert_eq!(v, (i / 64) as f32, "{i}");
        } else {
            assert!(v.is_nan(), "{i}: {v}");
        }
    }
}

fn bf16_bits(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}
