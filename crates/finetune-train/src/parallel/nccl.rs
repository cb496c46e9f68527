//! NCCL collectives (cudarc's `nccl` module) on CUDA tensors: the [`Collective`] backend of
//! GPU runs. One communicator per group and rank, joined with [`NcclCollective::join`] by
//! every member at the same time (one thread per GPU in a process; the group's unique id comes
//! from [`unique_id`] in one place and is handed to the others: through memory in a process,
//! through the rendezvous of `launch` across processes). Operations run on the candle device's
//! stream, so they are ordered with the kernels before and after them.
//!
//! [`NcclSide`]: the data-parallel gradient all-reduce (`buckets`) on a CUDA stream of its own,
//! with communicators of its own (one over the world, one over the rank's data-parallel group
//! when that has several ranks), so that a bucket's all-reduce runs beside the backward's
//! later kernels instead of queueing behind them. A launch records an event on the compute
//! stream (after the kernels that produced the packed bucket, and after the allocation of its
//! output) and makes the side stream wait on it before the all-reduce is enqueued there;
//! [`SideReduce::join`] records an event on the side stream and makes the compute stream wait
//! on it, before the optimizer reads the sums.
//!
//! Memory. cudarc 0.19.10 frees a `CudaSlice` with `cuMemFreeAsync` on the stream that
//! allocated it (candle's: the compute stream). It orders that free after other streams'
//! uses only in its "multi-stream mode", which `CudaContext::new_stream` and
//! `CudaStream::fork` switch on for the whole context: from then on every kernel launch waits
//! on the write events and records the read/write events of each of its arguments (each
//! `CudaSlice` has its two events from its allocation while event tracking is on, the
//! default), and every free waits on them, and the switch itself synchronizes the context.
//! We do not switch it on: the side stream is made with `cuStreamCreate` and wrapped with
//! `CudaContext::wrap_borrowed_stream`, which leaves the context's stream count at 0, so
//! candle's kernels keep running without any event traffic, and the two streams are ordered
//! by hand at exactly the two points above. What the side stream touches is the packed input
//! and the output of each bucket, both allocated on the compute stream before the launch's
//! event; `buckets::Reducer` keeps both (`InFlight`) until after the join, so their frees
//! are enqueued on the compute stream after its wait on the side stream (stream-ordered
//! allocation hands memory freed on a stream to that stream's later allocations only).
//! Candle's default CUDA device uses the per-thread default stream (`CU_STREAM_PER_THREAD`),
//! so the compute stream is that of the thread running the step: the reducer records and
//! waits from that same thread.
//!
//! Several communicators on one GPU. NCCL's user guide ("Creating a Communicator › Using
//! multiple NCCL communicators concurrently",
//! <https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/usage/communicators.html>):
//! before NCCL 2.26 the operations of all communicators of a device had to be serialized into
//! one consistent global order by stream dependencies or synchronization, else they could
//! deadlock; since 2.26, `NCCL_LAUNCH_ORDER_IMPLICIT=1` makes NCCL order them by their host
//! launch order, so they only need to be launched in the same order on every device, "most
//! easily … from a single host thread per-device" (with CUDA ≥ 12.3 the kernels of two
//! communicators still run in parallel). Both hold here: one thread per rank launches every
//! NCCL call, buckets in plan order at the same points of the backward on every rank. The
//! `finetune` binary sets `NCCL_LAUNCH_ORDER_IMPLICIT=1` at start unless the environment sets
//! it. Where it is off (set to 0, or NCCL < 2.26: [`implicit_launch_order`]), a [`Fence`]
//! gives the explicit global order instead: the next collective on a compute-stream
//! communicator first makes the compute stream wait for the side stream (so under tensor or
//! expert parallelism, whose collectives run every layer, a bucket then overlaps only the
//! kernels up to the next collective).
//!
//! `all_to_all` with uneven splits first all-gathers every rank's send counts, then sends and
//! receives each peer's rows inside one NCCL group (rows for itself are copied, not sent).

use super::buckets::{InFlight, Over, SideReduce};
use super::collective::{check_counts, rows_of, Collective, CollectiveError, Result};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Storage, Tensor};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaStream;
use cudarc::nccl::safe::{group_end, group_start, Comm, Id, ReduceOp};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

