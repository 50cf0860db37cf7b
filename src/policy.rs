//! Fixed-budget KV caches updated on the device: Full, StreamingLLM, H2O, TOVA, TreeKV (and its select-left
//! ablation) and WeightedKV, one layer, batched over sequences and KV heads.
//!
//! The frame and the rules are those of `kvsqueeze-reference` (`policy.rs`): per (sequence, KV head) a
//! logical cache `[sinks | middle | recent]` of capacity `c`; each decode step appends the new token,
//! attends (decode attention over every valid slot, writing the per-slot mass averaged over the GQA group),
//! accumulates `S += mass`, `C += 1`, and, when `len > c`, removes one entry of the region by the policy's
//! rule. On the device (kernels in `kvsqueeze_kernels::policy`): `c + 1` physical slots whose K/V rows never
//! move, a rank → slot `order` array, a slot → rank array, `S`, `C` and the original positions. A step is
//! two launches plus decode attention's one to three; lengths, the step and TreeKV's pointer are launch
//! scalars (all sequences step together); nothing is read back.
//!
//! Positions: with [`PolicyCacheConfig::with_rope`], keys are stored pre-RoPE and rotated inside decode
//! attention by their cache rank (the slot → rank array is passed as per-head positions), the query by the
//! newest rank — the StreamingLLM/TreeKV position reassignment. In-kernel RoPE is costly (+321% at B=8, L=32k
//! on an H200: one sin/cos pair per key and dim pair).

use crate::attention::{decode_attention, DecodeConfig};
use crate::tensor::{with_float_type, DType, DeviceTensor};
use crate::Error;
use cubecl::client::Client;
use cubecl::prelude::*;
use kvsqueeze_kernels::policy::{policy_append, policy_install, policy_step, snapkv_scores, snapkv_topk, treekv_block_scan, treekv_block_scores, Rule, FREE};
pub use kvsqueeze_reference::baselines::Pool;
pub use kvsqueeze_reference::policy::{Layout, Policy};

/// The common interface of the compressed caches (one layer).
pub trait CompressedKvCache {
    /// One decode step: `q: [B, 1, Hq, D]`, `k, v: [B, Hkv, D]` (this token's) → `o: [B, 1, Hq, D]`.
    fn step(&mut self, q: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor) -> Result<DeviceTensor, Error>;
    /// Entries per (sequence, KV head) now.
    fn len(&self) -> usize;
    /// Whether the cache holds no token yet.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The budget `c`.
    fn capacity(&self) -> usize;
    /// Bytes the device holds for this cache (K, V, and the per-slot state).
    fn physical_bytes(&self) -> usize;
    /// The original positions kept, `[B][Hkv][len]` in cache order (reads back from the device).
    fn kept_positions(&self) -> Result<Vec<Vec<Vec<usize>>>, Error>;
}

/// The layout the CLI's `compare` and `eval` give an evicting policy at budget `c`: 4 sinks (at most `c/4`),
/// the most recent `c/2`, the rest the policy's region.
pub fn budget_layout(c: usize) -> Layout {
    let sinks = 4.min(c / 4);
    Layout { sinks, middle: c - sinks - c / 2, recent: c / 2 }
}

/// Shape and policy of a [`PolicyCache`].
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct PolicyCacheConfig {
    /// The policy.
    pub policy: Policy,
    /// Segment sizes; for [`Policy::Full`] the capacity is the most tokens it may hold.
    pub layout: Layout,
    /// Sequences.
    pub batch: usize,
    /// Query heads.
    pub hq: usize,
    /// KV heads.
    pub hkv: usize,
    /// Head dim.
    pub d: usize,
    /// Storage dtype of K/V.
    pub dtype: DType,
    /// RoPE base: keys are stored pre-RoPE and rotated inside attention by their cache rank, the query by the
    /// newest rank (StreamingLLM/TreeKV position reassignment); `None`: no rotation.
    pub rope: Option<f64>,
    /// Refuse a step or prefill whose inputs hold NaN/±∞ ([`Error::NonFinite`], the cache unchanged) instead of
    /// letting them into the cache and the eviction decisions ([`crate::finite`]). Off by default.
    pub check_finite: bool,
}

