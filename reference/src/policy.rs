//! The fixed-budget cache as a state machine over a stream of decode steps — the common frame of every
//! eviction/merge policy (Full, StreamingLLM, H2O, TOVA, TreeKV, WeightedKV).
//!
//! One [`PolicyCache`] is the cache of **one KV head** of one sequence; its `G` query heads (GQA) attend to it
//! together and the per-slot attention mass the policy uses is the **mean over those `G` heads** (spec §6.3,
//! the one aggregation used by every policy here). A layer is `Hkv` independent caches ([`LayerPolicy`]).
//!
//! Logical layout, in cache order: `[sinks | middle | recent]`, capacity `c = sinks + middle + recent`.
//! One step (spec §2.2, §3.3, §5):
//! 1. append the new token `(k, v)` at the right end, with `S = 0`, `C = 0`;
//! 2. attend: `a = mean_g softmax(scale·⟨R(q_g), R(k_j)⟩)` over every cached entry, including the new one, and
//!    `o_g = Σ_j p_{g,j} v_j` (this is the step's output: attention happens *before* compression);
//! 3. accumulate `S += a`, `C += 1` on every entry;
//! 4. if `len > c`: the **region** is `entries[sinks .. len − recent]` — the middle plus the token that just
//!    left the recent window, `middle + 1` entries — and the policy's rule removes exactly one entry of it
//!    (possibly merging its value into a neighbour first).
//!
//! Keys are stored **pre-RoPE**; `R` rotates them at attention time with the entry's cache rank
//! ([`Positions::CacheRank`], StreamingLLM/TreeKV style; the query gets the newest rank `len − 1`) or its
//! original stream position ([`Positions::Original`]). With `rope: None` no rotation is applied.
//!
//! Every entry records its original stream position (`pos`) and, for merging policies, the positions whose
//! values it has absorbed, so kept sets can be compared between policies and with kernels.

use crate::attention::{attention, Dims};
use crate::rope::Rope;
use crate::{baselines, treekv, weightedkv, Real};

/// Sizes of the three logical segments; the capacity is their sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Leading tokens that are never evicted (attention sinks).
    pub sinks: usize,
    /// The policy-managed region (tree region, heavy hitters, merge region).
    pub middle: usize,
    /// The most recent tokens, never evicted.
    pub recent: usize,
}

impl Layout {
    /// `sinks + middle + recent` (saturating; see [`Layout::checked_capacity`]).
    pub fn capacity(&self) -> usize {
        self.sinks.saturating_add(self.middle).saturating_add(self.recent)
    }
    /// `sinks + middle + recent`, or `None` when the sum overflows.
    pub fn checked_capacity(&self) -> Option<usize> {
        self.sinks.checked_add(self.middle)?.checked_add(self.recent)
    }
}

/// Which positions RoPE uses for cached keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Positions {
    /// Rank in the cache (`0..len`), the query at `len − 1` (StreamingLLM, TreeKV, WeightedKV).
    CacheRank,
    /// The token's position in the stream (H2O's HF reference, SnapKV).
    Original,
}

/// The policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Keep everything (the dense baseline); the layout is ignored.
    Full,
    /// Sinks plus a sliding window: the region's oldest entry is evicted (spec §5.1).
    StreamingLlm,
    /// Heavy hitters: evict the region entry with the smallest *accumulated* attention `S` (spec §5.2).
    H2o,
    /// Evict the region entry with the smallest attention from the *current* query (spec §5.5).
    Tova,
    /// TreeKV: adjacent pair under the cyclic pointer, compare average attention `S/C` (spec §2.2);
    /// `select_left` is the ablation that always evicts the left entry (spec §2.5).
    TreeKv {
        /// Always evict the left entry of the scope, ignoring attention.
        select_left: bool,
    },
    /// WeightedKV: merge the least-attended region entry's value into its right neighbour, drop its key
    /// (spec §3.3).
    WeightedKv,
}

impl Policy {
    /// Every evicting policy, in a fixed order (for tests and benches that sweep them).
    pub const EVICTING: [Policy; 6] = [Policy::StreamingLlm, Policy::H2o, Policy::Tova, Policy::TreeKv { select_left: false }, Policy::TreeKv { select_left: true }, Policy::WeightedKv];
}

/// Configuration of one cache.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PolicyConfig {
    /// The policy.
    pub policy: Policy,
    /// Segment sizes.
    pub layout: Layout,
    /// RoPE applied at attention time, or none.
    pub rope: Option<Rope>,
    /// Positions RoPE uses.
    pub positions: Positions,
    /// Softmax scale (usually `1/√D`).
    pub scale: f64,
}