fn nccl(e: impl std::fmt::Debug) -> CollectiveError {
    CollectiveError::Nccl(format!("{e:?}"))
}

/// A new NCCL unique id (128 bytes) for one communicator.
pub fn unique_id() -> Result<[u8; 128]> {
    let id = Id::new().map_err(nccl)?;
    Ok(id.internal().map(|c| c as u8))
}

struct CommCell(Comm);
// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; the Mutex around it serialises them.
unsafe impl Send for CommCell {}

pub struct NcclCollective {
    comm: Mutex<CommCell>,
    rank: usize,
    size: usize,
    device: CudaDevice,
    fence: Option<Arc<Fence>>,
}

/// Whether NCCL orders the operations of several communicators of a device by their host
/// launch order: NCCL ≥ 2.26 with `NCCL_LAUNCH_ORDER_IMPLICIT` set to a non-zero number (see
/// the module doc).
pub fn implicit_launch_order() -> bool {
    let version = cudarc::nccl::result::get_nccl_version().unwrap_or(0);
    let on = std::env::var("NCCL_LAUNCH_ORDER_IMPLICIT")
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .is_some_and(|v| v != 0);
    version >= 22600 && on
}

/// Orders a rank's compute-stream collectives after its side-stream all-reduces when NCCL
/// does not ([`implicit_launch_order`] off; module doc). Shared by a rank's communicators.
pub struct Fence {
    /// Whether the fence acts (fixed at creation).
    active: bool,
    /// Side and compute streams, once the side communicators exist.
    streams: Mutex<Option<(Arc<CudaStream>, Arc<CudaStream>)>>,
    /// A side all-reduce was enqueued since the last wait.
    pending: AtomicBool,
}

impl Default for Fence {
    fn default() -> Self {
        Self::new()
    }
}

impl Fence {
    pub fn new() -> Self {
        Self {
            active: !implicit_launch_order(),
            streams: Mutex::new(None),
            pending: AtomicBool::new(false),
        }
    }

    /// Whether compute-stream collectives wait for the side stream.
    pub fn active(&self) -> bool {
        self.active
    }

    /// Before a compute-stream collective: the compute stream waits for the side stream if a
    /// side all-reduce is pending.
    fn before_collective(&self) -> Result<()> {
        if !self.active || !self.pending.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((side, compute)) = streams.as_ref() {
            wait_for(compute, side)?;
        }
        Ok(())
    }
}

impl NcclCollective {
    /// Joins the communicator with unique id `id` as `rank` of `size` on `device` (a CUDA
    /// device). Blocks until every member has joined.
    pub fn join(device: &Device, rank: usize, size: usize, id: [u8; 128]) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            return Err(CollectiveError::Invalid {
                op: "join",
                message: format!("NCCL needs a CUDA device, got {device:?}"),
            });
        };
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        // NCCL takes the device of the communicator from the calling thread's current one.
        dev.cuda_stream().context().bind_to_thread().map_err(nccl)?;
        let comm = Comm::from_rank(dev.cuda_stream(), rank, size, id).map_err(nccl)?;
        Ok(Self {
            comm: Mutex::new(CommCell(comm)),
            rank,
            size,
            device: dev.clone(),
            fence: None,
        })
    }

    /// This communicator's collectives first pass `fence` ([`Fence`]).
    pub fn with_fence(mut self, fence: Arc<Fence>) -> Self {
        self.fence = Some(fence);
        self
    }

    /// The communicator, for one collective (after the fence, if any).
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, CommCell>> {
        if let Some(f) = &self.fence {
            f.before_collective()?;
        }
        Ok(self.comm.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// `x` as a contiguous f32 CUDA tensor on this communicator's device.
    fn prepare(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.to_device(&Device::Cuda(self.device.clone()))?
            .to_dtype(DType::F32)?
            .contiguous()?)
    }

    fn wrap(&self, out: cudarc::driver::CudaSlice<f32>, dims: Vec<usize>) -> Tensor {
        let storage = CudaStorage::wrap_cuda_slice(out, self.device.clone());
        Tensor::from_storage(Storage::Cuda(storage), dims, BackpropOp::none(), false)
    }
}

