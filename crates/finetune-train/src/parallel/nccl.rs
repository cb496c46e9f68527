//! NCCL collectives (cudarc's `nccl` module) on CUDA tensors: the [`Collective`] backend of
//! GPU runs. One communicator per group and rank, joined with [`NcclCollective::join`] by
//! every member at the same time (one thread per GPU in a process; the group's unique id comes
//! from [`unique_id`] in one place and is handed to the others: through memory in a process,
//! through the rendezvous of `launch` across processes). Operations run on the candle device's
//! stream, so they are ordered with the kernels before and after them.
//!
//! `all_to_all` with uneven splits first all-gathers every rank's send counts, then sends and
//! receives each peer's rows inside one NCCL group (rows for itself are copied, not sent).
//!
//! Element types: bf16 tensors (the ranks' compute dtype on a GPU) move as `ncclBfloat16`,
//! everything else as f32; results come back in the input's dtype.

use super::collective::{check_counts, rows_of, Collective, CollectiveError, Result};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Storage, Tensor};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::safe::{group_end, group_start, Comm, Id, NcclType, ReduceOp};
use std::sync::Mutex;

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
        let comm = Comm::from_rank(dev.cuda_stream(), rank, size, id).map_err(nccl)?;
        Ok(Self {
            comm: Mutex::new(CommCell(comm)),
            rank,
            size,
            device: dev.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CommCell> {
        self.comm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `x` as a contiguous CUDA tensor on this communicator's device, in bf16 if it is bf16
    /// and in f32 otherwise (the element types moved: [`Elem`]).
    fn prepare(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = match x.dtype() {
            DType::BF16 => DType::BF16,
            _ => DType::F32,
        };
        Ok(x.to_device(&Device::Cuda(self.device.clone()))?
            .to_dtype(dtype)?
            .contiguous()?)
    }

    fn wrap<T: Elem>(&self, out: CudaSlice<T>, dims: Vec<usize>) -> Tensor {
        let storage = CudaStorage::wrap_cuda_slice(out, self.device.clone());
        Tensor::from_storage(Storage::Cuda(storage), dims, BackpropOp::none(), false)
    }

    fn all_reduce_t<T: Elem>(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = self.device.alloc_zeros::<T>(x.elem_count().max(1))?;
        if x.elem_count() > 0 {
            let c = self.lock();
            with_view::<T, _>(x, |v| {
                c.0.all_reduce(v, &mut out, &ReduceOp::Sum).map_err(nccl)?;
                Ok(())
            })?;
        }
        Ok(self
            .wrap(out, vec![x.elem_count().max(1)])
            .narrow(0, 0, x.elem_count())?
            .reshape(x.shape())?)
    }

    fn all_gather_t<T: Elem>(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.elem_count();
        let mut out = self.device.alloc_zeros::<T>((n * self.size).max(1))?;
        if n > 0 {
            let c = self.lock();
            with_view::<T, _>(x, |v| {
                c.0.all_gather(v, &mut out).map_err(nccl)?;
                Ok(())
            })?;
        }
        let (rows, w) = rows_of(x);
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

    fn reduce_scatter_t<T: Elem>(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, w) = rows_of(x);
        if rows % self.size != 0 {
            return Err(CollectiveError::Invalid {
                op: "reduce_scatter",
                message: format!("{rows} rows do not split evenly over {} ranks", self.size),
            });
        }
        let n = rows / self.size * w;
        let mut out = self.device.alloc_zeros::<T>(n.max(1))?;
        if n > 0 {
            let c = self.lock();
            with_view::<T, _>(x, |v| {
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

    /// The rows exchange of `all_to_all`: `recv[j]` rows come from rank j.
    fn all_to_all_t<T: Elem>(
        &self,
        x: &Tensor,
        send_counts: &[usize],
        recv: &[usize],
    ) -> Result<Tensor> {
        let (_, w) = rows_of(x);
        let offsets: Vec<usize> = send_counts
            .iter()
            .scan(0, |acc, &c| {
                let o = *acc;
                *acc += c;
                Some(o)
            })
            .collect();
        let mut bufs: Vec<Option<CudaSlice<T>>> = Vec::new();
        for (peer, &n) in recv.iter().enumerate() {
            bufs.push(if n > 0 && peer != self.rank {
                Some(self.device.alloc_zeros::<T>(n * w)?)
            } else {
                None
            });
        }
        {
            let c = self.lock();
            with_view::<T, _>(x, |v| {
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
        Ok(if parts.is_empty() {
            Tensor::zeros(dims, x.dtype(), x.device())?
        } else {
            Tensor::cat(&parts, 0)?.reshape(dims)?
        })
    }

    fn broadcast_t<T: Elem>(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        let n = x.elem_count();
        let mut out = self.device.alloc_zeros::<T>(n.max(1))?;
        if n > 0 {
            let c = self.lock();
            with_view::<T, _>(x, |v| {
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
}

/// The element types the collectives move: f32, and bf16 (the ranks' compute dtype on a GPU)
/// as `ncclBfloat16`.
trait Elem: NcclType + CudaDType + DeviceRepr + ValidAsZeroBits {}
impl Elem for f32 {}
impl Elem for half::bf16 {}

/// Runs `f(self, x)` with the element type of prepared tensor `x` (f32 or bf16), and returns
/// the result in `dtype` (the caller's input dtype).
macro_rules! typed {
    ($x:expr, $dtype:expr, |$t:ident| $body:expr) => {{
        let out: Tensor = match $x.dtype() {
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            _ => {
                type $t = f32;
                $body
            }
        };
        Ok(out.to_dtype($dtype)?)
    }};
}

/// Runs `f` on the device buffer of contiguous CUDA tensor `x` (its elements only), of element
/// type `T` (x's dtype).
fn with_view<T: Elem, R>(
    x: &Tensor,
    f: impl FnOnce(&cudarc::driver::CudaView<'_, T>) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(CollectiveError::Invalid {
            op: "nccl",
            message: "tensor is not on a CUDA device".into(),
        });
    };
    let slice = cs.as_cuda_slice::<T>()?;
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
        let p = self.prepare(x)?;
        typed!(p, x.dtype(), |T| self.all_reduce_t::<T>(&p)?)
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.prepare(x)?;
        typed!(p, x.dtype(), |T| self.all_gather_t::<T>(&p)?)
    }

    fn reduce_scatter_sum(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.prepare(x)?;
        typed!(p, x.dtype(), |T| self.reduce_scatter_t::<T>(&p)?)
    }

    fn all_to_all(&self, x: &Tensor, send_counts: &[usize]) -> Result<(Tensor, Vec<usize>)> {
        check_counts("all_to_all", x, send_counts, self.size)?;
        let p = self.prepare(x)?;
        // Everyone's send counts, so that each rank knows what it receives.
        let counts = Tensor::from_vec(
            send_counts.iter().map(|&c| c as f32).collect::<Vec<_>>(),
            (1, self.size),
            &Device::Cuda(self.device.clone()),
        )?;
        let all: Vec<Vec<f32>> = self.all_gather(&counts)?.to_vec2()?;
        let recv: Vec<usize> = all.iter().map(|row| row[self.rank] as usize).collect();
        let out: Result<Tensor> = typed!(p, x.dtype(), |T| self.all_to_all_t::<T>(
            &p,
            send_counts,
            &recv
        )?);
        Ok((out?, recv))
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        let p = self.prepare(x)?;
        typed!(p, x.dtype(), |T| self.broadcast_t::<T>(&p, root)?)
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
            let c = self.lock();
            c.0.all_reduce(&send, &mut out, &ReduceOp::Sum)
                .map_err(nccl)?;
        }
        stream.clone_dtoh(&out).map_err(nccl)
    }
}