/// One cached token.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry<T> {
    /// Original stream position of the key (and of the value before any merge).
    pub pos: usize,
    /// Pre-RoPE key, `[D]`.
    pub k: Vec<T>,
    /// Value, `[D]` (for WeightedKV possibly a convex combination of several originals).
    pub v: Vec<T>,
    /// Accumulated attention `S` (sum of the group-mean probability over the steps it was cached).
    pub score: T,
    /// Number of steps it has been attended (`C`).
    pub count: T,
    /// Original positions whose values this entry's value combines (itself first).
    pub absorbed: Vec<usize>,
}

impl<T: Real> Entry<T> {
    /// A fresh entry (`S = C = 0`).
    pub fn new(pos: usize, k: Vec<T>, v: Vec<T>) -> Self {
        Entry { pos, k, v, score: T::zero(), count: T::zero(), absorbed: vec![pos] }
    }
    /// Average attention `S/C` (spec §2.2 "S̄", §3.3 "ā").
    pub fn avg(&self) -> T {
        self.score / self.count
    }
}

/// Output of one decode step.
#[derive(Clone, Debug)]
pub struct StepOut<T> {
    /// Attention output per query head of the group, `[G, D]`.
    pub o: Vec<T>,
    /// Group-mean probability of every entry at this step, in cache order before compression, `[len]`.
    pub mass: Vec<T>,
}

/// The cache of one KV head under one policy.
#[derive(Clone, Debug)]
pub struct PolicyCache<T> {
    cfg: PolicyConfig,
    d: usize,
    entries: Vec<Entry<T>>,
    /// TreeKV's cyclic scope pointer, relative to the region start.
    pointer: usize,
    seen: usize,
}

impl<T: Real> PolicyCache<T> {
    /// An empty cache for head dimension `d`. Panics on a layout the policy cannot run with (TreeKV and
    /// WeightedKV need `middle ≥ 1`; StreamingLLM, H2O and TOVA need capacity ≥ 1).
    pub fn new(cfg: PolicyConfig, d: usize) -> Self {
        match cfg.policy {
            Policy::Full => {}
            Policy::TreeKv { .. } | Policy::WeightedKv => assert!(cfg.layout.middle >= 1, "needs middle >= 1"),
            _ => assert!(cfg.layout.capacity() >= 1, "needs capacity >= 1"),
        }
        PolicyCache { cfg, d, entries: Vec::new(), pointer: 0, seen: 0 }
    }

