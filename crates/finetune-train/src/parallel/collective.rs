//! Collectives between the ranks of a parallel run: the [`Collective`] trait and its
//! in-process CPU backend [`CpuCollective`] (one thread per rank), used by the tests to run
//! every layout at any world size on a small machine. The NCCL backend is in `nccl.rs`.
//!
//! Semantics, for a group of `size` ranks that all make the same calls in the same order:
//! - `all_reduce_sum(x)`: every rank gets Σ_r x_r (same shape everywhere).
//! - `all_gather(x)`: every rank gets [x_0; x_1; …] concatenated along dim 0.
//! - `reduce_scatter_sum(x)`: rank r gets rows [r·n/size, (r+1)·n/size) of Σ_r x_r.
//! - `all_to_all(x, counts)`: x's rows are split into `counts[j]` rows for rank j (in rank
//!   order); every rank gets the rows sent to it, concatenated in the senders' rank order, and
//!   how many came from each (uneven splits: MoE token dispatch).
//! - `broadcast(x, root)`: every rank gets root's x.
//! - `all_reduce_f64(v)`: Σ of small host vectors (losses, norms, flags).
//!
//! The CPU backend sums in rank order 0, 1, …, size−1 on every rank, so all ranks get
//! bit-identical results and a run is reproducible.
//!
//! Dtypes: tensors are f32 or bf16 (the ranks' compute dtype), and every result comes back in
//! its input's dtype. The CPU backend moves values as f32 (exact for bf16) and sums in f32,
//! rounding each element once to bf16 at the end (for a sum of two bf16 values, exactly the
//! correctly rounded bf16 sum); NCCL moves bf16 as `ncclBfloat16` and reduces in its own order
//! and precision (a bf16 sum over several ranks may differ from the CPU backend's in the last
//! bit).

use candle_core::{DType, Tensor};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("collective `{op}` on rank {rank}: waited {secs} s for the other ranks (one of them failed or is stuck)")]
    Timeout {
        op: &'static str,
        rank: usize,
        secs: u64,
    },
    #[error("collective `{op}` on rank {rank}: another rank failed ({reason})")]
    Aborted {
        op: &'static str,
        rank: usize,
        reason: String,
    },
    #[error("collective `{op}`: {message}")]
    Invalid { op: &'static str, message: String },
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, CollectiveError>;

/// Collective operations over one group of ranks (see the module doc). Tensors are f32 or
/// bf16; results come back in the input's dtype.
/// Send + Sync so that a trainer holding its communicators can move to a large-stack thread.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor>;
    fn all_gather(&self, x: &Tensor) -> Result<Tensor>;
    fn reduce_scatter_sum(&self, x: &Tensor) -> Result<Tensor>;
    fn all_to_all(&self, x: &Tensor, send_counts: &[usize]) -> Result<(Tensor, Vec<usize>)>;
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor>;
    fn barrier(&self) -> Result<()>;
    fn all_reduce_f64(&self, v: &[f64]) -> Result<Vec<f64>>;
    /// Makes the other ranks' pending and future operations fail, where the backend can (a
    /// rank gave up). The CPU backend does; NCCL has no such thing short of aborting the
    /// communicator, and the process exits anyway.
    fn abort(&self, _reason: &str) {}
    /// Whether the operations only enqueue work on the device's stream and return (NCCL):
    /// such a backend must be called from one thread per rank, in the same order on every
    /// rank, so the overlapped gradient all-reduce calls it from the compute thread
    /// (`buckets` module doc). Blocking backends (the CPU threads) return false.
    fn enqueues(&self) -> bool {
        false
    }
}

/// Width of a row (product of the dims after the first) and the row count.
pub(crate) fn rows_of(x: &Tensor) -> (usize, usize) {
    let dims = x.dims();
    match dims.split_first() {
        Some((&n, rest)) => (n, rest.iter().product()),
        None => (1, 1),
    }
}

pub(crate) fn check_counts(
    op: &'static str,
    x: &Tensor,
    counts: &[usize],
    size: usize,
) -> Result<()> {
    let (n, _) = rows_of(x);
    if counts.len() != size || counts.iter().sum::<usize>() != n {
        return Err(CollectiveError::Invalid {
            op,
            message: format!("send counts {counts:?} do not split {n} rows over {size} ranks"),
        });
    }
    Ok(())
}

