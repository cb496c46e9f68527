//! 12 steps of clipping + AdamW under each schedule against PyTorch + transformers
//! (datasets/fixtures/adamw, made by scripts/make_adamw_fixture.py).

use candle_core::{Device, Tensor, Var};
use finetune_train::{clip_grad_norm, lr_at, AdamW, AdamWConfig, LrSchedule};
use std::collections::HashMap;

fn reference() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../datasets/fixtures/adamw/reference.safetensors"
    );
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

#[test]
fn twelve_steps_match_pytorch_for_every_schedule() {
    let r = reference();
    for (name, schedule) in [
        ("cosine", LrSchedule::Cosine),
        ("linear", LrSchedule::Linear),
        ("constant", LrSchedule::Constant),
    ] {
        let params = vec![
            Var::from_tensor(&r["p0.a"]).unwrap(),
            Var::from_tensor(&r["p0.b"]).unwrap(),
        ];
        let mut opt = AdamW::new(
            params.clone(),
            AdamWConfig {
                weight_decay: 0.1,
                ..Default::default()
            },
        )
        .unwrap();
        let lrs = r[&format!("lr.{name}")].to_vec1::<f64>().unwrap();
        let norms = r[&format!("norm.{name}")].to_vec1::<f64>().unwrap();
        for step in 0..12u64 {
            let lr = lr_at(schedule, 0.05, 3, 12, step);
            assert!(
                (lr - lrs[step as usize]).abs() < 1e-12,
                "{name} step {step}: lr {lr} vs {}",
                lrs[step as usize]
            );
            let mut grads = vec![
                Some(r[&format!("grad.{step}.a")].clone()),
                Some(r[&format!("grad.{step}.b")].clone()),
            ];
            let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
            assert!(
                (norm - norms[step as usize]).abs() < 1e-5 * norms[step as usize].max(1.0),
                "{name} step {step}: norm"
            );
            opt.step(&grads, lr).unwrap();
            for (p, k) in params.iter().zip(["a", "b"]) {
                let want = &r[&format!("param.{name}.{step}.{k}")];
                let diff: f32 = (p.as_tensor() - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                assert!(diff < 1e-6, "{name} step {step} param {k}: off by {diff}");
            }
        }
        assert_eq!(opt.steps(), 12);
    }
}

#[test]
fn master_weights_must_be_f32() {
    let p = Var::zeros(3, candle_core::DType::BF16, &Device::Cpu).unwrap();
    assert!(AdamW::new(vec![p], AdamWConfig::default()).is_err());
}

#[test]
fn a_parameter_without_gradient_is_left_alone() {
    let dev = Device::Cpu;
    let a = Var::from_vec(vec![1f32, 2.0], 2, &dev).unwrap();
    let b = Var::from_vec(vec![3f32, 4.0], 2, &dev).unwrap();
    let mut opt = AdamW::new(vec![a.clone(), b.clone()], AdamWConfig::default()).unwrap();
    let g = Tensor::new(&[0.5f32, -0.5], &dev).unwrap();
    opt.step(&[Some(g.clone()), Some(g.clone())], 0.1).unwrap();
    let b_after_one = b.as_tensor().to_vec1::<f32>().unwrap();
    opt.step(&[Some(g.clone()), None], 0.1).unwrap();
    assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), b_after_one);
    // Its next update is its second (bias correction t = 2), like torch's per-parameter step.
    opt.step(&[None, Some(g)], 0.1).unwrap();
    assert_ne!(b.as_tensor().to_vec1::<f32>().unwrap(), b_after_one);
}