impl PolicyCacheConfig {
    /// A configuration (no RoPE).
    pub fn new(policy: Policy, layout: Layout, batch: usize, hq: usize, hkv: usize, d: usize, dtype: DType) -> Self {
        PolicyCacheConfig { policy, layout, batch, hq, hkv, d, dtype, rope: None, check_finite: false }
    }
    /// Turns the non-finite check of every input on or off.
    pub fn with_check_finite(mut self, on: bool) -> Self {
        self.check_finite = on;
        self
    }
    /// Rotates keys by cache rank with this base.
    pub fn with_rope(mut self, base: f64) -> Self {
        self.rope = Some(base);
        self
    }
}

/// A fixed-budget cache on the device (see the module docs).
pub struct PolicyCache {
    client: Client,
    cfg: PolicyCacheConfig,
    /// `[B, Hkv, c+1, D]`.
    k: DeviceTensor,
    v: DeviceTensor,
    /// `[B, Hkv, c+1]` each; `order` is double-buffered (`order[cur]` is current).
    order: [DeviceTensor; 2],
    cur: usize,
    rank: DeviceTensor,
    score: DeviceTensor,
    count: DeviceTensor,
    pos: DeviceTensor,
    /// `[B, Hkv]`: the slot the next token goes to.
    free: DeviceTensor,
    /// The last step's mass `[B, Hkv, 1, c+1]`.
    mass: Option<DeviceTensor>,
    /// Tokens streamed so far (all sequences step together).
    seen: usize,
    /// Entries held per (sequence, KV head).
    filled: usize,
    /// Evictions so far (TreeKV's pointer).
    evictions: usize,
    /// Units of the policy step's cube (one cube per head; its loops over the `c + 1` slots are latency-bound, so
    /// as many units as the device allows, up to the next power of two of `c + 1`).
    step_threads: usize,
}

fn rule(p: Policy) -> Rule {
    match p {
        Policy::Full => Rule::Full,
        Policy::StreamingLlm => Rule::StreamingLlm,
        Policy::H2o => Rule::H2o,
        Policy::Tova => Rule::Tova,
        Policy::TreeKv { select_left } => Rule::TreeKv { select_left },
        Policy::WeightedKv => Rule::WeightedKv,
    }
}

fn u32_tensor(client: &Client, data: &[u32], shape: &[usize]) -> Result<DeviceTensor, Error> {
    DeviceTensor::from_host(client, data, shape)
}

const THREADS: usize = 128;

/// The policy step's cube size: a power of two from 32 up, at most 1024 and the device's limit, and no larger than
/// the next power of two of `cap1` slots.
fn step_threads(client: &Client, cap1: usize) -> usize {
    let max = (client.properties().hardware.max_units_per_cube as usize).min(1024);
    let mut t = 32;
    while t * 2 <= max && t < cap1.next_power_of_two() {
        t *= 2;
    }
    t
}

