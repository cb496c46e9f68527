//! finetune-kernels' multi-tensor AdamW (one launch for all tensors on CUDA; its CPU reference
//! here) against this crate's `AdamW::step`, bit for bit, over steps where some parameters get
//! no gradient (their own update counts then differ). finetune-kernels' own test compares its
//! CUDA kernel with the same reference bit for bit.

use candle_core::{Device, Tensor, Var};
use finetune_kernels::{adamw_step, AdamWHyper, AdamWTensor};
use finetune_train::{AdamW, AdamWConfig};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Deterministic values in [−1, 1).
fn filled(shape: &[usize], salt: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 + salt * 104_729) % 2003) as f32 / 1001.5 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn multi_tensor_step_equals_adamw_step_bit_for_bit() {
    let config = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let shapes = [vec![16, 64], vec![64, 16], vec![3]];
    let init: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| filled(s, i))
        .collect();
    let theirs: Vec<Var> = init.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let mut opt = AdamW::new(theirs.clone(), config).unwrap();
    let ours: Vec<Var> = init.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let zeros = |t: &Tensor| Var::from_tensor(&t.zeros_like().unwrap()).unwrap();
    let m: Vec<Var> = init.iter().map(zeros).collect();
    let v: Vec<Var> = init.iter().map(zeros).collect();
    let mut counts = vec![0u64; init.len()];
    for step in 0..6 {
        let lr = 1e-2 * (1.0 - step as f64 / 10.0);
        // Parameter 1 gets no gradient at steps 2 and 3.
        let grads: Vec<Option<Tensor>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| (i != 1 || !(2..4).contains(&step)).then(|| filled(s, 10 * step + i + 5)))
            .collect();
        opt.step(&grads, lr).unwrap();
        let mut batch = Vec::new();
        for (i, g) in grads.iter().enumerate() {
            if let Some(g) = g {
                counts[i] += 1;
                batch.push(AdamWTensor {
                    param: &ours[i],
                    m: &m[i],
                    v: &v[i],
                    grad: g,
                    t: counts[i],
                });
            }
        }
        let hyper = AdamWHyper {
            lr,
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
            weight_decay: config.weight_decay,
        };
        adamw_step(&batch, &hyper).unwrap();
        let (tm, tv, tt) = opt.state();
        assert_eq!(tt, counts.as_slice(), "update counts at step {step}");
        for i in 0..init.len() {
            assert_eq!(
                values(&theirs[i]),
                values(&ours[i]),
                "param {i} step {step}"
            );
            assert_eq!(values(&tm[i]), values(&m[i]), "m {i} step {step}");
            assert_eq!(values(&tv[i]), values(&v[i]), "v {i} step {step}");
        }
    }
}