    /// The configuration.
    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }
    /// Number of cached entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// The budget (`usize::MAX` for [`Policy::Full`]).
    pub fn capacity(&self) -> usize {
        match self.cfg.policy {
            Policy::Full => usize::MAX,
            _ => self.cfg.layout.capacity(),
        }
    }
    /// Tokens streamed so far.
    pub fn seen(&self) -> usize {
        self.seen
    }
    /// The entries in cache order.
    pub fn entries(&self) -> &[Entry<T>] {
        &self.entries
    }
    /// Original positions of the kept keys, in cache order.
    pub fn kept_positions(&self) -> Vec<usize> {
        self.entries.iter().map(|e| e.pos).collect()
    }
    /// TreeKV's pointer (relative to the region start).
    pub fn pointer(&self) -> usize {
        self.pointer
    }

    /// One decode step: `q: [G, D]` (the group's query heads, pre-RoPE), `k, v: [D]` (pre-RoPE key).
    pub fn step(&mut self, q: &[T], k: &[T], v: &[T]) -> StepOut<T> {
        let d = self.d;
        assert!(q.len().is_multiple_of(d) && !q.is_empty() && k.len() == d && v.len() == d, "shape mismatch");
        let g = q.len() / d;
        self.entries.push(Entry::new(self.seen, k.to_vec(), v.to_vec()));
        self.seen += 1;
        let len = self.entries.len();
        let (qr, kr) = self.rotated(q, g);
        let vs: Vec<T> = self.entries.iter().flat_map(|e| e.v.iter().copied()).collect();
        let dims = Dims { lq: 1, l: len, hq: g, hkv: 1, d };
        let att = attention(&qr, &kr, &vs, dims, len - 1, T::of(self.cfg.scale));
        for (e, &a) in self.entries.iter_mut().zip(&att.group_mean) {
            e.score = e.score + a;
            e.count = e.count + T::one();
        }
        self.compress(&att.group_mean);
        StepOut { o: att.o, mass: att.group_mean }
    }

    /// RoPE-rotated query `[G, D]` and keys `[len, D]` for this step.
    fn rotated(&self, q: &[T], g: usize) -> (Vec<T>, Vec<T>) {
        let len = self.entries.len();
        let Some(rope) = self.cfg.rope else {
            return (q.to_vec(), self.entries.iter().flat_map(|e| e.k.iter().copied()).collect());
        };
        let pos_of = |rank: usize, e: &Entry<T>| match self.cfg.positions {
            Positions::CacheRank => rank,
            Positions::Original => e.pos,
        };
        let qpos = pos_of(len - 1, &self.entries[len - 1]);
        let qr = (0..g).flat_map(|gi| rope.rotated(&q[gi * self.d..][..self.d], qpos)).collect();
        let kr = self.entries.iter().enumerate().flat_map(|(r, e)| rope.rotated(&e.k, pos_of(r, e))).collect();
        (qr, kr)
    }

    /// One step with the attention mass given instead of computed (`mass: [len + 1]`, cache order, the new
    /// token last): append, accumulate, compress. Used to check a device implementation's decisions on the
    /// very same scores. Returns the original position of the removed key, if any.
    pub fn step_with_mass(&mut self, k: &[T], v: &[T], mass: &[T]) -> Option<usize> {
        assert!(k.len() == self.d && v.len() == self.d && mass.len() == self.entries.len() + 1, "shape mismatch");
        self.entries.push(Entry::new(self.seen, k.to_vec(), v.to_vec()));
        self.seen += 1;
        for (e, &a) in self.entries.iter_mut().zip(mass) {
            e.score = e.score + a;
            e.count = e.count + T::one();
        }
        self.compress(mass)
    }

    /// Appends an entry as it is (no attention, no accumulation): for driving a rule with fixed scores.
    pub fn push_entry(&mut self, e: Entry<T>) {
        self.seen = self.seen.max(e.pos + 1);
        self.entries.push(e);
    }

    /// Step 4: if over budget, apply the policy's rule once to the region. `current` is this step's
    /// group-mean attention per entry (used by TOVA only). Returns the original position of the removed key.
    pub fn compress(&mut self, current: &[T]) -> Option<usize> {
        let cap = self.capacity();
        if self.entries.len() <= cap {
            return None;
        }
        let Layout { sinks, middle, recent } = self.cfg.layout;
        let end = self.entries.len() - recent;
        let region = &mut self.entries[sinks..end];
        debug_assert_eq!(region.len(), middle + 1);
        let victim = match self.cfg.policy {
            Policy::Full => unreachable!("Full never exceeds its capacity"),
            Policy::StreamingLlm => 0,
            Policy::H2o => baselines::h2o_victim(region),
            Policy::Tova => baselines::tova_victim(&current[sinks..end]),
            Policy::TreeKv { select_left } => {
                let r = treekv::victim(region, self.pointer, select_left);
                self.pointer = treekv::advance(self.pointer, middle);
                r
            }
            Policy::WeightedKv => weightedkv::merge_victim(region),
        };
        Some(self.entries.remove(sinks + victim).pos)
    }
}

/// One layer of `Hkv` independent [`PolicyCache`]s, driven with whole-layer tensors.
#[derive(Clone, Debug)]
pub struct LayerPolicy<T> {
    /// One cache per KV head.
    pub heads: Vec<PolicyCache<T>>,
    hq: usize,
    d: usize,
}

impl<T: Real> LayerPolicy<T> {
    /// `hkv` empty caches; `hq` query heads (`hq % hkv == 0`).
    pub fn new(cfg: PolicyConfig, hq: usize, hkv: usize, d: usize) -> Self {
        assert!(hkv > 0 && hq.is_multiple_of(hkv), "GQA ratio must be integral");
        LayerPolicy { heads: (0..hkv).map(|_| PolicyCache::new(cfg, d)).collect(), hq, d }
    }
    /// One step: `q: [Hq, D]`, `k, v: [Hkv, D]` → `o: [Hq, D]`.
    pub fn step(&mut self, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        let (d, g) = (self.d, self.hq / self.heads.len());
        let mut o = Vec::with_capacity(self.hq * d);
        for (h, cache) in self.heads.iter_mut().enumerate() {
            let out = cache.step(&q[h * g * d..][..g * d], &k[h * d..][..d], &v[h * d..][..d]);
            o.extend(out.o);
        }
        o
    }
}