impl PolicyCache {
    /// An empty cache. Errors on a layout the policy cannot run with, a GQA ratio that is not integral, an
    /// unsupported head dim or dtype.
    pub fn new(client: &Client, cfg: PolicyCacheConfig) -> Result<Self, Error> {
        let PolicyCacheConfig { policy, layout, batch, hq, hkv, d, dtype, rope, .. } = cfg;
        if rope.is_some_and(|b| !b.is_finite() || b <= 1.0) {
            return Err(Error::Config("RoPE base must be finite and > 1"));
        }
        let Some(cap) = layout.checked_capacity() else {
            return Err(Error::Config("the layout's sinks + middle + recent overflow"));
        };
        if cap == 0 {
            return Err(Error::Config("capacity must be at least 1"));
        }
        // Slots, ranks and positions are u32 on the device, and FREE (u32::MAX) marks an empty slot.
        if cap >= (u32::MAX - 1) as usize {
            return Err(Error::Config("capacity must be below 2^32 − 1 (u32 slots)"));
        }
        if matches!(policy, Policy::TreeKv { .. } | Policy::WeightedKv) && layout.middle == 0 {
            return Err(Error::Config("TreeKV and WeightedKV need a middle region of at least 1"));
        }
        if batch == 0 || hkv == 0 || hq == 0 || hq % hkv != 0 {
            return Err(Error::GqaRatio { hq, hkv });
        }
        if d == 0 || d % 8 != 0 || d > 256 || d > client.properties().hardware.max_units_per_cube as usize {
            return Err(Error::UnsupportedHeadDim { d });
        }
        if !crate::attention::dtype_supported(client, dtype) {
            return Err(Error::DtypeUnsupported { dtype, device: crate::attention::device_name(client) });
        }
        let cap1 = cap + 1;
        let heads = batch * hkv;
        let zeros = |shape: &[usize], dtype: DType| DeviceTensor::filled(client, shape, dtype, 0);
        // Every size is checked against the device (and for overflow) before the first allocation, so an
        // impossible budget is a typed refusal rather than an allocation failure later.
        let kv_shape = [batch, hkv, cap1, d];
        crate::tensor::checked_size(client, "k", &kv_shape, dtype)?;
        let slot_elems = heads.checked_mul(cap1).ok_or(Error::DeviceLimit("slot arrays overflow the address range".into()))?;
        let rank = u32_tensor(client, &vec![FREE; slot_elems], &[batch, hkv, cap1])?;
        let cache = PolicyCache {
            client: client.clone(),
            cfg,
            k: zeros(&kv_shape, dtype)?,
            v: zeros(&kv_shape, dtype)?,
            order: [zeros(&[batch, hkv, cap1], DType::U32)?, zeros(&[batch, hkv, cap1], DType::U32)?],
            cur: 0,
            rank,
            score: zeros(&[batch, hkv, cap1], DType::F32)?,
            count: zeros(&[batch, hkv, cap1], DType::F32)?,
            pos: zeros(&[batch, hkv, cap1], DType::U32)?,
            free: zeros(&[batch, hkv], DType::U32)?,
            mass: None,
            seen: 0,
            filled: 0,
            evictions: 0,
            step_threads: step_threads(client, cap1),
        };
        crate::tensor::check_written(client, &[&cache.k, &cache.v, &cache.score])?;
        Ok(cache)
    }

    /// The configuration.
    pub fn config(&self) -> &PolicyCacheConfig {
        &self.cfg
    }

    /// The last step's per-slot mass `[B, Hkv, 1, c+1]`, in slot order.
    pub fn last_mass(&self) -> Option<&DeviceTensor> {
        self.mass.as_ref()
    }

    /// Reads back `(order, rank, score, count, pos)` (each `[B, Hkv, c+1]`), for tests and tools.
    pub fn slots(&self) -> Result<[Vec<f64>; 5], Error> {
        let c = &self.client;
        Ok([self.order[self.cur].to_host_f64(c)?, self.rank.to_host_f64(c)?, self.score.to_host_f64(c)?, self.count.to_host_f64(c)?, self.pos.to_host_f64(c)?])
    }

    /// Reads back the values `[B, Hkv, c+1, D]` (slot order).
    pub fn values(&self) -> Result<Vec<f64>, Error> {
        self.v.to_host_f64(&self.client)
    }

