//! `finetune_kernels::saved::held_bytes` counts exactly the activations a hand-written node
//! keeps for its backward, from its forward until its backward takes them (or its graph is
//! dropped). One test in its own binary: the count is process-wide, and other tests creating
//! nodes on parallel threads would move it.

use candle_core::{DType, Device, Tensor, Var};
use finetune_kernels::moe_experts::{
    moe_experts, ExpertStacks, FrozenStack, Routing, StackedAdapters,
};
use finetune_kernels::saved::held_bytes;
use std::sync::Arc;

const T: usize = 6;
const H: usize = 8;
const I: usize = 5;
const E: usize = 3;
const R: usize = 2;

fn values(shape: &[usize], salt: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (((i * 7919 + salt * 104_729) % 2003) as f32 / 1001.5 - 1.0) * 0.3)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn a_moe_experts_node_counts_its_saved_activations_until_its_backward_takes_them() {
    // Top-2 of 3 experts for 6 tokens: 12 slots.
    let routed: Vec<Vec<u32>> = vec![vec![0, 1, 3, 5], vec![0, 2, 3, 4], vec![1, 2, 4, 5]];
    let slots: usize = routed.iter().map(Vec::len).sum();
    let mut w = vec![0f32; T * E];
    for (e, toks) in routed.iter().enumerate() {
        for &t in toks {
            w[t as usize * E + e] = 0.5;
        }
    }
    let weights = Var::from_vec(w, (T, E), &Device::Cpu).unwrap();
    let x = Var::from_tensor(&values(&[T, H], 1)).unwrap();
    let stack = |t: Tensor| {
        let dims = t.dims3().unwrap();
        FrozenStack::new(Arc::new(move || Ok(t.clone())), dims)
    };
    let base = ExpertStacks {
        gate: stack(values(&[E, I, H], 2)),
        up: stack(values(&[E, I, H], 3)),
        down: stack(values(&[E, H, I], 4)),
    };
    let var = |shape: [usize; 3], salt| {
        Var::from_tensor(&values(&shape, salt))
            .unwrap()
            .as_tensor()
            .clone()
    };
    let lora = StackedAdapters {
        gate: (var([E, R, H], 5), var([E, I, R], 6)),
        up: (var([E, R, H], 7), var([E, I, R], 8)),
        down: (var([E, R, I], 9), var([E, H, R], 10)),
        scale: 2.0,
    };
    let routing = Arc::new(Routing::new(&routed, T, &Device::Cpu).unwrap());
    let before = held_bytes();

    // g and u [N, I] in x's dtype (f32) and the three [N, r] f32 LoRA products.
    let want = (2 * slots * I + 3 * slots * R) * DType::F32.size_in_bytes();
    let y = moe_experts(
        x.as_tensor(),
        weights.as_tensor(),
        &routing,
        &base,
        Some(&lora),
    )
    .unwrap();
    assert_eq!(held_bytes() - before, want);
    // The backward takes them.
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    assert_eq!(held_bytes(), before);
    drop((y, grads));

    // A graph dropped without a backward releases them too; without adapters only g and u.
    let y = moe_experts(x.as_tensor(), weights.as_tensor(), &routing, &base, None).unwrap();
    assert_eq!(held_bytes() - before, 2 * slots * I * 4);
    drop(y);
    assert_eq!(held_bytes(), before);

    // Nothing is kept when no input needs a gradient.
    let y = moe_experts(
        &x.as_tensor().detach(),
        &weights.as_tensor().detach(),
        &routing,
        &base,
        None,
    )
    .unwrap();
    assert_eq!(held_bytes(), before);
    drop(y);
}
