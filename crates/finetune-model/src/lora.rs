//! LoRA adapters with PEFT's semantics: for a frozen projection W `[out, in]`,
//! y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ with A `[r, in]`, B `[out, r]`, s = lora_alpha / r (rsLoRA:
//! lora_alpha / √r). PEFT initialises A with kaiming-uniform(a = √5), i.e. U(−1/√in, 1/√in),
//! and B with zeros, so a fresh adapter changes nothing. Adapters are keyed by module name
//! (`model.layers.{L}.self_attn.q_proj`, `model.layers.{L}.mlp.experts.{E}.gate_proj`, …);
//! PEFT's file names add `base_model.model.` and `.lora_A.weight` / `.lora_B.weight`.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

/// A set of LoRA adapters.
pub struct Lora {
    pub r: usize,
    pub scale: f64,
    adapters: BTreeMap<String, (Var, Var)>,
    /// Dropout on the adapter's input while training (PEFT's `lora_dropout`), drawn from a
    /// seeded ChaCha stream so that a run is reproducible; off (`None`) for evaluation.
    dropout: Option<Dropout>,
}

struct Dropout {
    p: f64,
    /// Off while evaluating; the stream is kept, so training resumes where it was.
    /// (Atomic and a mutex rather than Cell/RefCell so that a `Lora` can be shared by the
    /// threads of an evaluation.)
    active: std::sync::atomic::AtomicBool,
    rng: std::sync::Mutex<rand_chacha::ChaCha8Rng>,
}