    /// TreeKV's block-level prefill on the device (spec §2.4; reference `treekv::prefill_blocks`) into an empty
    /// TreeKV cache: the prompt `k, v: [B, Hkv, L, D]` (every sequence `L` tokens; pre-RoPE when the cache has
    /// RoPE) is cut into blocks of `block` tokens from the start; the last (possibly partial) block is the
    /// observation window, whose queries `q_obs: [B, w, Hq, D]` (`w = L − block·⌊(L−1)/block⌋`) score every other
    /// block by the mean over its tokens of the window-summed, group-averaged attention (RoPE at true positions when
    /// the cache has RoPE); the cyclic pair scan keeps `⌊c/block⌋ − 1` of them with these static scores, then the
    /// window. Kept tokens enter in position order with `S = C = 0`; decode continues with [`CompressedKvCache::step`].
    /// Returns the block scores `[B, Hkv, nb − 1]` f32 (`None` when every block fits and all `L` tokens are kept).
    /// Cost: decode attention of the `w` window rows over `L`, a parallel block score, and a sequential scan per
    /// head of `O(nb·c/block)` steps.
    pub fn prefill_treekv(&mut self, q_obs: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor, block: usize) -> Result<Option<DeviceTensor>, Error> {
        let PolicyCacheConfig { policy, layout, batch, hq, hkv, d, .. } = self.cfg;
        let Policy::TreeKv { select_left } = policy else {
            return Err(Error::Config("prefill_treekv needs a TreeKV cache"));
        };
        let l = self.check_prompt(k, v)?;
        let cap = layout.capacity();
        if block == 0 || cap / block == 0 {
            return Err(Error::Config("the block must be at least 1 and at most the budget"));
        }
        let nb = l.div_ceil(block);
        let w = l - block * (nb - 1);
        self.check("q_obs", q_obs, vec![batch, w, hq, d])?;
        let keep = cap / block;
        let c = self.client.clone();
        let n_kept = if nb <= keep { l } else { (keep - 1) * block + w };
        let nb1 = nb - 1;
        let grid = CubeCount::Static(hkv as u32, batch as u32, 1);
        let (kept, scores) = if nb <= keep {
            (self.keep_all(l)?, None)
        } else {
            let mass = self.window_mass(q_obs, k, w, l)?;
            let kept = DeviceTensor::filled(&c, &[batch, hkv, cap], DType::U32, 0)?;
            let list = DeviceTensor::filled(&c, &[batch, hkv, keep], DType::U32, 0)?;
            let sc = DeviceTensor::filled(&c, &[batch, hkv, nb1], DType::F32, 0)?;
            // SAFETY: `mass` is `[B, Hkv, w, L]`, scores `[B, Hkv, nb−1]`, kept `[B, Hkv, c]` with `n_kept ≤ c`.
            unsafe {
                let b = |t: &DeviceTensor| BufferArg::from_raw_parts(t.handle.clone(), t.buffer_len.max(1));
                treekv_block_scores::launch_unchecked(&c, CubeCount::Static(nb1.div_ceil(THREADS) as u32, hkv as u32, batch as u32), CubeDim::new_1d(THREADS as u32), b(&mass), b(&sc), hkv, w, l, block, nb1, THREADS);
                treekv_block_scan::launch_unchecked(&c, grid.clone(), CubeDim::new_1d(1), b(&sc), b(&list), b(&kept), hkv, l, block, nb1, keep, cap, select_left);
            }
            (kept, Some(sc))
        };
        self.install(k, v, &kept, n_kept, l)?;
        Ok(scores)
    }

    /// StreamingLLM's prompt rule on the device into an empty StreamingLLM or Full cache: the prompt `k, v: [B, Hkv,
    /// L, D]` (pre-RoPE when the cache has RoPE) keeps its first `sinks` and last `c − sinks` tokens (all of it when
    /// `L ≤ c`), in position order with `S = C = 0` — the entries StreamingLLM would hold after streaming the prompt.
    /// A Full cache refuses a prompt longer than its capacity. Cost: one gather.
    pub fn prefill_recent(&mut self, k: &DeviceTensor, v: &DeviceTensor) -> Result<(), Error> {
        let PolicyCacheConfig { policy, layout, batch, hkv, .. } = self.cfg;
        if !matches!(policy, Policy::StreamingLlm | Policy::Full) {
            return Err(Error::Config("prefill_recent needs a StreamingLLM or Full cache"));
        }
        let l = self.check_prompt(k, v)?;
        let cap = layout.capacity();
        if l <= cap {
            let kept = self.keep_all(l)?;
            self.install(k, v, &kept, l, l)?;
            return Ok(());
        }
        if policy == Policy::Full {
            return Err(Error::LengthBeyondCapacity { batch: 0, len: l, capacity: cap });
        }
        let one: Vec<u32> = (0..layout.sinks).chain(l - (cap - layout.sinks)..l).map(|j| j as u32).collect();
        let kept = u32_tensor(&self.client, &one.repeat(batch * hkv), &[batch, hkv, cap])?;
        self.install(k, v, &kept, cap, l)?;
        Ok(())
    }

