//! LoRA adapters with PEFT's semantics: for a frozen projection W `[out, in]`,
//! y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ with A `[r, in]`, B `[out, r]`, s = lora_alpha / r (rsLoRA:
//! lora_alpha / √r). PEFT initialises A with kaiming-uniform(a = √5), i.e. U(−1/√in, 1/√in),
//! and B with zeros, so a fresh adapter changes nothing. Adapters are keyed by module name
//! (`model.layers.{L}.self_attn.q_proj`, `model.layers.{L}.mlp.experts.{E}.gate_proj`, …);
//! PEFT's file names add `base_model.model.` and `.lora_A.weight` / `.lora_B.weight`.
//!
//! Storage: the adapters of a MoE layer's experts are stacked, one A `[E, r, in]` and one B
//! `[E, out, r]` variable per layer and projection (`gate_proj`, `up_proj`, `down_proj`) over
//! the experts held (all of them, or a rank's local experts), so that the batched and grouped
//! MoE paths use them as they are (no per-step stacking of 128 experts' tensors) and the
//! optimizer and clipping see one tensor per stack instead of one per expert. Every other
//! adapter is its own pair of variables. The per-module view stays the interface: [`Lora::get`]
//! and [`Lora::tensors`] give each expert's A and B as views (narrow + squeeze, so gradients
//! flow into the stack), and [`Lora::unstack_params`] / [`Lora::stack_params`] convert
//! tensors aligned with [`Lora::vars`] (gradients, AdamW moments) to and from the per-module
//! PEFT order that files keep (modules sorted by name, A then B).

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CustomOp1, DType, Device, Layout, Shape, Tensor, Var};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

/// A set of LoRA adapters (module doc: expert adapters are stored stacked).
pub struct Lora {
    pub r: usize,
    pub scale: f64,
    /// The variables: a single module's A and B, or a stack of experts' (ordered by the name
    /// of their first module).
    entries: Vec<Entry>,
    /// Every module name (sorted: PEFT order) → (entry, position in the entry's stack).
    index: BTreeMap<String, (usize, usize)>,
    /// Dropout on the adapter's input while training (PEFT's `lora_dropout`), counter-based
    /// masks ([`crate::dropout`]) so that every path, recompute and parallel layout draws the
    /// same ones; `None` without dropout.
    dropout: Option<Dropout>,
}

/// One A/B pair of variables: a single module (A `[r, in]`, B `[out, r]`) or the experts
/// `modules` of one MoE layer and projection, stacked (A `[E, r, in]`, B `[E, out, r]`, in
/// expert order).
struct Entry {
    modules: Vec<String>,
    stacked: bool,
    a: Var,
    b: Var,
}

/// Per expert of a stack, its (A, B) slices, `None` for experts that do not run
/// ([`Lora::expert_slices`]).
pub type ExpertAdapters = Vec<Option<(Tensor, Tensor)>>;

/// The gradients of the slices of one stack handed out by [`Lora::expert_slices`], kept until
/// the last of them arrives.
struct SliceGrads {
    views: usize,
    got: std::sync::Mutex<Vec<(usize, Tensor)>>,
}

/// Slice `pos` of a stack `[E, …]` (a copy, shape `[…]`); backward hands the stack nothing
/// until every slice of its [`SliceGrads`] has its gradient, then all of them as one
/// `[E, …]` tensor (zeros for the experts not run), so the stack's gradient costs one
/// full-size tensor per forward instead of one per expert.
struct ExpertSlice {
    pos: usize,
    grads: std::sync::Arc<SliceGrads>,
}

/// The copy of slice `pos` of the first dimension of the tensor at `l` in `s`.
fn copy_slice<S>(s: &S, l: &Layout, pos: usize) -> candle_core::Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let shape = Shape::from(&l.dims()[1..]);
    let src = l.narrow(0, pos, 1)?;
    // Safety: every element is written by the copy below.
    let mut dst = unsafe { s.device().alloc_uninit(&shape, s.dtype())? };
    s.copy_strided_src(&mut dst, 0, &src)?;
    Ok((dst, shape))
}