/// Runs `f` on the f32 device buffer of contiguous CUDA tensor `x` (its elements only).
fn with_view<T>(
    x: &Tensor,
    f: impl FnOnce(&cudarc::driver::CudaView<'_, f32>) -> Result<T>,
) -> Result<T> {
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(CollectiveError::Invalid {
            op: "nccl",
            message: "tensor is not on a CUDA device".into(),
        });
    };
    let slice = cs.as_cuda_slice::<f32>()?;
    let start = layout.start_offset();
    let view = slice.slice(start..start + x.elem_count());
    f(&view)
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn enqueues(&self) -> bool {
        true
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.prepare(x)?;
        let mut out = self.device.alloc_zeros::<f32>(x.elem_count().max(1))?;
        if x.elem_count() > 0 {
            let c = self.lock()?;
            with_view(&x, |v| {
                c.0.all_reduce(v, &mut out, &ReduceOp::Sum).map_err(nccl)?;
                Ok(())
            })?;
        }
        Ok(self
            .wrap(out, vec![x.elem_count().max(1)])
            .narrow(0, 0, x.elem_count())?
            .reshape(x.shape())?)
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.prepare(x)?;
        let n = x.elem_count();
        let mut out = self.device.alloc_zeros::<f32>((n * self.size).max(1))?;
        if n > 0 {
            let c = self.lock()?;
            with_view(&x, |v| {
                c.0.all_gather(v, &mut out).map_err(nccl)?;
                Ok(())
            })?;
        }
        let (rows, w) = rows_of(&x);
        let mut dims = x.dims().to_vec();
        if dims.is_empty() {
            dims.push(1);
        }
        dims[0] = rows * self.size;
        Ok(self
            .wrap(out, vec![(n * self.size).max(1)])
            .narrow(0, 0, rows * self.size * w)?
            .reshape(dims)?)
    }

    fn reduce_scatter_sum(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.prepare(x)?;
        let (rows, w) = rows_of(&x);
        if rows % self.size != 0 {
            return Err(CollectiveError::Invalid {
                op: "reduce_scatter",
                message: format!("{rows} rows do not split evenly over {} ranks", self.size),
            });
        }
        let n = rows / self.size * w;
        let mut out = self.device.alloc_zeros::<f32>(n.max(1))?;
        if n > 0 {
            let c = self.lock()?;
            with_view(&x, |v| {
                c.0.reduce_scatter(v, &mut out, &ReduceOp::Sum)
                    .map_err(nccl)?;
                Ok(())
            })?;
        }
        let mut dims = x.dims().to_vec();
        dims[0] = rows / self.size;
        Ok(self
            .wrap(out, vec![n.max(1)])
            .narrow(0, 0, n)?
            .reshape(dims)?)
    }

    fn all_to_all(&self, x: &Tensor, send_counts: &[usize]) -> Result<(Tensor, Vec<usize>)> {
        check_counts("all_to_all", x, send_counts, self.size)?;
        let x = self.prepare(x)?;
        let (_, w) = rows_of(&x);
        // Everyone's send counts, so that each rank knows what it receives.
        let counts = Tensor::from_vec(
            send_counts.iter().map(|&c| c as f32).collect::<Vec<_>>(),
            (1, self.size),
            &Device::Cuda(self.device.clone()),
        )?;
        let all: Vec<Vec<f32>> = self.all_gather(&counts)?.to_vec2()?;
        let recv: Vec<usize> = all.iter().map(|row| row[self.rank] as usize).collect();
        let offsets: Vec<usize> = send_counts
            .iter()
            .scan(0, |acc, &c| {
                let o = *acc;
                *acc += c;
                Some(o)
            })
            .collect();
        let mut bufs: Vec<Option<cudarc::driver::CudaSlice<f32>>> = Vec::new();
        for (peer, &n) in recv.iter().enumerate() {
            bufs.push(if n > 0 && peer != self.rank {
                Some(self.device.alloc_zeros::<f32>(n * w)?)
            } else {
                None
            });
        }
        {
            let c = self.lock()?;
            with_view(&x, |v| {
                group_start().map_err(nccl)?;
                let mut result = Ok(());
                for peer in 0..self.size {
                    if peer == self.rank {
                        continue;
                    }
                    let n = send_counts[peer];
                    if n > 0 {
                        let part = v.slice(offsets[peer] * w..(offsets[peer] + n) * w);
                        if let Err(e) = c.0.send(&part, peer as i32) {
                            result = Err(nccl(e));
                        }
                    }
                    if let Some(buf) = bufs[peer].as_mut() {
                        if let Err(e) = c.0.recv(buf, peer as i32) {
                            result = Err(nccl(e));
                        }
                    }
                }
                group_end().map_err(nccl)?;
                result
            })?;
        }
        let mut parts = Vec::new();
        for (peer, buf) in bufs.into_iter().enumerate() {
            if peer == self.rank && recv[peer] > 0 {
                parts.push(
                    x.narrow(0, offsets[peer], recv[peer])?
                        .reshape((recv[peer], w))?,
                );
            } else if let Some(buf) = buf {
                parts.push(self.wrap(buf, vec![recv[peer], w]));
            }
        }
        let mut dims = x.dims().to_vec();
        dims[0] = recv.iter().sum();
        let out = if parts.is_empty() {
            Tensor::zeros(dims, DType::F32, x.device())?
        } else {
            Tensor::cat(&parts, 0)?.reshape(dims)?
        };
        Ok((out, recv))
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        let x = self.prepare(x)?;
        let n = x.elem_count();
        let mut out = self.device.alloc_zeros::<f32>(n.max(1))?;
        if n > 0 {
            let c = self.lock()?;
            with_view(&x, |v| {
                let send = (self.rank == root).then_some(v);
                c.0.broadcast(send, &mut out, root as i32).map_err(nccl)?;
                Ok(())
            })?;
        }
        Ok(self
            .wrap(out, vec![n.max(1)])
            .narrow(0, 0, n)?
            .reshape(x.shape())?)
    }

    fn barrier(&self) -> Result<()> {
        let one = Tensor::ones(1, DType::F32, &Device::Cuda(self.device.clone()))?;
        let sum: Vec<f32> = self.all_reduce_sum(&one)?.to_vec1()?;
        if sum[0] as usize != self.size {
            return Err(CollectiveError::Invalid {
                op: "barrier",
                message: format!("{} ranks answered, {} expected", sum[0], self.size),
            });
        }
        Ok(())
    }

    fn all_reduce_f64(&self, v: &[f64]) -> Result<Vec<f64>> {
        if v.is_empty() {
            return Ok(Vec::new());
        }
        let stream = self.device.cuda_stream();
        let send = stream.clone_htod(v).map_err(nccl)?;
        let mut out = stream.alloc_zeros::<f64>(v.len()).map_err(nccl)?;
        {
            let c = self.lock()?;
            c.0.all_reduce(&send, &mut out, &ReduceOp::Sum)
                .map_err(nccl)?;
        }
        stream.clone_dtoh(&out).map_err(nccl)
    }
}