    /// SnapKV-style prefill on the device (spec §5.3; reference `baselines::snapkv_select`) into an empty
    /// evicting cache (StreamingLLM, H2O, TOVA, TreeKV, WeightedKV): the window queries `q_win: [B, w, Hq, D]` (the
    /// last `w` prompt tokens) score the `L − w` earlier tokens (window-summed, group-averaged attention, RoPE at
    /// true positions when the cache has RoPE), pooled over `kernel` (odd) neighbours; the `c − w` best (ties: the
    /// earlier) and the window are kept, in position order, with `S = C = 0`. A prompt of at most `c` tokens is
    /// kept whole. Returns the pooled scores `[B, Hkv, L − w]` (`None` when everything is kept). Cost: decode
    /// attention of the `w` rows over `L`, a parallel pooling, a 32-pass radix select per head.
    pub fn prefill_snapkv(&mut self, q_win: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor, kernel: usize, pool: Pool) -> Result<Option<DeviceTensor>, Error> {
        let PolicyCacheConfig { policy, layout, batch, hq, hkv, d, .. } = self.cfg;
        if policy == Policy::Full {
            return Err(Error::Config("SnapKV prefill needs an evicting policy"));
        }
        let l = self.check_prompt(k, v)?;
        let w = q_win.shape.get(1).copied().unwrap_or(0);
        self.check("q_win", q_win, vec![batch, w, hq, d])?;
        let cap = layout.capacity();
        if w == 0 || w > l || w > cap {
            return Err(Error::Config("the observation window must hold 1..=min(L, budget) tokens"));
        }
        if kernel == 0 || kernel % 2 == 0 {
            return Err(Error::Config("the pooling kernel must be odd"));
        }
        let c = self.client.clone();
        let grid = CubeCount::Static(hkv as u32, batch as u32, 1);
        let (n_kept, kept, pooled) = if l <= cap {
            (l, self.keep_all(l)?, None)
        } else {
            let n = l - w;
            let mass = self.window_mass(q_win, k, w, l)?;
            let pooled = DeviceTensor::filled(&c, &[batch, hkv, n], DType::F32, 0)?;
            let kept = DeviceTensor::filled(&c, &[batch, hkv, cap], DType::U32, 0)?;
            // SAFETY: `mass` is `[B, Hkv, w, L]`, `pooled` `[B, Hkv, L − w]`, `kept` `[B, Hkv, c]`, `c − w < L − w`.
            unsafe {
                let b = |t: &DeviceTensor| BufferArg::from_raw_parts(t.handle.clone(), t.buffer_len.max(1));
                snapkv_scores::launch_unchecked(&c, CubeCount::Static(n.div_ceil(THREADS) as u32, hkv as u32, batch as u32), CubeDim::new_1d(THREADS as u32), b(&mass), b(&pooled), hkv, w, l, n, kernel, pool == Pool::Max, THREADS);
                snapkv_topk::launch_unchecked(&c, grid.clone(), CubeDim::new_1d(THREADS as u32), b(&pooled), b(&kept), hkv, l, n, cap - w, cap, THREADS);
            }
            (cap, kept, Some(pooled))
        };
        self.install(k, v, &kept, n_kept, l)?;
        Ok(pooled)
    }

    /// Validates a prompt for a prefill into this (empty) cache: `k, v: [B, Hkv, L, D]`; returns `L`.
    fn check_prompt(&self, k: &DeviceTensor, v: &DeviceTensor) -> Result<usize, Error> {
        let PolicyCacheConfig { batch, hkv, d, .. } = self.cfg;
        if self.seen > 0 {
            return Err(Error::Config("prefill needs an empty cache"));
        }
        let l = k.shape.get(2).copied().unwrap_or(0);
        if l == 0 {
            return Err(Error::ZeroLength { batch: 0 });
        }
        self.check("k", k, vec![batch, hkv, l, d])?;
        self.check("v", v, vec![batch, hkv, l, d])?;
        if l >= 1 << 31 {
            return Err(Error::Config("prompt too long for u32 positions"));
        }
        if self.cfg.check_finite {
            crate::finite::check_finite(&self.client, "k", k, None)?;
            crate::finite::check_finite(&self.client, "v", v, None)?;
        }
        Ok(l)
    }