/// A group of one: every operation is the identity (no communication).
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn reduce_scatter_sum(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn all_to_all(&self, x: &Tensor, send_counts: &[usize]) -> Result<(Tensor, Vec<usize>)> {
        check_counts("all_to_all", x, send_counts, 1)?;
        Ok((x.clone(), send_counts.to_vec()))
    }
    fn broadcast(&self, x: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn all_reduce_f64(&self, v: &[f64]) -> Result<Vec<f64>> {
        Ok(v.to_vec())
    }
}

/// What one rank deposits for an exchange.
#[derive(Default)]
struct Payload {
    data: Vec<f32>,
    counts: Vec<usize>,
    scalars: Vec<f64>,
}

struct State {
    arrived: usize,
    generation: u64,
    slots: Vec<Option<Payload>>,
    /// The payloads of the last completed exchange; replaced only when the next one
    /// completes, which needs every rank, so no rank can miss it.
    result: Arc<Vec<Payload>>,
    aborted: Option<String>,
}

struct Shared {
    size: usize,
    state: Mutex<State>,
    cv: Condvar,
    timeout: Duration,
}

/// One rank's handle on an in-process group of threads. Create the group with
/// [`CpuCollective::group`] and move each handle to its rank's thread.
pub struct CpuCollective {
    rank: usize,
    shared: Arc<Shared>,
}

impl CpuCollective {
    /// Handles for a group of `size` ranks (index = rank). A rank waits at most `timeout`
    /// for the others in any one operation.
    pub fn group(size: usize, timeout: Duration) -> Vec<CpuCollective> {
        let shared = Arc::new(Shared {
            size,
            state: Mutex::new(State {
                arrived: 0,
                generation: 0,
                slots: (0..size).map(|_| None).collect(),
                result: Arc::new(Vec::new()),
                aborted: None,
            }),
            cv: Condvar::new(),
            timeout,
        });
        (0..size)
            .map(|rank| CpuCollective {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Makes every pending and future operation of the group fail (a rank gave up).
    pub fn abort(&self, reason: &str) {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.aborted.get_or_insert_with(|| reason.to_string());
        self.shared.cv.notify_all();
    }

    /// Deposits `payload`, waits for every rank's, returns all of them (index = rank).
    fn exchange(&self, op: &'static str, payload: Payload) -> Result<Arc<Vec<Payload>>> {
        let sh = &*self.shared;
        let mut st = sh.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(reason) = &st.aborted {
            return Err(CollectiveError::Aborted {
                op,
                rank: self.rank,
                reason: reason.clone(),
            });
        }
        st.slots[self.rank] = Some(payload);
        st.arrived += 1;
        if st.arrived == sh.size {
            let all: Vec<Payload> = st
                .slots
                .iter_mut()
                .map(|s| s.take().unwrap_or_default())
                .collect();
            st.result = Arc::new(all);
            st.arrived = 0;
            st.generation += 1;
            sh.cv.notify_all();
            return Ok(st.result.clone());
        }
        let generation = st.generation;
        let started = std::time::Instant::now();
        while st.generation == generation {
            if let Some(reason) = &st.aborted {
                return Err(CollectiveError::Aborted {
                    op,
                    rank: self.rank,
                    reason: reason.clone(),
                });
            }
            let left = sh.timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                st.aborted
                    .get_or_insert_with(|| format!("rank {} timed out in `{op}`", self.rank));
                sh.cv.notify_all();
                return Err(CollectiveError::Timeout {
                    op,
                    rank: self.rank,
                    secs: sh.timeout.as_secs(),
                });
            }
            st = sh
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(st.result.clone())
    }

    /// `x`'s values as f32 on the host (exact for bf16).
    fn host(x: &Tensor) -> Result<Vec<f32>> {
        Ok(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// A result made in f32, in `like`'s dtype (rounded once; a no-op for f32).
    fn back(out: Tensor, like: &Tensor) -> Result<Tensor> {
        Ok(out.to_dtype(like.dtype())?)
    }
}

impl Drop for CpuCollective {
    fn drop(&mut self) {
        // A rank that panics must not leave the others waiting until the timeout.
        if std::thread::panicking() {
            self.abort(&format!("rank {} panicked", self.rank));
        }
    }
}

impl Collective for CpuCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn abort(&self, reason: &str) {
        CpuCollective::abort(self, reason)
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let data = Self::host(x)?;
        let all = self.exchange(
            "all_reduce",
            Payload {
                data,
                ..Default::default()
            },
        )?;
        let mut sum = all[0].data.clone();
        for p in &all[1..] {
            if p.data.len() != sum.len() {
                return Err(CollectiveError::Invalid {
                    op: "all_reduce",
                    message: format!("ranks sent {} and {} elements", sum.len(), p.data.len()),
                });
            }
            for (s, v) in sum.iter_mut().zip(&p.data) {
                *s += v;
            }
        }
        Self::back(Tensor::from_vec(sum, x.shape(), x.device())?, x)
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        let (n, w) = rows_of(x);
        let all = self.exchange(
            "all_gather",
            Payload {
                data: Self::host(x)?,
                counts: vec![n],
                ..Default::default()
            },
        )?;
        let total: usize = all.iter().map(|p| p.counts[0]).sum();
        let data: Vec<f32> = all.iter().flat_map(|p| p.data.iter().copied()).collect();
        let mut dims = x.dims().to_vec();
        if dims.is_empty() {
            dims.push(1);
        }
        dims[0] = total;
        debug_assert_eq!(data.len(), total * w);
        Self::back(Tensor::from_vec(data, dims, x.device())?, x)
    }

    fn reduce_scatter_sum(&self, x: &Tensor) -> Result<Tensor> {
        let (n, _) = rows_of(x);
        let size = self.size();
        if n % size != 0 {
            return Err(CollectiveError::Invalid {
                op: "reduce_scatter",
                message: format!("{n} rows do not split evenly over {size} ranks"),
            });
        }
        let sum = self.all_reduce_sum(x)?;
        Ok(sum
            .narrow(0, self.rank * n / size, n / size)?
            .contiguous()?)
    }

    fn all_to_all(&self, x: &Tensor, send_counts: &[usize]) -> Result<(Tensor, Vec<usize>)> {
        check_counts("all_to_all", x, send_counts, self.size())?;
        let (_, w) = rows_of(x);
        let all = self.exchange(
            "all_to_all",
            Payload {
                data: Self::host(x)?,
                counts: send_counts.to_vec(),
                ..Default::default()
            },
        )?;
        let mut data = Vec::new();
        let mut recv = Vec::with_capacity(all.len());
        for p in all.iter() {
            let start: usize = p.counts[..self.rank].iter().sum();
            let rows = p.counts[self.rank];
            data.extend_from_slice(&p.data[start * w..(start + rows) * w]);
            recv.push(rows);
        }
        let mut dims = x.dims().to_vec();
        dims[0] = recv.iter().sum();
        Ok((
            Self::back(Tensor::from_vec(data, dims, x.device())?, x)?,
            recv,
        ))
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        let data = if self.rank == root {
            Self::host(x)?
        } else {
            Vec::new()
        };
        let all = self.exchange(
            "broadcast",
            Payload {
                data,
                ..Default::default()
            },
        )?;
        Self::back(
            Tensor::from_vec(all[root].data.clone(), x.shape(), x.device())?,
            x,
        )
    }

    fn barrier(&self) -> Result<()> {
        self.exchange("barrier", Payload::default()).map(|_| ())
    }

    fn all_reduce_f64(&self, v: &[f64]) -> Result<Vec<f64>> {
        let all = self.exchange(
            "all_reduce_f64",
            Payload {
                scalars: v.to_vec(),
                ..Default::default()
            },
        )?;
        let mut sum = all[0].scalars.clone();
        for p in &all[1..] {
            for (s, x) in sum.iter_mut().zip(&p.scalars) {
                *s += x;
            }
        }
        Ok(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Runs `f(rank, handle)` on `n` threads and returns the results by rank.
    fn world<T: Send>(n: usize, f: impl Fn(usize, CpuCollective) -> T + Sync) -> Vec<T> {
        let handles = CpuCollective::group(n, Duration::from_secs(30));
        std::thread::scope(|s| {
            let f = &f;
            let joins: Vec<_> = handles
                .into_iter()
                .enumerate()
                .map(|(r, h)| s.spawn(move || f(r, h)))
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        })
    }

    fn t(v: Vec<f32>, rows: usize) -> Tensor {
        let w = v.len() / rows.max(1);
        Tensor::from_vec(v, (rows, w), &Device::Cpu).unwrap()
    }

    #[test]
    fn every_operation_against_its_definition() {
        let out = world(3, |r, c| {
            let x = t(vec![r as f32, 10.0 * r as f32, 1.0, 2.0, 3.0, 4.0], 3);
            let sum: Vec<Vec<f32>> = c.all_reduce_sum(&x).unwrap().to_vec2().unwrap();
            let gathered: Vec<Vec<f32>> = c.all_gather(&x).unwrap().to_vec2().unwrap();
            let scattered: Vec<Vec<f32>> = c.reduce_scatter_sum(&x).unwrap().to_vec2().unwrap();
            // Rank r sends r+j rows to rank j... limited by 3 rows: counts [1,1,1] rotated.
            let counts: Vec<usize> = match r {
                0 => vec![3, 0, 0],
                1 => vec![0, 1, 2],
                _ => vec![1, 1, 1],
            };
            let (a2a, recv) = c.all_to_all(&x, &counts).unwrap();
            let b: Vec<Vec<f32>> = c.broadcast(&x, 2).unwrap().to_vec2().unwrap();
            let s = c.all_reduce_f64(&[r as f64, 1.0]).unwrap();
            c.barrier().unwrap();
            (
                sum,
                gathered,
                scattered,
                a2a.to_vec2::<f32>().unwrap(),
                recv,
                b,
                s,
            )
        });
        for (r, (sum, gathered, scattered, a2a, recv, b, s)) in out.into_iter().enumerate() {
            assert_eq!(sum, vec![vec![3.0, 30.0], vec![3.0, 6.0], vec![9.0, 12.0]]);
            assert_eq!(gathered.len(), 9);
            assert_eq!(gathered[3], vec![1.0, 10.0]);
            assert_eq!(gathered[6], vec![2.0, 20.0]);
            assert_eq!(scattered, vec![sum[r].clone()]);
            assert_eq!(b, vec![vec![2.0, 20.0], vec![1.0, 2.0], vec![3.0, 4.0]]);
            assert_eq!(s, vec![3.0, 3.0]);
            let rank_rows = |k: usize| -> Vec<Vec<f32>> {
                vec![
                    vec![k as f32, 10.0 * k as f32],
                    vec![1.0, 2.0],
                    vec![3.0, 4.0],
                ]
            };
            match r {
                0 => {
                    assert_eq!(recv, vec![3, 0, 1]);
                    let mut want = rank_rows(0);
                    want.push(rank_rows(2)[0].clone());
                    assert_eq!(a2a, want);
                }
                1 => {
                    assert_eq!(recv, vec![0, 1, 1]);
                    assert_eq!(a2a, vec![rank_rows(1)[0].clone(), rank_rows(2)[1].clone()]);
                }
                _ => {
                    assert_eq!(recv, vec![0, 2, 1]);
                    assert_eq!(
                        a2a,
                        vec![
                            rank_rows(1)[1].clone(),
                            rank_rows(1)[2].clone(),
                            rank_rows(2)[2].clone()
                        ]
                    );
                }
            }
        }
    }

    /// bf16 tensors come back in bf16 from every operation, moved exactly, and a sum is
    /// rounded once: 1 + 2⁻⁸ + 2⁻⁸ over three ranks is 1 + 2⁻⁷ (exact in bf16), where adding in
    /// bf16 one rank at a time would give 1 (1 + 2⁻⁸ is a tie that rounds to even, twice).
    #[test]
    fn bf16_tensors_stay_bf16_and_sums_round_once() {
        let tiny = 2f32.powi(-8);
        let out = world(3, |r, c| {
            let v = if r == 0 { 1.0 } else { tiny };
            let x = Tensor::from_vec(vec![v, r as f32 + 0.5, -3.0], (3, 1), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let as_f32 = |t: Tensor| -> (DType, Vec<f32>) {
                let dt = t.dtype();
                let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                (dt, v.to_vec1().unwrap())
            };
            let counts = match r {
                0 => vec![1, 1, 1],
                1 => vec![0, 3, 0],
                _ => vec![2, 0, 1],
            };
            vec![
                as_f32(c.all_reduce_sum(&x).unwrap()),
                as_f32(c.all_gather(&x).unwrap()),
                as_f32(c.all_to_all(&x, &counts).unwrap().0),
                as_f32(c.broadcast(&x, 1).unwrap()),
            ]
        });
        for (r, ops) in out.iter().enumerate() {
            for (dt, _) in ops {
                assert_eq!(*dt, DType::BF16, "rank {r}");
            }
            assert_eq!(ops[0].1, vec![1.0 + 2.0 * tiny, 4.5, -9.0], "rank {r}");
            assert_eq!(
                ops[1].1,
                vec![1.0, 0.5, -3.0, tiny, 1.5, -3.0, tiny, 2.5, -3.0]
            );
            assert_eq!(ops[3].1, vec![tiny, 1.5, -3.0]);
        }
        // Rank 0 gets rank 0's first row and rank 2's first two; rank 1 all of rank 1's
        // and rank 0's second; rank 2 rank 0's third and rank 2's third.
        assert_eq!(out[0][2].1, vec![1.0, tiny, 2.5]);
        assert_eq!(out[1][2].1, vec![0.5, tiny, 1.5, -3.0]);
        assert_eq!(out[2][2].1, vec![-3.0, -3.0]);
    }

    #[test]
    fn a_failed_rank_releases_the_others() {
        let out = world(2, |r, c| {
            if r == 1 {
                c.abort("rank 1 gave up");
                return None;
            }
            Some(c.barrier())
        });
        match &out[0] {
            Some(Err(CollectiveError::Aborted { reason, .. })) => {
                assert!(reason.contains("rank 1 gave up"))
            }
            other => panic!(
                "rank 0 should fail, got {:?}",
                other.as_ref().map(|r| r.is_ok())
            ),
        }
    }
}