impl CustomOp1 for ExpertSlice {
    fn name(&self) -> &'static str {
        "lora-expert-slice"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        copy_slice(s, l, self.pos)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        copy_slice(s, l, self.pos)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let mut got = self.grads.got.lock().unwrap_or_else(|e| e.into_inner());
        got.push((self.pos, grad.clone()));
        if got.len() < self.grads.views {
            return Ok(None);
        }
        let zero = grad.zeros_like()?;
        let mut parts = vec![zero; arg.dim(0)?];
        for (pos, g) in got.drain(..) {
            parts[pos] = g;
        }
        Ok(Some(Tensor::stack(&parts, 0)?))
    }
}

/// For an expert module `<prefix>.mlp.experts.<e>.<proj>`: the stack it belongs to
/// (`<prefix>.mlp.experts.*.<proj>`) and its expert index.
fn expert_stack_key(name: &str) -> Option<(String, usize)> {
    let (head, proj) = name.rsplit_once('.')?;
    if !matches!(proj, "gate_proj" | "up_proj" | "down_proj") {
        return None;
    }
    let (prefix, expert) = head.rsplit_once('.')?;
    let expert: usize = expert.parse().ok()?;
    prefix
        .ends_with(".mlp.experts")
        .then(|| (format!("{prefix}.*.{proj}"), expert))
}