    /// The kept list `[B, Hkv, c]` of a prompt of `l ≤ c` tokens: every position, then [`FREE`].
    fn keep_all(&self, l: usize) -> Result<DeviceTensor, Error> {
        let PolicyCacheConfig { layout, batch, hkv, .. } = self.cfg;
        let cap = layout.capacity();
        let all: Vec<u32> = (0..batch * hkv).flat_map(|_| (0..cap).map(|j| if j < l { j as u32 } else { FREE })).collect();
        u32_tensor(&self.client, &all, &[batch, hkv, cap])
    }

    /// Decode attention's group-mean probabilities `[B, Hkv, w, L]` of the last `w` prompt queries over the prompt
    /// (causal, RoPE at true positions when the cache has RoPE).
    fn window_mass(&self, q: &DeviceTensor, k: &DeviceTensor, w: usize, l: usize) -> Result<DeviceTensor, Error> {
        let c = &self.client;
        let batch = self.cfg.batch;
        let mut acfg = DecodeConfig::new().with_mass(true);
        if let Some(base) = self.cfg.rope {
            let q_pos = u32_tensor(c, &(0..batch * w).map(|i| (l - w + i % w) as u32).collect::<Vec<_>>(), &[batch, w])?;
            let k_pos = u32_tensor(c, &(0..batch * l).map(|i| (i % l) as u32).collect::<Vec<_>>(), &[batch, l])?;
            acfg = acfg.with_rope(crate::rope::RopeConfig { base, q_pos, k_pos });
        }
        acfg.check_finite = self.cfg.check_finite;
        let out = decode_attention(c, q, k, k, &vec![l as u32; batch], &acfg)?;
        out.mass.ok_or(Error::Config("decode attention returned no mass"))
    }

    /// Installs the first `n` kept positions of `kept: [B, Hkv, c]` (rows of `k, v: [B, Hkv, L, D]`) into the
    /// empty cache.
    fn install(&mut self, k: &DeviceTensor, v: &DeviceTensor, kept: &DeviceTensor, n: usize, l: usize) -> Result<(), Error> {
        let PolicyCacheConfig { layout, batch, hkv, d, .. } = self.cfg;
        let cap = layout.capacity();
        let c = &self.client;
        // SAFETY: `kept` holds `n ≤ c` positions below `L` per head; slots below `n`.
        unsafe {
            let b = |t: &DeviceTensor| BufferArg::from_raw_parts(t.handle.clone(), t.buffer_len.max(1));
            with_float_type!(self.cfg.dtype, E => policy_install::launch_unchecked::<E>(c, CubeCount::Static(hkv as u32, batch as u32, 1), CubeDim::new_1d(d as u32), b(k), b(v), b(kept), b(&self.k), b(&self.v), b(&self.order[self.cur]), b(&self.rank), b(&self.pos), b(&self.free), n, l, cap, hkv, cap + 1, d));
        }
        crate::tensor::check_written(c, &[&self.k, &self.v, &self.order[self.cur]])?;
        self.filled = n;
        self.seen = l;
        Ok(())
    }

    fn check(&self, name: &'static str, t: &DeviceTensor, shape: Vec<usize>) -> Result<(), Error> {
        if t.shape != shape {
            return Err(Error::ShapeMismatch { tensor: name, expected: shape, got: t.shape.clone() });
        }
        if t.dtype != self.cfg.dtype {
            return Err(Error::DtypeMismatch { tensor: name, got: t.dtype, expected: self.cfg.dtype });
        }
        t.check_in_buffer(name)?;
        // The policy kernels index their inputs from the buffer start: a view with an offset is refused, not
        // misread.
        if !t.is_contiguous() || t.offset != 0 {
            return Err(Error::Layout { tensor: name, reason: "must be contiguous from the buffer start (offset 0)" });
        }
        Ok(())
    }
}

