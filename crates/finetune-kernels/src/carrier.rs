//! Carrier nodes and a mailbox: how a node with a hand-written backward hands gradients to more
//! tensors than a candle CustomOp has inputs (at most three).
//!
//! The node's last input is a one-element *carrier* tensor that depends on the tensors to be
//! differentiated (its "passengers") through a tree of carrier nodes, up to three inputs each.
//! The node's backward computes the passengers' gradients and posts them to a [`Mailbox`]
//! shared with the carriers; candle runs the carriers' backward after the node's (the carrier
//! is the node's input), and each leaf carrier hands its passengers their gradients from the
//! mailbox. Every passenger then gets exactly one gradient, as on the autograd path, without
//! being copied into one packed input. Used by [`crate::moe_experts`] (six stacked adapters)
//! and [`crate::attention_block`] (up to eight attention adapters).

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use std::sync::{Arc, Mutex};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Gradients posted by a node's backward for the carriers to hand out, by slot (the
/// passenger's position in [`carry`]'s list); `op` names the node in errors.
pub(crate) struct Mailbox {
    op: &'static str,
    slots: Mutex<Vec<Option<Tensor>>>,
}

impl Mailbox {
    pub(crate) fn new(op: &'static str) -> Arc<Self> {
        Arc::new(Self {
            op,
            slots: Mutex::new(Vec::new()),
        })
    }

    /// Posts one gradient per passenger, in [`carry`]'s order.
    pub(crate) fn post(&self, grads: Vec<Tensor>) -> candle_core::Result<()> {
        let mut slots = lock(&self.slots);
        if !slots.is_empty() {
            candle_core::bail!("{}: adapter gradients posted twice", self.op);
        }
        *slots = grads.into_iter().map(Some).collect();
        Ok(())
    }

    fn take(&self, slot: usize) -> candle_core::Result<Tensor> {
        lock(&self.slots)
            .get_mut(slot)
            .and_then(Option::take)
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "{}: no gradient posted for adapter slot {slot} (the node's backward did not run first)",
                    self.op
                ))
            })
    }
}

/// A one-element f32 zero that depends on its inputs: each input is either a passenger whose
/// gradient the mailbox holds (`Some(slot)`) or another carrier (`None`: passes the upstream
/// one-element gradient on).
struct Carrier {
    mailbox: Arc<Mailbox>,
    slots: [Option<usize>; 3],
}

impl Carrier {
    fn grad(&self, arg: usize, upstream: &Tensor) -> candle_core::Result<Option<Tensor>> {
        match self.slots[arg] {
            Some(slot) => self.mailbox.take(slot).map(Some),
            None => Ok(Some(upstream.clone())),
        }
    }
}

fn one_zero<S>(s: &S) -> candle_core::Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let shape = Shape::from(1);
    Ok((s.device().zeros_impl(&shape, DType::F32)?, shape))
}

impl CustomOp1 for Carrier {
    fn name(&self) -> &'static str {
        "adapter-carrier"
    }

    fn cpu_fwd(&self, s: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        one_zero(s)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        one_zero(s)
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.grad(0, grad)
    }
}

impl CustomOp2 for Carrier {
    fn name(&self) -> &'static str {
        "adapter-carrier"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        one_zero(s)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        one_zero(s)
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((self.grad(0, grad)?, self.grad(1, grad)?))
    }
}

impl CustomOp3 for Carrier {
    fn name(&self) -> &'static str {
        "adapter-carrier"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        one_zero(s)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        one_zero(s)
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((
            self.grad(0, grad)?,
            self.grad(1, grad)?,
            self.grad(2, grad)?,
        ))
    }
}

/// The carrier of `passengers` (mailbox slots 0, 1, … in this order; at least one): leaf
/// carriers of up to three passengers, joined three at a time until one is left.
pub(crate) fn carry(passengers: &[&Tensor], mailbox: &Arc<Mailbox>) -> candle_core::Result<Tensor> {
    if passengers.is_empty() {
        candle_core::bail!("{}: a carrier needs at least one tensor", mailbox.op);
    }
    let mut level: Vec<(Tensor, Option<usize>)> = passengers
        .iter()
        .enumerate()
        .map(|(slot, t)| ((*t).clone(), Some(slot)))
        .collect();
    loop {
        let mut next = Vec::with_capacity(level.len().div_ceil(3));
        for group in level.chunks(3) {
            let mut slots = [None; 3];
            for (s, (_, slot)) in slots.iter_mut().zip(group) {
                *s = *slot;
            }
            let op = Carrier {
                mailbox: mailbox.clone(),
                slots,
            };
            let node = match group {
                [(a, _)] => a.apply_op1(op)?,
                [(a, _), (b, _)] => a.apply_op2(b, op)?,
                [(a, _), (b, _), (c, _)] => a.apply_op3(b, c, op)?,
                _ => unreachable!("chunks of at most three"),
            };
            next.push((node, None));
        }
        if next.len() == 1 {
            return Ok(next.remove(0).0);
        }
        level = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A stand-in for a node with a hand-written backward: y = x + carrier (the carrier is a
    /// zero), whose backward posts 10·(i + 1)·ones for passenger i.
    struct Node {
        mailbox: Arc<Mailbox>,
        shapes: Vec<Vec<usize>>,
    }

    impl CustomOp2 for Node {
        fn name(&self) -> &'static str {
            "test-node"
        }

        fn cpu_fwd(
            &self,
            s: &CpuStorage,
            l: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            let mut dst = unsafe { s.device().alloc_uninit(l.shape(), s.dtype())? };
            s.copy_strided_src(&mut dst, 0, l)?;
            Ok((dst, l.shape().clone()))
        }

        fn bwd(
            &self,
            _: &Tensor,
            carrier: &Tensor,
            _: &Tensor,
            dy: &Tensor,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
            let grads = self
                .shapes
                .iter()
                .enumerate()
                .map(|(i, s)| Tensor::full(10.0 * (i + 1) as f32, s.as_slice(), &Device::Cpu))
                .collect::<candle_core::Result<Vec<_>>>()?;
            self.mailbox.post(grads)?;
            Ok((Some(dy.clone()), Some(carrier.zeros_like()?)))
        }
    }

    /// For 1 to 8 passengers (one leaf of one, two and three passengers; two levels from
    /// four on), each passenger gets exactly its posted gradient.
    #[test]
    fn every_passenger_gets_its_posted_gradient_once() {
        for n in 1..=8 {
            let vars: Vec<Var> = (0..n)
                .map(|i| Var::zeros((i + 1, 2), DType::F32, &Device::Cpu).unwrap())
                .collect();
            let mailbox = Mailbox::new("test-node");
            let passengers: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
            let carrier = carry(&passengers, &mailbox).unwrap();
            let x = Var::ones(3, DType::F32, &Device::Cpu).unwrap();
            let node = Node {
                mailbox: mailbox.clone(),
                shapes: (0..n).map(|i| vec![i + 1, 2]).collect(),
            };
            let y = x.as_tensor().apply_op2(&carrier, node).unwrap();
            let grads = y.sum_all().unwrap().backward().unwrap();
            for (i, v) in vars.iter().enumerate() {
                let g = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap();
                let g = g.to_vec1::<f32>().unwrap();
                assert!(
                    g.iter().all(|&e| e == 10.0 * (i + 1) as f32),
                    "{n} passengers: passenger {i} got {g:?}"
                );
            }
            let dx = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(dx, vec![1.0; 3]);
        }
    }
}