struct Dropout {
    p: f64,
    /// The masks' seed ([`crate::dropout`]: masks are hashes of seed, module, token, feature).
    seed: u64,
    /// Off while evaluating. (Atomic so that a `Lora` can be shared by the threads of an
    /// evaluation.)
    active: std::sync::atomic::AtomicBool,
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
        // Drawn per module in target order (the stream of the per-module layout), then stacked.
        let mut adapters = Vec::new();
        for (name, out, inp) in targets {
            let module = name.rsplit('.').next().unwrap_or(name);
            if !modules.iter().any(|m| m == module) {
                continue;
            }
            let bound = 1.0 / (*inp as f32).sqrt();
            let a: Vec<f32> = (0..r * inp)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let a = Tensor::from_vec(a, (r, *inp), device)?;
            let b = Tensor::zeros((*out, r), DType::F32, device)?;
            adapters.push((name.clone(), a, b));
        }
        Self::from_tensors(r, scale, adapters)
    }

    /// Adapters from given A `[r, in]` and B `[out, r]` tensors (f32), by module name; the
    /// experts' adapters of each MoE layer and projection are stacked (module doc).
    pub fn from_tensors(
        r: usize,
        scale: f64,
        tensors: impl IntoIterator<Item = (String, Tensor, Tensor)>,
    ) -> candle_core::Result<Self> {
        Self::build(r, scale, tensors, true)
    }

    /// [`Self::from_tensors`] without stacking: every module its own A and B variables, the
    /// storage before expert adapters were stacked (the MoE paths then stack per use). For
    /// comparisons of the two storages; same math.
    pub fn from_tensors_per_module(
        r: usize,
        scale: f64,
        tensors: impl IntoIterator<Item = (String, Tensor, Tensor)>,
    ) -> candle_core::Result<Self> {
        Self::build(r, scale, tensors, false)
    }

    fn build(
        r: usize,
        scale: f64,
        tensors: impl IntoIterator<Item = (String, Tensor, Tensor)>,
        stack: bool,
    ) -> candle_core::Result<Self> {
        let mut singles: Vec<(String, Tensor, Tensor)> = Vec::new();
        // Stack key → (expert, module, A, B).
        let mut stacks: BTreeMap<String, Vec<(usize, String, Tensor, Tensor)>> = BTreeMap::new();
        let mut seen = std::collections::BTreeSet::new();
        for (name, a, b) in tensors {
            if !seen.insert(name.clone()) {
                candle_core::bail!("two adapters for module {name}");
            }
            let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
            match expert_stack_key(&name).filter(|_| stack) {
                Some((key, e)) => stacks.entry(key).or_default().push((e, name, a, b)),
                None => singles.push((name, a, b)),
            }
        }
        let mut entries = Vec::new();
        for (name, a, b) in singles {
            entries.push(Entry {
                modules: vec![name],
                stacked: false,
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
            });
        }
        for (key, mut members) in stacks {
            members.sort_by_key(|m| m.0);
            let (a0, b0) = (members[0].2.dims().to_vec(), members[0].3.dims().to_vec());
            if let Some(m) = members
                .iter()
                .find(|m| m.2.dims() != a0 || m.3.dims() != b0)
            {
                candle_core::bail!(
                    "adapters of {key} differ in shape: {} has A {:?}, B {:?}, {} has A {a0:?}, B {b0:?}",
                    m.1,
                    m.2.dims(),
                    m.3.dims(),
                    members[0].1
                );
            }
            let a = Tensor::stack(&members.iter().map(|m| &m.2).collect::<Vec<_>>(), 0)?;
            let b = Tensor::stack(&members.iter().map(|m| &m.3).collect::<Vec<_>>(), 0)?;
            entries.push(Entry {
                modules: members.into_iter().map(|m| m.1).collect(),
                stacked: true,
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
            });
        }
        // Variable order: by the (PEFT-order) smallest module name of each entry.
        entries.sort_by(|x, y| x.modules.iter().min().cmp(&y.modules.iter().min()));
        let mut index = BTreeMap::new();
        for (i, e) in entries.iter().enumerate() {
            for (pos, m) in e.modules.iter().enumerate() {
                index.insert(m.clone(), (i, pos));
            }
        }
        Ok(Self {
            r,
            scale,
            entries,
            index,
            dropout: None,
        })
    }

    /// Turns dropout on the adapters' input on (`p` > 0, training) or off (`p` = 0); `seed`
    /// keys its masks ([`crate::dropout`]).
    pub fn set_dropout(&mut self, p: f64, seed: u64) {
        self.dropout = (p > 0.0).then(|| Dropout {
            p,
            seed,
            active: std::sync::atomic::AtomicBool::new(true),
        });
    }

    /// The dropout probability and seed of `other` (e.g. the whole adapter a parallel rank
    /// takes its part of), training or not as `other` is.
    pub fn copy_dropout(&mut self, other: &Lora) {
        self.dropout = other.dropout.as_ref().map(|d| Dropout {
            p: d.p,
            seed: d.seed,
            active: std::sync::atomic::AtomicBool::new(
                d.active.load(std::sync::atomic::Ordering::Relaxed),
            ),
        });
    }

    /// The adapter input of module `module`: `x` itself, or with dropout each element zeroed
    /// with probability p and the others scaled by 1/(1 − p), as torch.nn.Dropout does. x's
    /// last dimension is features `first_feature..` of the module's input (a tensor-parallel
    /// rank may hold a slice); its rows (all other dimensions flattened) are the tokens `rows`
    /// ([`crate::dropout`]: the mask of a token does not depend on where or in which order it
    /// is computed).
    pub fn dropout_input(
        &self,
        x: &Tensor,
        module: &str,
        rows: &crate::dropout::Rows<'_>,
        first_feature: usize,
    ) -> candle_core::Result<Tensor> {
        let key = crate::dropout::module_key(module);
        self.dropout_with(x, |_| key, rows, first_feature)
    }

    /// [`Self::dropout_input`] for the rows of several modules at once (stacked experts): row i
    /// of x (all dimensions but the last flattened) belongs to `modules[module_of(i)]`.
    pub fn dropout_input_stacked(
        &self,
        x: &Tensor,
        modules: &[&str],
        module_of: impl Fn(usize) -> usize,
        rows: &crate::dropout::Rows<'_>,
    ) -> candle_core::Result<Tensor> {
        if !self.dropout_active() {
            return Ok(x.clone());
        }
        let keys: Vec<u64> = modules
            .iter()
            .map(|m| crate::dropout::module_key(m))
            .collect();
        self.dropout_with(x, |i| keys[module_of(i)], rows, 0)
    }

    fn dropout_with(
        &self,
        x: &Tensor,
        module_of: impl Fn(usize) -> u64,
        rows: &crate::dropout::Rows<'_>,
        first_feature: usize,
    ) -> candle_core::Result<Tensor> {
        let Some(d) = self
            .dropout
            .as_ref()
            .filter(|d| d.active.load(std::sync::atomic::Ordering::Relaxed))
        else {
            return Ok(x.clone());
        };
        let features = x.dims().last().copied().unwrap_or(1).max(1);
        let n_rows = x.elem_count() / features;
        let mask = crate::dropout::mask(
            d.seed,
            d.p,
            n_rows,
            features,
            first_feature,
            module_of,
            rows,
        );
        x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?
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

    /// Dropout on (training) or off (evaluation).
    pub fn set_training(&self, training: bool) {
        if let Some(d) = &self.dropout {
            d.active
                .store(training, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A and B of module `name` of entry `entry` at stack position `pos`: the variables of a
    /// single module, a view of an expert's slice of a stack.
    fn module_tensors(&self, entry: usize, pos: usize) -> (Tensor, Tensor) {
        let e = &self.entries[entry];
        if !e.stacked {
            return (e.a.as_tensor().clone(), e.b.as_tensor().clone());
        }
        // `pos` indexes the stack's first dimension by construction: narrow cannot fail.
        let view = |v: &Var| {
            v.as_tensor()
                .narrow(0, pos, 1)
                .and_then(|t| t.squeeze(0))
                .expect("stack position in range")
        };
        (view(&e.a), view(&e.b))
    }

    /// Every adapter as (module name, A, B), in name order (PEFT order); an expert's A and B
    /// are views of its stack.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, Tensor, Tensor)> + '_ {
        self.index.iter().map(|(n, &(entry, pos))| {
            let (a, b) = self.module_tensors(entry, pos);
            (n.as_str(), a, b)
        })
    }

    /// A and B of module `name` (an expert's: views of its stack, differentiable into it).
    pub fn get(&self, name: &str) -> Option<(Tensor, Tensor)> {
        self.index
            .get(name)
            .map(|&(entry, pos)| self.module_tensors(entry, pos))
    }

    /// The gradients of module `name`'s A and B in `grads` (an expert's: its slice of the
    /// stack's gradient, zeros when the stack got one but no token reached this expert);
    /// `None` when the module has no adapter or its variables got no gradient.
    pub fn module_grads(
        &self,
        grads: &candle_core::backprop::GradStore,
        name: &str,
    ) -> Option<(Tensor, Tensor)> {
        let &(entry, pos) = self.index.get(name)?;
        let e = &self.entries[entry];
        let (ga, gb) = (grads.get(e.a.as_tensor())?, grads.get(e.b.as_tensor())?);
        if !e.stacked {
            return Some((ga.clone(), gb.clone()));
        }
        let slice = |g: &Tensor| g.narrow(0, pos, 1).and_then(|t| t.squeeze(0)).ok();
        Some((slice(ga)?, slice(gb)?))
    }

    /// The adapters of the experts `names` (one MoE layer's projection, in expert order) for
    /// a forward that runs exactly the experts marked in `used`: each used expert's (A, B) as a
    /// copy of its slice of the stack, whose gradients reach the stack as one tensor once the
    /// last used slice has backpropagated ([`ExpertSlice`]). A narrow view per expert would
    /// add a zero-padded full-size gradient into the stack per expert: O(E²) for E experts.
    /// `None` when `names` are not exactly one stack. Every slice returned must take part in
    /// the loss that is backpropagated (the per-expert MoE path: each runs on its tokens).
    pub fn expert_slices(
        &self,
        names: &[&str],
        used: &[bool],
    ) -> candle_core::Result<Option<ExpertAdapters>> {
        let Some((a, b)) = self.stacked(names) else {
            return Ok(None);
        };
        if used.len() != names.len() {
            candle_core::bail!("{} flags for {} experts", used.len(), names.len());
        }
        let views = used.iter().filter(|u| **u).count();
        let shared = || {
            std::sync::Arc::new(SliceGrads {
                views,
                got: Default::default(),
            })
        };
        let (ga, gb) = (shared(), shared());
        used.iter()
            .enumerate()
            .map(|(pos, &u)| {
                if !u {
                    return Ok(None);
                }
                let slice = |t: &Tensor, grads: &std::sync::Arc<SliceGrads>| {
                    t.apply_op1_arc(std::sync::Arc::new(Box::new(ExpertSlice {
                        pos,
                        grads: grads.clone(),
                    })))
                };
                Ok(Some((slice(a, &ga)?, slice(b, &gb)?)))
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map(Some)
    }

    /// Whether module `name` has an adapter.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The stacked A `[E, r, in]` and B `[E, out, r]` variables of the experts `names`, when
    /// they are exactly one stack in this order (every expert of a MoE layer's projection);
    /// `None` otherwise.
    pub fn stacked(&self, names: &[&str]) -> Option<(&Tensor, &Tensor)> {
        let &(entry, _) = self.index.get(*names.first()?)?;
        let e = &self.entries[entry];
        let same = e.stacked
            && e.modules.len() == names.len()
            && e.modules.iter().zip(names).all(|(m, n)| m == n);
        same.then(|| (e.a.as_tensor(), e.b.as_tensor()))
    }

    /// The trainable tensors: A then B of each entry (a single module, or a stack of experts),
    /// entries ordered by their first module name. Gradients and optimizer state are aligned
    /// with this order.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.entries.iter().flat_map(|e| [&e.a, &e.b])
    }

    /// For each of [`Self::vars`]: the modules it holds (one, or a stack's experts in order).
    pub fn var_modules(&self) -> impl Iterator<Item = &[String]> {
        self.entries
            .iter()
            .flat_map(|e| [e.modules.as_slice(), e.modules.as_slice()])
    }

    /// Per-module tensors in PEFT order (modules by name, A then B: what files keep) of
    /// `per_var`, tensors aligned with and shaped like [`Self::vars`] (gradients, moments): a
    /// stack's tensor gives each expert its slice (a view).
    pub fn unstack_params(&self, per_var: &[Tensor]) -> candle_core::Result<Vec<Tensor>> {
        self.check_aligned(per_var.len())?;
        let mut out = Vec::with_capacity(2 * self.index.len());
        for &(entry, pos) in self.index.values() {
            let e = &self.entries[entry];
            for k in 0..2 {
                let t = &per_var[2 * entry + k];
                out.push(if e.stacked {
                    t.narrow(0, pos, 1)?.squeeze(0)?
                } else {
                    t.clone()
                });
            }
        }
        Ok(out)
    }

    /// The inverse of [`Self::unstack_params`]: tensors aligned with [`Self::vars`] from
    /// per-module ones in PEFT order (checked against the variables' shapes).
    pub fn stack_params(&self, per_module: &[Tensor]) -> candle_core::Result<Vec<Tensor>> {
        if per_module.len() != 2 * self.index.len() {
            candle_core::bail!(
                "{} per-module tensors for {} adapters (A and B each)",
                per_module.len(),
                self.index.len()
            );
        }
        let mut parts: Vec<Vec<Option<Tensor>>> = self
            .entries
            .iter()
            .flat_map(|e| [vec![None; e.modules.len()], vec![None; e.modules.len()]])
            .collect();
        for (i, &(entry, pos)) in self.index.values().enumerate() {
            for k in 0..2 {
                parts[2 * entry + k][pos] = Some(per_module[2 * i + k].clone());
            }
        }
        let vars: Vec<&Var> = self.vars().collect();
        parts
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let e = &self.entries[i / 2];
                let p: Vec<Tensor> = p.into_iter().map(|t| t.expect("every slot set")).collect();
                let t = if e.stacked {
                    Tensor::stack(&p, 0)?
                } else {
                    p[0].clone()
                };
                if t.dims() != vars[i].dims() {
                    candle_core::bail!(
                        "tensor for {} is {:?}, the adapter's is {:?}",
                        e.modules[0],
                        t.dims(),
                        vars[i].dims()
                    );
                }
                Ok(t)
            })
            .collect()
    }

    /// Per-module counts in PEFT order (as [`Self::unstack_params`]) of counts aligned with
    /// [`Self::vars`] (AdamW's update counts: every expert of a stack has its stack's).
    pub fn unstack_counts(&self, per_var: &[u64]) -> candle_core::Result<Vec<u64>> {
        self.check_aligned(per_var.len())?;
        Ok(self
            .index
            .values()
            .flat_map(|&(entry, _)| [per_var[2 * entry], per_var[2 * entry + 1]])
            .collect())
    }

    /// The inverse of [`Self::unstack_counts`]; the experts of a stack must agree (they are
    /// updated together).
    pub fn stack_counts(&self, per_module: &[u64]) -> candle_core::Result<Vec<u64>> {
        if per_module.len() != 2 * self.index.len() {
            candle_core::bail!(
                "{} per-module counts for {} adapters (A and B each)",
                per_module.len(),
                self.index.len()
            );
        }
        let mut out: Vec<Option<u64>> = vec![None; 2 * self.entries.len()];
        for (i, (name, &(entry, _))) in self.index.iter().enumerate() {
            for k in 0..2 {
                let c = per_module[2 * i + k];
                match out[2 * entry + k] {
                    None => out[2 * entry + k] = Some(c),
                    Some(o) if o == c => {}
                    Some(o) => candle_core::bail!(
                        "update count {c} of {name} differs from {o} of the other experts \
                         stacked with it"
                    ),
                }
            }
        }
        Ok(out.into_iter().map(|c| c.unwrap_or(0)).collect())
    }

    fn check_aligned(&self, n: usize) -> candle_core::Result<()> {
        if n != 2 * self.entries.len() {
            candle_core::bail!(
                "{n} tensors for {} adapter variables",
                2 * self.entries.len()
            );
        }
        Ok(())
    }

    /// Module names with an adapter, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Number of modules with an adapter (an expert counts once).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
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
    fn dropout_zeroes_a_fraction_keeps_the_mean_and_stops_in_evaluation() {
        use crate::dropout::Rows;
        let mut l = Lora::from_tensors(1, 1.0, Vec::new()).unwrap();
        let x = Tensor::ones((100, 100), DType::F32, &Device::Cpu).unwrap();
        let rows = Rows::Sequence(4);
        let drop = |l: &Lora, module: &str| -> Vec<f32> {
            l.dropout_input(&x, module, &rows, 0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert!(drop(&l, "m").iter().all(|v| *v == 1.0));
        l.set_dropout(0.25, 1);
        let y = drop(&l, "m");
        let zeros = y.iter().filter(|v| **v == 0.0).count() as f64 / y.len() as f64;
        assert!((zeros - 0.25).abs() < 0.03, "dropped {zeros}");
        let mean = y.iter().sum::<f32>() as f64 / y.len() as f64;
        assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
        assert!(y.iter().all(|v| *v == 0.0 || (*v - 4.0 / 3.0).abs() < 1e-6));
        // Same seed, module and rows: the same mask; another module: another one.
        let mut again = Lora::from_tensors(1, 1.0, Vec::new()).unwrap();
        again.copy_dropout(&l);
        assert_eq!(y, drop(&again, "m"));
        assert_ne!(y, drop(&again, "n"));
        // Stacked rows: rows 0..40 of module "m", the rest of "n", as each alone gives them.
        let stacked: Vec<f32> = l
            .dropout_input_stacked(&x, &["m", "n"], |i| usize::from(i >= 40), &rows)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(stacked[..4000], y[..4000]);
        assert_eq!(stacked[4000..], drop(&l, "n")[4000..]);
        // Evaluation: the input unchanged.
        l.set_training(false);
        assert!(drop(&l, "m").iter().all(|v| *v == 1.0));
        l.set_training(true);
        assert_eq!(drop(&l, "m"), y);
    }

    fn expert_lora() -> Lora {
        // Two MoE layers' experts (4 and 2 of them, in a rank-like partial set: experts 2 and 10
        // of layer 1), and an attention module; B non-zero so that every slice is distinct.
        let mut tensors = Vec::new();
        let mut k = 0f32;
        let mut t = |r: usize, c: usize| {
            k += 1.0;
            Tensor::arange(0f32, (r * c) as f32, &Device::Cpu)
                .unwrap()
                .reshape((r, c))
                .unwrap()
                .affine(0.01, k as f64)
                .unwrap()
        };
        for e in [0, 1, 2, 3] {
            for (p, o, i) in [("gate_proj", 6, 4), ("down_proj", 4, 6)] {
                let name = format!("model.layers.0.mlp.experts.{e}.{p}");
                tensors.push((name, t(2, i), t(o, 2)));
            }
        }
        for e in [10, 2] {
            let name = format!("model.layers.1.mlp.experts.{e}.up_proj");
            tensors.push((name, t(2, 4), t(6, 2)));
        }
        tensors.push(("model.layers.0.self_attn.q_proj".into(), t(2, 4), t(8, 2)));
        Lora::from_tensors(2, 1.0, tensors).unwrap()
    }

    #[test]
    fn experts_are_stacked_and_convert_to_per_module_order_and_back() {
        let l = expert_lora();
        // 11 modules in 4 entries: 2 stacks in layer 0, 1 in layer 1, q_proj.
        assert_eq!(l.len(), 11);
        let dims: Vec<Vec<usize>> = l.vars().map(|v| v.dims().to_vec()).collect();
        assert_eq!(
            dims,
            [
                vec![4, 2, 6],
                vec![4, 4, 2],
                vec![4, 2, 4],
                vec![4, 6, 2],
                vec![2, 4],
                vec![8, 2],
                vec![2, 2, 4],
                vec![2, 6, 2],
            ]
        );
        // Stack order is the expert index (2 before 10), not the name order.
        let modules: Vec<&[String]> = l.var_modules().collect();
        assert_eq!(
            modules[6],
            [
                "model.layers.1.mlp.experts.2.up_proj".to_string(),
                "model.layers.1.mlp.experts.10.up_proj".to_string()
            ]
        );
        assert!(l
            .stacked(&[
                "model.layers.1.mlp.experts.2.up_proj",
                "model.layers.1.mlp.experts.10.up_proj"
            ])
            .is_some());
        assert!(l
            .stacked(&["model.layers.1.mlp.experts.2.up_proj"])
            .is_none());
        // Views equal what went in; the per-module (PEFT) order round-trips through stacking.
        let again = Lora::from_tensors_per_module(
            2,
            1.0,
            l.tensors().map(|(n, a, b)| (n.to_string(), a, b)),
        )
        .unwrap();
        assert_eq!(again.vars().count(), 22);
        let vars: Vec<Tensor> = l.vars().map(|v| v.as_tensor().clone()).collect();
        let per_module = l.unstack_params(&vars).unwrap();
        assert_eq!(per_module.len(), 22);
        for ((n, a, b), pair) in again.tensors().zip(per_module.chunks(2)) {
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(v(&a), v(&pair[0]), "{n}");
            assert_eq!(v(&b), v(&pair[1]), "{n}");
        }
        let back = l.stack_params(&per_module).unwrap();
        for (x, y) in back.iter().zip(&vars) {
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(v(x), v(y));
        }
        // Update counts: replicated per expert, and the experts of a stack must agree.
        let t: Vec<u64> = (1..=8).collect();
        let per = l.unstack_counts(&t).unwrap();
        assert_eq!(per.len(), 22);
        assert_eq!(l.stack_counts(&per).unwrap(), t);
        let mut bad = per.clone();
        bad[0] += 1;
        let e = l.stack_counts(&bad).unwrap_err().to_string();
        assert!(
            e.contains("mlp.experts.1.down_proj") && e.contains("differs"),
            "{e}"
        );
        assert!(l.stack_params(&per_module[1..]).is_err());
    }

    #[test]
    fn expert_slices_give_the_stack_the_gradients_of_narrow_views() {
        let l = expert_lora();
        let names: Vec<String> = (0..4)
            .map(|e| format!("model.layers.0.mlp.experts.{e}.gate_proj"))
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let x = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        // Expert 2 does not run.
        let used = [true, true, false, true];
        let loss = |ab: &[Option<(Tensor, Tensor)>]| {
            let mut total = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
            for (e, ab) in ab.iter().enumerate() {
                let Some((a, b)) = ab else { continue };
                let y = x.matmul(&a.t().unwrap()).unwrap();
                let y = y.matmul(&b.t().unwrap()).unwrap();
                let w = (e + 1) as f64;
                total = (total + (y.sqr().unwrap().sum_all().unwrap() * w).unwrap()).unwrap();
            }
            total
        };
        let slices = l.expert_slices(&names, &used).unwrap().unwrap();
        assert!(slices[2].is_none());
        let views: Vec<Option<(Tensor, Tensor)>> = names
            .iter()
            .zip(used)
            .map(|(n, u)| u.then(|| l.get(n).unwrap()))
            .collect();
        let (ls, lv) = (loss(&slices), loss(&views));
        assert_eq!(
            ls.to_scalar::<f32>().unwrap(),
            lv.to_scalar::<f32>().unwrap()
        );
        let (gs, gv) = (ls.backward().unwrap(), lv.backward().unwrap());
        for n in &names {
            let (sa, sb) = l.module_grads(&gs, n).unwrap();
            let (va, vb) = l.module_grads(&gv, n).unwrap();
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(v(&sa), v(&va), "{n}");
            assert_eq!(v(&sb), v(&vb), "{n}");
        }
        // The expert that did not run: zeros; the others: not.
        let (a2, _) = l.module_grads(&gs, names[2]).unwrap();
        assert!(a2
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| *v == 0.0));
        let (a1, _) = l.module_grads(&gs, names[1]).unwrap();
        assert!(a1
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .any(|v| *v != 0.0));
        // Not a stack in this order: no slices.
        let mut rev = names.clone();
        rev.reverse();
        assert!(l.expert_slices(&rev, &used).unwrap().is_none());
    }
}