/// Makes `waiter` wait for the work enqueued so far on `target` (an event without timing).
fn wait_for(waiter: &CudaStream, target: &CudaStream) -> Result<()> {
    let event = target
        .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
        .map_err(nccl)?;
    waiter.wait(&event).map_err(nccl)
}

/// A non-blocking CUDA stream made outside cudarc's stream count (module doc: the context
/// stays out of multi-stream mode), destroyed on drop after its work is done.
struct OwnedStream(Arc<CudaStream>);

impl OwnedStream {
    fn new(dev: &CudaDevice) -> Result<Self> {
        use cudarc::driver::result::stream::{create, StreamKind};
        let ctx = dev.cuda_stream().context().clone();
        ctx.bind_to_thread().map_err(nccl)?;
        let raw = create(StreamKind::NonBlocking).map_err(nccl)?;
        // SAFETY: `raw` is a stream of this context that this struct owns and destroys only
        // on drop, after every user of the wrapper (the side communicators, declared before
        // it in `NcclSide`) is gone.
        Ok(Self(unsafe { ctx.wrap_borrowed_stream(raw) }))
    }
}

impl Drop for OwnedStream {
    fn drop(&mut self) {
        let _ = self.0.synchronize();
        // SAFETY: the stream was created by `OwnedStream::new` and nothing uses it any more.
        let _ = unsafe { cudarc::driver::result::stream::destroy(self.0.cu_stream()) };
    }
}