impl CompressedKvCache for PolicyCache {
    fn step(&mut self, q: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor) -> Result<DeviceTensor, Error> {
        let PolicyCacheConfig { policy, layout, batch, hq, hkv, d, .. } = self.cfg;
        self.check("q", q, vec![batch, 1, hq, d])?;
        self.check("k", k, vec![batch, hkv, d])?;
        self.check("v", v, vec![batch, hkv, d])?;
        let cap = layout.capacity();
        let cap1 = cap + 1;
        if policy == Policy::Full && self.filled >= cap {
            return Err(Error::LengthBeyondCapacity { batch: 0, len: self.filled + 1, capacity: cap });
        }
        if self.seen >= u32::MAX as usize {
            return Err(Error::Config("the stream's positions reached the u32 limit"));
        }
        if self.cfg.check_finite {
            for (name, t) in [("q", q), ("k", k), ("v", v)] {
                crate::finite::check_finite(&self.client, name, t, None)?;
            }
        }
        let c = &self.client;
        let before = self.filled;
        let grid = CubeCount::Static(hkv as u32, batch as u32, 1);
        // SAFETY: every buffer is sized by `new` from the validated configuration.
        unsafe {
            let b = |t: &DeviceTensor| BufferArg::from_raw_parts(t.handle.clone(), t.buffer_len);
            with_float_type!(self.cfg.dtype, E => policy_append::launch_unchecked::<E>(c, grid.clone(), CubeDim::new_1d(d as u32), b(k), b(v), b(&self.k), b(&self.v), b(&self.order[self.cur]), b(&self.rank), b(&self.score), b(&self.count), b(&self.pos), b(&self.free), before as u32, self.seen as u32, hkv, cap1, d))
        }
        let after = before + 1;
        let mut acfg = DecodeConfig::new().with_mass(true);
        if let Some(base) = self.cfg.rope {
            // Cache-rank positions: the slot → rank array is exactly `[B, Hkv, c+1]` positions; the query sits at
            // the newest rank, `len` before the append.
            let q_pos = u32_tensor(c, &vec![before as u32; batch], &[batch, 1])?;
            acfg = acfg.with_rope(crate::rope::RopeConfig { base, q_pos, k_pos: self.rank.clone() });
        }
        let out = decode_attention(c, q, &self.k, &self.v, &vec![after as u32; batch], &acfg)?;
        let mass = out.mass.ok_or(Error::Config("decode attention returned no mass"))?;
        // TreeKV's pointer for this step's eviction: evictions so far, modulo the tree region.
        let ptr = if layout.middle > 0 { self.evictions % layout.middle } else { 0 };
        // SAFETY: as above; `mass` is decode attention's `[B, Hkv, 1, c+1]` output.
        unsafe {
            let b = |t: &DeviceTensor| BufferArg::from_raw_parts(t.handle.clone(), t.buffer_len);
            with_float_type!(self.cfg.dtype, E => policy_step::launch_unchecked::<E>(c, grid.clone(), CubeDim::new_1d(self.step_threads as u32), b(&mass), b(&self.v), b(&self.order[self.cur]), b(&self.order[1 - self.cur]), b(&self.rank), b(&self.score), b(&self.count), b(&self.free), after as u32, ptr as u32, hkv, cap1, d, layout.sinks, layout.middle, layout.recent, rule(policy), self.step_threads))
        }
        crate::tensor::check_written(c, &[&self.order[1 - self.cur], &self.score])?;
        if policy != Policy::Full && after > cap {
            self.cur = 1 - self.cur; // this step evicted: the shifted order is in the other buffer
            self.evictions += 1;
        }
        self.filled = after.min(cap);
        self.mass = Some(mass);
        self.seen += 1;
        Ok(out.o)
    }

    fn len(&self) -> usize {
        self.filled
    }

    fn capacity(&self) -> usize {
        self.cfg.layout.capacity()
    }

    fn physical_bytes(&self) -> usize {
        [&self.k, &self.v, &self.order[0], &self.order[1], &self.rank, &self.score, &self.count, &self.pos, &self.free]
            .iter()
            .map(|t| t.buffer_len * t.dtype.size())
            .sum()
    }

    fn kept_positions(&self) -> Result<Vec<Vec<Vec<usize>>>, Error> {
        let PolicyCacheConfig { batch, hkv, layout, .. } = self.cfg;
        let cap1 = layout.capacity() + 1;
        let [order, _, _, _, pos] = self.slots()?;
        let len = self.len();
        Ok((0..batch)
            .map(|b| (0..hkv).map(|h| (0..len).map(|q| pos[(b * hkv + h) * cap1 + order[(b * hkv + h) * cap1 + q] as usize] as usize).collect()).collect())
            .collect())
    }
}