/// The scale s of the update: alpha / r, or alpha / √r with rsLoRA.
pub fn lora_scale(r: usize, alpha: f64, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

impl Lora {
    /// PEFT's initialisation for every `(name, out, in)` target whose last name component is
    /// in `modules` (e.g. `q_proj`, `down_proj`), from a seeded ChaCha RNG.
    pub fn init(
        targets: &[(String, usize, usize)],
        modules: &[String],
        r: usize,
        scale: f64,
        seed: u64,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut adapters = BTreeMap::new();
        for (name, out, inp) in targets {
            let module = name.rsplit('.').next().unwrap_or(name);
            if !modules.iter().any(|m| m == module) {
                continue;
            }
            let bound = 1.0 / (*inp as f32).sqrt();
            let a: Vec<f32> = (0..r * inp)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (r, *inp), device)?)?;
            let b = Var::zeros((*out, r), DType::F32, device)?;
            adapters.insert(name.clone(), (a, b));
        }
        Ok(Self {
            r,
            scale,
            adapters,
            dropout: None,
        })
    }

    /// Adapters from given A `[r, in]` and B `[out, r]` tensors (f32).
    pub fn from_tensors(
        r: usize,
        scale: f64,
        tensors: impl IntoIterator<Item = (String, Tensor, Tensor)>,
    ) -> candle_core::Result<Self> {
        let mut adapters = BTreeMap::new();
        for (name, a, b) in tensors {
            adapters.insert(
                name,
                (
                    Var::from_tensor(&a.to_dtype(DType::F32)?)?,
                    Var::from_tensor(&b.to_dtype(DType::F32)?)?,
                ),
            );
        }
        Ok(Self {
            r,
            scale,
            adapters,
            dropout: None,
        })
    }

    /// Turns dropout on the adapters' input on (`p` > 0, training) or off (`p` = 0).
    pub fn set_dropout(&mut self, p: f64, seed: u64) {
        self.dropout = (p > 0.0).then(|| Dropout {
            p,
            active: std::sync::atomic::AtomicBool::new(true),
            rng: std::sync::Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(seed)),
        });
    }

    /// The adapter's input: `x` itself, or with dropout each element zeroed with probability p
    /// and the others scaled by 1/(1 − p), as torch.nn.Dropout does.
    pub fn dropout_input(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Some(d) = self
            .dropout
            .as_ref()
            .filter(|d| d.active.load(std::sync::atomic::Ordering::Relaxed))
        else {
            return Ok(x.clone());
        };
        let keep = 1.0 - d.p;
        let mut rng = d.rng.lock().unwrap_or_else(|e| e.into_inner());
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.random::<f64>() < keep {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            })
            .collect();
        x * Tensor::from_vec(mask, x.shape(), x.device())?
    }

    /// Whether [`Self::dropout_input`] changes its input now (dropout on and training).
    pub fn dropout_active(&self) -> bool {
        self.dropout
            .as_ref()
            .is_some_and(|d| d.active.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The dropout probability (0 without dropout).
    pub fn dropout_p(&self) -> f64 {
        self.dropout.as_ref().map_or(0.0, |d| d.p)
    }

    /// Dropout on (training) or off (evaluation) without touching its random stream.
    pub fn set_training(&self, training: bool) {
        if let Some(d) = &self.dropout {
            d.active
                .store(training, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Position in the dropout stream (32-bit words drawn), for checkpoints and for replaying
    /// a layer with the same masks (activation recompute); 0 without dropout.
    pub fn dropout_position(&self) -> u128 {
        self.dropout.as_ref().map_or(0, |d| {
            d.rng
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_word_pos()
        })
    }

    /// Moves the dropout stream to `position` (see [`Self::dropout_position`]).
    pub fn set_dropout_position(&self, position: u128) {
        if let Some(d) = &self.dropout {
            d.rng
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_word_pos(position);
        }
    }

    /// Every adapter as (module name, A, B), in name order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &Tensor, &Tensor)> {
        self.adapters
            .iter()
            .map(|(n, (a, b))| (n.as_str(), a.as_tensor(), b.as_tensor()))
    }

    /// A and B of module `name`.
    pub fn get(&self, name: &str) -> Option<(&Tensor, &Tensor)> {
        self.adapters
            .get(name)
            .map(|(a, b)| (a.as_tensor(), b.as_tensor()))
    }

    /// The trainable tensors, A then B of each module in name order.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.adapters.values().flat_map(|(a, b)| [a, b])
    }

    /// Module names with an adapter, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.adapters.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.adapters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_init_is_kaiming_uniform_a_and_zero_b() {
        let targets = vec![
            ("m.q_proj".to_string(), 8, 64),
            ("m.gate".to_string(), 4, 64),
            ("m.experts.0.down_proj".to_string(), 64, 16),
        ];
        let modules = vec!["q_proj".to_string(), "down_proj".to_string()];
        let l = Lora::init(
            &targets,
            &modules,
            4,
            lora_scale(4, 8.0, false),
            7,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            l.names().collect::<Vec<_>>(),
            ["m.experts.0.down_proj", "m.q_proj"]
        );
        let (a, b) = l.get("m.q_proj").unwrap();
        assert_eq!(a.dims(), [4, 64]);
        assert_eq!(b.dims(), [8, 4]);
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        assert!(a.iter().all(|v| v.abs() < 1.0 / 8.0) && a.iter().any(|v| *v != 0.0));
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert!(b.iter().all(|v| *v == 0.0));
        // The same seed gives the same adapter.
        let again = Lora::init(&targets, &modules, 4, 2.0, 7, &Device::Cpu).unwrap();
        let a2: Vec<f32> = again
            .get("m.q_proj")
            .unwrap()
            .0
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, a2);
        assert_eq!(lora_scale(16, 32.0, true), 8.0);
    }

    #[test]
    fn dropout_zeroes_a_fraction_and_keeps_the_mean() {
        let mut l = Lora::from_tensors(1, 1.0, Vec::new()).unwrap();
        let x = Tensor::ones((100, 100), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            l.dropout_input(&x).unwrap().to_vec2::<f32>().unwrap(),
            x.to_vec2::<f32>().unwrap()
        );
        l.set_dropout(0.25, 1);
        let y: Vec<f32> = l
            .dropout_input(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let zeros = y.iter().filter(|v| **v == 0.0).count() as f64 / y.len() as f64;
        assert!((zeros - 0.25).abs() < 0.03, "dropped {zeros}");
        let mean = y.iter().sum::<f32>() as f64 / y.len() as f64;
        assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
        assert!(y.iter().all(|v| *v == 0.0 || (*v - 4.0 / 3.0).abs() < 1e-6));
        // Same seed, same masks.
        let mut again = Lora::from_tensors(1, 1.0, Vec::new()).unwrap();
        again.set_dropout(0.25, 1);
        let z: Vec<f32> = again
            .dropout_input(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y, z);
    }
}