/// The gradient all-reduce on a stream of its own (module doc): communicators over the world
/// and over the rank's data-parallel group (`None` when that is the rank alone) made on the
/// side stream.
pub struct NcclSide {
    world: Mutex<CommCell>,
    dp: Option<Mutex<CommCell>>,
    device: CudaDevice,
    /// The compute stream (candle's stream of the calling thread).
    compute: Arc<CudaStream>,
    fence: Arc<Fence>,
    /// Last: destroyed after the communicators that use it.
    stream: OwnedStream,
}

impl NcclSide {
    /// Joins the side communicators on `device`: the world as (rank, size, id) and, when the
    /// rank's data-parallel group has several ranks, that group as (position, size, id).
    /// Every rank must call it at the same time, after its other communicators; `fence` is
    /// the one its compute-stream communicators pass.
    pub fn join(
        device: &Device,
        world: (usize, usize, [u8; 128]),
        dp: Option<(usize, usize, [u8; 128])>,
        fence: Arc<Fence>,
    ) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            return Err(CollectiveError::Invalid {
                op: "join",
                message: format!("NCCL needs a CUDA device, got {device:?}"),
            });
        };
        let stream = OwnedStream::new(dev)?;
        let comm = |(rank, size, id): (usize, usize, [u8; 128])| -> Result<Mutex<CommCell>> {
            let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
            let c = Comm::from_rank(stream.0.clone(), rank, size, id).map_err(nccl)?;
            Ok(Mutex::new(CommCell(c)))
        };
        let world = comm(world)?;
        let dp = dp.map(comm).transpose()?;
        let compute = dev.cuda_stream();
        *fence.streams.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((stream.0.clone(), compute.clone()));
        Ok(Self {
            world,
            dp,
            device: dev.clone(),
            compute,
            fence,
            stream,
        })
    }
}

impl SideReduce for NcclSide {
    fn launch(&self, over: Over, flat: Tensor) -> Result<InFlight> {
        let comm = match over {
            Over::World => &self.world,
            Over::Dp => match &self.dp {
                Some(c) => c,
                // A group of one: the sum is the bucket itself.
                None => {
                    return Ok(InFlight {
                        sum: flat,
                        keep: Box::new(()),
                    })
                }
            },
        };
        let n = flat.elem_count();
        if flat.dtype() != DType::F32 || !flat.is_contiguous() || !flat.device().is_cuda() {
            return Err(CollectiveError::Invalid {
                op: "all_reduce (side stream)",
                message: format!(
                    "the bucket must be contiguous f32 on the GPU, got {:?} on {:?}",
                    flat.dtype(),
                    flat.device()
                ),
            });
        }
        if n == 0 {
            return Ok(InFlight {
                sum: flat,
                keep: Box::new(()),
            });
        }
        // Allocated (and zeroed) on the compute stream before the event below, so the side
        // stream's wait covers it.
        let mut out = self.device.alloc_zeros::<f32>(n)?;
        wait_for(&self.stream.0, &self.compute)?;
        {
            let c = comm.lock().unwrap_or_else(|e| e.into_inner());
            with_view(&flat, |v| {
                c.0.all_reduce(v, &mut out, &ReduceOp::Sum).map_err(nccl)?;
                Ok(())
            })?;
        }
        self.fence.pending.store(true, Ordering::Relaxed);
        let storage = CudaStorage::wrap_cuda_slice(out, self.device.clone());
        let sum = Tensor::from_storage(
            Storage::Cuda(storage),
            flat.shape().clone(),
            BackpropOp::none(),
            false,
        );
        Ok(InFlight {
            sum,
            keep: Box::new(flat),
        })
    }

    fn join(&self) -> Result<()> {
        wait_for(&self.compute, &self.stream.0)?;
        self.fence.pending.store(false, Ordering::Relaxed);
        Ok(())
    }
}
