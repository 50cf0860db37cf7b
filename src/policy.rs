//! Fixed-budget KV caches updated on the device: Full, StreamingLLM, H2O, TOVA, TreeKV (and its select-left
//! ablation) and WeightedKV, one layer, batched over sequences and KV heads.
//!
//! The frame and the rules are those of `kvsqueeze-reference` (`policy.rs`): per (sequence, KV head) a
//! logical cache `[sinks | middle | recent]` of capacity `c`; each decode step appends the new token,
//! attends (decode attention over every valid slot, writing the per-slot mass averaged over the GQA group),
//! accumulates `S += mass`, `C += 1`, and, when `len > c`, removes one entry of the region by the policy's
//! rule. On the device (kernels in `kvsqueeze_kernels::policy`): `c + 1` physical slots whose K/V rows never
//! move, a rank → slot `order` array, a slot → rank array, `S`, `C` and the original positions.
//!
//! Plan once, step many: [`PolicyCache::new`] allocates every buffer and plans the step's decode attention
//! ([`crate::attention::DecodePlan`]); a step is a shape check plus three to five launches (append, decode
//! attention's one to three, policy step) — no allocation, no upload, no read-back. Each sequence's state
//! (entries held, tokens seen, evictions — TreeKV's pointer —, active flag, order parity) lives on the device and
//! the kernels advance it, so sequences are ragged and independent: [`PolicyCache::admit`] fills one slot (empty,
//! or a prompt by any prefill mode) while the others keep their state, [`PolicyCache::retire`] frees one, and a
//! step advances the active sequences only (a retired slot's output rows are zeros). A host mirror of the
//! lengths answers [`PolicyCache::seq_len`] without a read-back.
//!
//! Views: a query (`q`, `q_obs`, `q_win`) may have any strides with a unit innermost one and any element offset
//! (the query part of a fused QKV buffer); keys and values are contiguous from any element offset; offsets are
//! kernel scalars, never ignored. A step's output is the cache's own buffer, overwritten by the next step.
//!
//! Positions: with [`PolicyCacheConfig::with_rope`], keys are stored pre-RoPE and rotated inside decode
//! attention by their cache rank (the slot → rank array is passed as per-head positions), the query by the
//! newest rank — the StreamingLLM/TreeKV position reassignment. In-kernel RoPE is costly (+321% at B=8, L=32k
//! on an H200: one sin/cos pair per key and dim pair).

use crate::attention::{decode_attention, DecodeConfig, DecodePlan, DecodeShape};
use crate::tensor::{with_float_type, DType, DeviceTensor};
use crate::Error;
use cubecl::client::Client;
use cubecl::prelude::*;
use kvsqueeze_kernels::baselines::{snapkv_scores, snapkv_topk};
use kvsqueeze_kernels::policy::{policy_append, policy_install, policy_retire, policy_step, Rule, FREE, SEQ_FLAGS, SEQ_WORDS};
use kvsqueeze_kernels::treekv::{treekv_block_scan, treekv_block_scores};
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
    /// The buffer every [`CompressedKvCache::step`] returns, when it is one fixed buffer (what a recorded device
    /// graph may read: `BurnModel::step_graphed`); `None` when steps may return different buffers.
    fn step_output(&self) -> Option<&DeviceTensor> {
        None
    }
    /// For a step recorded into a device graph (`BurnModel::step_graphed`): the host checks a step makes before
    /// launching (capacity, position limits), then the parity of the next step — a cache whose steps alternate
    /// between two launch sequences is recorded once per parity. `Err` when this cache's steps cannot be recorded
    /// (the default) or the next step would be refused.
    fn graph_parity(&self) -> Result<usize, Error> {
        Err(Error::Config("this cache's steps cannot be recorded into a device graph"))
    }
    /// Issues the launches of one step at `parity` ([`CompressedKvCache::graph_parity`]) with no host bookkeeping:
    /// called while a device graph records (nothing runs), so no host state may change. `q`, `k`, `v` as for
    /// [`CompressedKvCache::step`].
    fn record_step(&mut self, _q: &DeviceTensor, _k: &DeviceTensor, _v: &DeviceTensor, _parity: usize) -> Result<(), Error> {
        Err(Error::Config("this cache's steps cannot be recorded into a device graph"))
    }
    /// The host bookkeeping of one step replayed from a device graph (after [`CompressedKvCache::graph_parity`]
    /// allowed it): what [`CompressedKvCache::step`] does after its launches.
    fn note_replayed(&mut self) {}
}

/// Every cache's name on the command line and in reports (`compare`, `eval`, `replay`): the policy caches, then
/// FourierAttention (`fourier`, not a [`Policy`]).
pub const CACHE_NAMES: [&str; 8] = ["full", "streaming-llm", "h2o", "tova", "treekv", "treekv-select-left", "weightedkv", "fourier"];

/// A policy cache's name (one of [`CACHE_NAMES`] but `fourier`) → its policy.
pub fn parse_policy(name: &str) -> Option<Policy> {
    Some(match name {
        "full" => Policy::Full,
        "streaming-llm" => Policy::StreamingLlm,
        "h2o" => Policy::H2o,
        "tova" => Policy::Tova,
        "treekv" => Policy::TreeKv { select_left: false },
        "treekv-select-left" => Policy::TreeKv { select_left: true },
        "weightedkv" => Policy::WeightedKv,
        _ => return None,
    })
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
    /// Every u32 state array below is a view of `ints`, the f32 ones of `fl` (the kernels bind two state buffers;
    /// see `kvsqueeze_kernels::policy`).
    ints: DeviceTensor,
    fl: DeviceTensor,
    /// `[2, B, Hkv, c+1]`: rank → slot, double-buffered per sequence (the parity is in `seq`).
    order: DeviceTensor,
    /// `[B, Hkv, c+1]` each.
    rank: DeviceTensor,
    score: DeviceTensor,
    count: DeviceTensor,
    pos: DeviceTensor,
    /// `[B, Hkv]`: the slot the next token goes to.
    free: DeviceTensor,
    /// `[2, B, 4]` u32: per-sequence `(len, seen, evictions, flags)`, double-buffered by step (`cur`).
    seq: DeviceTensor,
    cur: usize,
    /// `[2, B]` u32: this step's attention lengths and query ranks (written by the append).
    att: DeviceTensor,
    /// Views of `att`: lengths `[B]`, query positions `[B, 1]`.
    att_lens: DeviceTensor,
    att_qpos: DeviceTensor,
    /// Decode attention over the `c + 1` slots, planned once (mass on; RoPE by rank when configured).
    plan: DecodePlan,
    /// Host mirror of each sequence's state (`None`: retired), advanced by the same rule as the device's: it answers
    /// `len`, validates admissions and the Full policy's capacity, with no read-back.
    host: Vec<Option<SeqState>>,
    /// Whether a step ran since the last admission (launch failures are checked once per kernel variant).
    stepped: bool,
    /// Units of the policy step's cube (one cube per head; its loops over the `c + 1` slots are latency-bound, so
    /// as many units as the device allows, up to the next power of two of `c + 1`).
    step_threads: usize,
}

/// One sequence's bookkeeping (the host mirror of `seq`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SeqState {
    /// Entries held per KV head.
    len: usize,
    /// Tokens streamed (the next original position).
    seen: usize,
}

/// How [`PolicyCache::admit`] fills a sequence's slot.
#[derive(Clone, Copy, Debug)]
pub enum Admission<'a> {
    /// Empty: the sequence streams from its first token.
    Empty,
    /// StreamingLLM's prompt rule ([`PolicyCache::prefill_recent`]): `k, v: [1, Hkv, L, D]`.
    Recent {
        /// Prompt keys (pre-RoPE when the cache has RoPE).
        k: &'a DeviceTensor,
        /// Prompt values.
        v: &'a DeviceTensor,
    },
    /// SnapKV's selection ([`PolicyCache::prefill_snapkv`]): window queries `q_win: [1, w, Hq, D]`.
    SnapKv {
        /// The last `w` prompt queries.
        q_win: &'a DeviceTensor,
        /// Prompt keys.
        k: &'a DeviceTensor,
        /// Prompt values.
        v: &'a DeviceTensor,
        /// Pooling kernel (odd).
        kernel: usize,
        /// Pooling kind.
        pool: Pool,
    },
    /// TreeKV's block selection ([`PolicyCache::prefill_treekv`]): `q_obs: [1, w, Hq, D]`.
    TreeKv {
        /// The observation window's queries.
        q_obs: &'a DeviceTensor,
        /// Prompt keys.
        k: &'a DeviceTensor,
        /// Prompt values.
        v: &'a DeviceTensor,
        /// Block size.
        block: usize,
    },
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
    let max = crate::tensor::max_units_per_cube(client).min(1024);
    let mut t = 32;
    while t * 2 <= max && t < cap1.next_power_of_two() {
        t *= 2;
    }
    t
}

impl PolicyCache {
    /// An empty cache: every sequence active with no token (each streams from its first token; [`PolicyCache::admit`]
    /// and [`PolicyCache::retire`] change that per sequence). Errors on a layout the policy cannot run with, a GQA
    /// ratio that is not integral, an unsupported head dim or dtype, or buffers the device cannot hold. Allocates
    /// every buffer a step uses and plans its decode attention, so that [`CompressedKvCache::step`] allocates and
    /// uploads nothing.
    pub fn new(client: &Client, cfg: PolicyCacheConfig) -> Result<Self, Error> {
        crate::tensor::check_bindings(client, &["policy_append", "policy_step", "policy_install", "policy_retire", "treekv_block_scores", "treekv_block_scan", "snapkv_scores", "snapkv_topk"])?;
        crate::tensor::check_bindings(client, &crate::attention::KERNELS)?;
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
        if d == 0 || d % 8 != 0 || d > 256 || d > crate::tensor::max_units_per_cube(client) {
            return Err(Error::UnsupportedHeadDim { d });
        }
        if !crate::attention::dtype_supported(client, dtype) {
            return Err(Error::DtypeUnsupported { dtype, device: crate::attention::device_name(client) });
        }
        let cap1 = cap + 1;
        // Every size is checked against the device (and for overflow) before the first allocation, so an
        // impossible budget is a typed refusal rather than an allocation failure later.
        let kv_shape = [batch, hkv, cap1, d];
        crate::tensor::checked_size(client, "the cache's K/V", &kv_shape, dtype)?;
        let zeros = |shape: &[usize], dtype: DType| DeviceTensor::filled(client, shape, dtype, 0);
        let mut shape = DecodeShape::new(batch, 1, hq, hkv, d, cap1, dtype);
        if let Some(base) = rope {
            shape = shape.with_rope(base);
        }
        let plan = DecodePlan::new(client, shape, &DecodeConfig::new().with_mass(true))?;
        // The packed u32 state: order [2, B, Hkv, c+1] | rank, pos [B, Hkv, c+1] | free [B, Hkv] | seq [2, B, 4] |
        // att [2, B]; rank starts FREE, every sequence active and empty (flags = 1 in both halves of `seq`).
        let per = batch * hkv * cap1;
        let (o_rank, o_pos, o_free) = (2 * per, 3 * per, 4 * per);
        let o_seq = o_free + batch * hkv;
        let o_att = o_seq + 2 * batch * SEQ_WORDS;
        let n_ints = o_att + 2 * batch;
        crate::tensor::checked_size(client, "the cache's state", &[n_ints], DType::U32)?;
        let mut init = vec![0u32; n_ints];
        init[o_rank..o_pos].fill(FREE);
        for w in init[o_seq..o_att].chunks_mut(SEQ_WORDS) {
            w[SEQ_FLAGS] = 1;
        }
        let ints = DeviceTensor::from_host(client, &init, &[n_ints])?;
        let fl = zeros(&[2 * per], DType::F32)?;
        let flat = |t: &DeviceTensor, shape: &[usize], offset: usize| t.view(shape, &crate::tensor::contiguous_strides(shape), offset);
        let cache = PolicyCache {
            client: client.clone(),
            cfg,
            k: zeros(&kv_shape, dtype)?,
            v: zeros(&kv_shape, dtype)?,
            order: flat(&ints, &[2, batch, hkv, cap1], 0),
            rank: flat(&ints, &[batch, hkv, cap1], o_rank),
            score: flat(&fl, &[batch, hkv, cap1], 0),
            count: flat(&fl, &[batch, hkv, cap1], per),
            pos: flat(&ints, &[batch, hkv, cap1], o_pos),
            free: flat(&ints, &[batch, hkv], o_free),
            seq: flat(&ints, &[2, batch, SEQ_WORDS], o_seq),
            cur: 0,
            att_lens: flat(&ints, &[batch], o_att),
            att_qpos: flat(&ints, &[batch, 1], o_att + batch),
            att: flat(&ints, &[2 * batch], o_att),
            ints,
            fl,
            plan,
            host: vec![Some(SeqState::default()); batch],
            stepped: false,
            step_threads: step_threads(client, cap1),
        };
        crate::tensor::check_written(client, &[&cache.k, &cache.v, &cache.ints, &cache.fl])?;
        Ok(cache)
    }

    /// The configuration.
    pub fn config(&self) -> &PolicyCacheConfig {
        &self.cfg
    }

    /// The last step's per-slot mass `[B, Hkv, 1, c+1]`, in slot order (overwritten by the next step).
    pub fn last_mass(&self) -> Option<&DeviceTensor> {
        self.stepped.then(|| self.plan.output().mass.as_ref()).flatten()
    }

    /// Entries sequence `b` holds per KV head, or `None` when it is retired (or `b` is beyond the batch).
    pub fn seq_len(&self, b: usize) -> Option<usize> {
        self.host.get(b).copied().flatten().map(|s| s.len)
    }

    /// Reads back `(order, rank, score, count, pos)` (each `[B, Hkv, c+1]`; `order` is each sequence's current
    /// half), for tests and tools.
    pub fn slots(&self) -> Result<[Vec<f64>; 5], Error> {
        let c = &self.client;
        Ok([self.current_order()?, self.rank.to_host_f64(c)?, self.score.to_host_f64(c)?, self.count.to_host_f64(c)?, self.pos.to_host_f64(c)?])
    }

    /// Each sequence's current rank → slot order `[B, Hkv, c+1]` (reads back `order` and `seq`).
    fn current_order(&self) -> Result<Vec<f64>, Error> {
        let PolicyCacheConfig { batch, hkv, layout, .. } = self.cfg;
        let cap1 = layout.capacity() + 1;
        let (order, seq) = (self.order.to_host_f64(&self.client)?, self.seq.to_host_f64(&self.client)?);
        let per = batch * hkv * cap1;
        Ok((0..per)
            .map(|i| {
                let b = i / (hkv * cap1);
                let parity = (seq[(self.cur * batch + b) * SEQ_WORDS + SEQ_FLAGS] as u32 >> 1) & 1;
                order[parity as usize * per + i]
            })
            .collect())
    }

    /// Reads back the values `[B, Hkv, c+1, D]` (slot order).
    pub fn values(&self) -> Result<Vec<f64>, Error> {
        self.v.to_host_f64(&self.client)
    }

    /// Admits a new sequence into slot `b` — retired, or never stepped — while every other sequence keeps its
    /// state (continuous batching): empty, or prefilled from a one-sequence prompt by any prefill mode (inputs
    /// with batch 1; see [`Admission`]). Refused (typed, nothing launched) when `b` is beyond the batch or holds
    /// a live sequence; an invalid prompt leaves the slot as it was.
    pub fn admit(&mut self, b: usize, how: Admission<'_>) -> Result<(), Error> {
        match self.host.get(b) {
            None => return Err(Error::Config("sequence index beyond the batch")),
            Some(Some(s)) if s.seen > 0 => return Err(Error::Config("the slot holds a live sequence: retire it first")),
            _ => {}
        }
        match how {
            Admission::Empty => {
                // No token is copied: a one-element stand-in for the prompt (never read with n = 0).
                let kept = self.keep_all(0, 1)?;
                let (no_k, no_v) = (DeviceTensor::empty(&self.client, &[1], self.cfg.dtype)?, DeviceTensor::empty(&self.client, &[1], self.cfg.dtype)?);
                self.install(&no_k, &no_v, &kept, 0, 0, b, 1)
            }
            Admission::Recent { k, v } => self.prefill_recent_at(b, 1, k, v),
            Admission::SnapKv { q_win, k, v, kernel, pool } => self.prefill_snapkv_at(b, 1, q_win, k, v, kernel, pool).map(drop),
            Admission::TreeKv { q_obs, k, v, block } => self.prefill_treekv_at(b, 1, q_obs, k, v, block).map(drop),
        }
    }

    /// Retires sequence `b`: it stops stepping (its rows of a step's output are zeros) and its slot can admit a new
    /// sequence. One small launch, no read-back.
    pub fn retire(&mut self, b: usize) -> Result<(), Error> {
        if b >= self.cfg.batch {
            return Err(Error::Config("sequence index beyond the batch"));
        }
        let base = self.seq.offset + self.cur * self.cfg.batch * SEQ_WORDS;
        crate::tensor::count_launches(1);
        // SAFETY: `b < B` indexes one row of `seq`'s current half.
        unsafe {
            policy_retire::launch_unchecked(&self.client, CubeCount::Static(1, 1, 1), CubeDim::new_1d(1), BufferArg::from_raw_parts(self.ints.handle.clone(), self.ints.buffer_len), b, base);
        }
        self.host[b] = None;
        Ok(())
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
    /// head of `O(nb·c/block)` steps. One sequence: [`PolicyCache::admit`] with [`Admission::TreeKv`].
    pub fn prefill_treekv(&mut self, q_obs: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor, block: usize) -> Result<Option<DeviceTensor>, Error> {
        self.check_all_empty()?;
        self.prefill_treekv_at(0, self.cfg.batch, q_obs, k, v, block)
    }

    /// StreamingLLM's prompt rule on the device into an empty StreamingLLM or Full cache: the prompt `k, v: [B, Hkv,
    /// L, D]` (pre-RoPE when the cache has RoPE) keeps its first `sinks` and last `c − sinks` tokens (all of it when
    /// `L ≤ c`), in position order with `S = C = 0` — the entries StreamingLLM would hold after streaming the prompt.
    /// A Full cache refuses a prompt longer than its capacity. Cost: one gather. One sequence:
    /// [`PolicyCache::admit`] with [`Admission::Recent`].
    pub fn prefill_recent(&mut self, k: &DeviceTensor, v: &DeviceTensor) -> Result<(), Error> {
        self.check_all_empty()?;
        self.prefill_recent_at(0, self.cfg.batch, k, v)
    }

    /// SnapKV-style prefill on the device (spec §5.3; reference `baselines::snapkv_select`) into an empty
    /// evicting cache (StreamingLLM, H2O, TOVA, TreeKV, WeightedKV): the window queries `q_win: [B, w, Hq, D]` (the
    /// last `w` prompt tokens) score the `L − w` earlier tokens (window-summed, group-averaged attention, RoPE at
    /// true positions when the cache has RoPE), pooled over `kernel` (odd) neighbours; the `c − w` best (ties: the
    /// earlier) and the window are kept, in position order, with `S = C = 0`. A prompt of at most `c` tokens is
    /// kept whole. Returns the pooled scores `[B, Hkv, L − w]` (`None` when everything is kept). Cost: decode
    /// attention of the `w` rows over `L`, a parallel pooling, a 32-pass radix select per head. One sequence:
    /// [`PolicyCache::admit`] with [`Admission::SnapKv`].
    pub fn prefill_snapkv(&mut self, q_win: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor, kernel: usize, pool: Pool) -> Result<Option<DeviceTensor>, Error> {
        self.check_all_empty()?;
        self.prefill_snapkv_at(0, self.cfg.batch, q_win, k, v, kernel, pool)
    }

    /// The batch prefills need every sequence active and empty (a fresh cache).
    fn check_all_empty(&self) -> Result<(), Error> {
        if self.host.iter().any(|s| *s != Some(SeqState::default())) {
            return Err(Error::Config("prefill needs an empty cache (admit a single sequence with `admit`)"));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn prefill_treekv_at(&mut self, b0: usize, nb: usize, q_obs: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor, block: usize) -> Result<Option<DeviceTensor>, Error> {
        let PolicyCacheConfig { policy, layout, hq, hkv, d, .. } = self.cfg;
        let Policy::TreeKv { select_left } = policy else {
            return Err(Error::Config("prefill_treekv needs a TreeKV cache"));
        };
        let l = self.check_prompt(nb, k, v)?;
        let cap = layout.capacity();
        if block == 0 || cap / block == 0 {
            return Err(Error::Config("the block must be at least 1 and at most the budget"));
        }
        let n_blocks = l.div_ceil(block);
        let w = l - block * (n_blocks - 1);
        self.check_query("q_obs", q_obs, vec![nb, w, hq, d])?;
        crate::finite::check_inputs(&self.client, self.cfg.check_finite, &[("q_obs", q_obs)])?;
        let keep = cap / block;
        let c = self.client.clone();
        let n_kept = if n_blocks <= keep { l } else { (keep - 1) * block + w };
        let nb1 = n_blocks - 1;
        let grid = CubeCount::Static(hkv as u32, nb as u32, 1);
        let (kept, scores) = if n_blocks <= keep {
            (self.keep_all(l, nb)?, None)
        } else {
            let mass = self.window_mass(nb, q_obs, k, w, l)?;
            let kept = DeviceTensor::filled(&c, &[nb, hkv, cap], DType::U32, 0)?;
            let list = DeviceTensor::filled(&c, &[nb, hkv, keep], DType::U32, 0)?;
            let sc = DeviceTensor::filled(&c, &[nb, hkv, nb1], DType::F32, 0)?;
            crate::tensor::count_launches(2);
            // SAFETY: `mass` is `[nb, Hkv, w, L]`, scores `[nb, Hkv, n_blocks−1]`, kept `[nb, Hkv, c]` with `n_kept ≤ c`.
            unsafe {
                let b = |t: &DeviceTensor| BufferArg::from_raw_parts(t.handle.clone(), t.buffer_len.max(1));
                treekv_block_scores::launch_unchecked(
                    &c,
                    CubeCount::Static(nb1.div_ceil(THREADS) as u32, hkv as u32, nb as u32),
                    CubeDim::new_1d(THREADS as u32),
                    b(&mass),
                    b(&sc),
                    hkv,
                    w,
                    l,
                    block,
                    nb1,
                    THREADS,
                );
                treekv_block_scan::launch_unchecked(&c, grid.clone(), CubeDim::new_1d(1), b(&sc), b(&list), b(&kept), hkv, l, block, nb1, keep, cap, select_left);
            }
            (kept, Some(sc))
        };
        self.install(k, v, &kept, n_kept, l, b0, nb)?;
        Ok(scores)
    }

    fn prefill_recent_at(&mut self, b0: usize, nb: usize, k: &DeviceTensor, v: &DeviceTensor) -> Result<(), Error> {
        let PolicyCacheConfig { policy, layout, hkv, .. } = self.cfg;
        if !matches!(policy, Policy::StreamingLlm | Policy::Full) {
            return Err(Error::Config("prefill_recent needs a StreamingLLM or Full cache"));
        }
        let l = self.check_prompt(nb, k, v)?;
        let cap = layout.capacity();
        if l <= cap {
            let kept = self.keep_all(l, nb)?;
            return self.install(k, v, &kept, l, l, b0, nb);
        }
        if policy == Policy::Full {
            return Err(Error::LengthBeyondCapacity { batch: b0, len: l, capacity: cap });
        }
        let one: Vec<u32> = (0..layout.sinks).chain(l - (cap - layout.sinks)..l).map(|j| j as u32).collect();
        let kept = u32_tensor(&self.client, &one.repeat(nb * hkv), &[nb, hkv, cap])?;
        self.install(k, v, &kept, cap, l, b0, nb)
    }

    #[allow(clippy::too_many_arguments)]
    fn prefill_snapkv_at(&mut self, b0: usize, nb: usize, q_win: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor, kernel: usize, pool: Pool) -> Result<Option<DeviceTensor>, Error> {
        let PolicyCacheConfig { policy, layout, hq, hkv, d, .. } = self.cfg;
        if policy == Policy::Full {
            return Err(Error::Config("SnapKV prefill needs an evicting policy"));
        }
        let l = self.check_prompt(nb, k, v)?;
        let w = q_win.shape.get(1).copied().unwrap_or(0);
        self.check_query("q_win", q_win, vec![nb, w, hq, d])?;
        let cap = layout.capacity();
        if w == 0 || w > l || w > cap {
            return Err(Error::Config("the observation window must hold 1..=min(L, budget) tokens"));
        }
        if kernel == 0 || kernel % 2 == 0 {
            return Err(Error::Config("the pooling kernel must be odd"));
        }
        crate::finite::check_inputs(&self.client, self.cfg.check_finite, &[("q_win", q_win)])?;
        let c = self.client.clone();
        let grid = CubeCount::Static(hkv as u32, nb as u32, 1);
        let (n_kept, kept, pooled) = if l <= cap {
            (l, self.keep_all(l, nb)?, None)
        } else {
            let n = l - w;
            let mass = self.window_mass(nb, q_win, k, w, l)?;
            let pooled = DeviceTensor::filled(&c, &[nb, hkv, n], DType::F32, 0)?;
            let kept = DeviceTensor::filled(&c, &[nb, hkv, cap], DType::U32, 0)?;
            crate::tensor::count_launches(2);
            // SAFETY: `mass` is `[nb, Hkv, w, L]`, `pooled` `[nb, Hkv, L − w]`, `kept` `[nb, Hkv, c]`, `c − w < L − w`.
            unsafe {
                let b = |t: &DeviceTensor| BufferArg::from_raw_parts(t.handle.clone(), t.buffer_len.max(1));
                snapkv_scores::launch_unchecked(
                    &c,
                    CubeCount::Static(n.div_ceil(THREADS) as u32, hkv as u32, nb as u32),
                    CubeDim::new_1d(THREADS as u32),
                    b(&mass),
                    b(&pooled),
                    hkv,
                    w,
                    l,
                    n,
                    kernel,
                    pool == Pool::Max,
                    THREADS,
                );
                snapkv_topk::launch_unchecked(&c, grid.clone(), CubeDim::new_1d(THREADS as u32), b(&pooled), b(&kept), hkv, l, n, cap - w, cap, THREADS);
            }
            (cap, kept, Some(pooled))
        };
        self.install(k, v, &kept, n_kept, l, b0, nb)?;
        Ok(pooled)
    }

    /// Validates a prompt of `nb` sequences, `k, v: [nb, Hkv, L, D]`; returns `L`.
    fn check_prompt(&self, nb: usize, k: &DeviceTensor, v: &DeviceTensor) -> Result<usize, Error> {
        let PolicyCacheConfig { hkv, d, .. } = self.cfg;
        let l = k.shape.get(2).copied().unwrap_or(0);
        if l == 0 {
            return Err(Error::ZeroLength { batch: 0 });
        }
        self.check("k", k, vec![nb, hkv, l, d])?;
        self.check("v", v, vec![nb, hkv, l, d])?;
        if l >= 1 << 31 {
            return Err(Error::Config("prompt too long for u32 positions"));
        }
        crate::finite::check_inputs(&self.client, self.cfg.check_finite, &[("k", k), ("v", v)])?;
        Ok(l)
    }

    /// The kept list `[nb, Hkv, c]` of a prompt of `l ≤ c` tokens: every position, then [`FREE`].
    fn keep_all(&self, l: usize, nb: usize) -> Result<DeviceTensor, Error> {
        let PolicyCacheConfig { layout, hkv, .. } = self.cfg;
        let cap = layout.capacity();
        let all: Vec<u32> = (0..nb * hkv).flat_map(|_| (0..cap).map(|j| if j < l { j as u32 } else { FREE })).collect();
        u32_tensor(&self.client, &all, &[nb, hkv, cap])
    }

    /// Decode attention's group-mean probabilities `[nb, Hkv, w, L]` of the last `w` prompt queries over the prompt
    /// (causal, RoPE at true positions when the cache has RoPE).
    fn window_mass(&self, nb: usize, q: &DeviceTensor, k: &DeviceTensor, w: usize, l: usize) -> Result<DeviceTensor, Error> {
        let c = &self.client;
        let mut acfg = DecodeConfig::new().with_mass(true);
        if let Some(base) = self.cfg.rope {
            let q_pos = u32_tensor(c, &(0..nb * w).map(|i| (l - w + i % w) as u32).collect::<Vec<_>>(), &[nb, w])?;
            let k_pos = u32_tensor(c, &(0..nb * l).map(|i| (i % l) as u32).collect::<Vec<_>>(), &[nb, l])?;
            acfg = acfg.with_rope(crate::rope::RopeConfig { base, q_pos, k_pos });
        }
        let out = decode_attention(c, q, k, k, &vec![l as u32; nb], &acfg)?;
        out.mass.ok_or(Error::Config("decode attention returned no mass"))
    }

    /// Installs the first `n` kept positions of `kept: [nb, Hkv, c]` (rows of `k, v: [nb, Hkv, L, D]`) into
    /// sequences `b0 .. b0 + nb`, which become active with `n` entries, `L` tokens seen.
    #[allow(clippy::too_many_arguments)]
    fn install(&mut self, k: &DeviceTensor, v: &DeviceTensor, kept: &DeviceTensor, n: usize, l: usize, b0: usize, nb: usize) -> Result<(), Error> {
        let PolicyCacheConfig { layout, hkv, d, batch, .. } = self.cfg;
        let cap = layout.capacity();
        let c = &self.client;
        let base = self.cur * batch * SEQ_WORDS;
        crate::tensor::count_launches(1);
        // SAFETY: `kept` holds `n ≤ c` positions below `L` per head; slots below `n`; `b0 + nb ≤ B`.
        unsafe {
            let b = |t: &DeviceTensor| BufferArg::from_raw_parts(t.handle.clone(), t.buffer_len.max(1));
            with_float_type!(self.cfg.dtype, E => policy_install::launch_unchecked::<E>(c, CubeCount::Static(hkv as u32, nb as u32, 1), CubeDim::new_1d(d as u32), b(k), b(v), b(kept), b(&self.k), b(&self.v), b(&self.ints), b(&self.fl), k.offset, v.offset, self.order.offset, self.rank.offset, self.pos.offset, self.free.offset, self.seq.offset, self.count.offset, n, l, cap, hkv, cap + 1, d, b0, base));
        }
        crate::tensor::check_written(c, &[&self.k, &self.v, &self.ints, &self.fl])?;
        for s in &mut self.host[b0..b0 + nb] {
            *s = Some(SeqState { len: n, seen: l });
        }
        Ok(())
    }

    /// The shapes, dtypes and layouts of one step's inputs.
    fn check_step(&self, q: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor) -> Result<(), Error> {
        let PolicyCacheConfig { batch, hq, hkv, d, .. } = self.cfg;
        self.check_query("q", q, vec![batch, 1, hq, d])?;
        self.check("k", k, vec![batch, hkv, d])?;
        self.check("v", v, vec![batch, hkv, d])
    }

    /// What the host mirror refuses before a step: the Full policy past its capacity, positions past u32.
    fn host_limits(&self) -> Result<(), Error> {
        let cap = self.cfg.layout.capacity();
        for (b, s) in self.host.iter().enumerate() {
            if let Some(s) = s {
                if self.cfg.policy == Policy::Full && s.len >= cap {
                    return Err(Error::LengthBeyondCapacity { batch: b, len: s.len + 1, capacity: cap });
                }
                if s.seen >= u32::MAX as usize {
                    return Err(Error::Config("a sequence's positions reached the u32 limit"));
                }
            }
        }
        Ok(())
    }

    /// Whether a step may be recorded into a device graph (see [`CompressedKvCache::graph_parity`]).
    fn recordable(&self) -> Result<(), Error> {
        if self.cfg.check_finite {
            return Err(Error::Config("a cache that checks its inputs for non-finite values reads back every step: it cannot be recorded"));
        }
        Ok(())
    }

    /// A step's launches — append, decode attention (planned at `new`), policy step — reading the `cur` half of
    /// `seq` and writing the other; returns the attention output and mass (the plan's fixed buffers).
    fn launch_step(&mut self, q: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor, cur: usize) -> Result<(DeviceTensor, DeviceTensor), Error> {
        let PolicyCacheConfig { policy, layout, batch, hkv, d, .. } = self.cfg;
        let cap1 = layout.capacity() + 1;
        let c = &self.client;
        let grid = CubeCount::Static(hkv as u32, batch as u32, 1);
        let (cur_base, next_base) = (cur * batch * SEQ_WORDS, (1 - cur) * batch * SEQ_WORDS);
        crate::tensor::count_launches(1);
        // SAFETY: every buffer is sized by `new` from the validated configuration; the inputs were checked by the
        // caller (`check_step`).
        unsafe {
            let b = |t: &DeviceTensor| BufferArg::from_raw_parts(t.handle.clone(), t.buffer_len);
            with_float_type!(self.cfg.dtype, E => policy_append::launch_unchecked::<E>(c, grid.clone(), CubeDim::new_1d(d as u32), b(k), b(v), b(&self.k), b(&self.v), b(&self.ints), b(&self.fl), k.offset, v.offset, self.order.offset, self.rank.offset, self.pos.offset, self.free.offset, self.seq.offset, self.att.offset, self.count.offset, cur_base, batch, hkv, cap1, d))
        }
        // Cache-rank positions: the slot → rank array is exactly `[B, Hkv, c+1]` positions; the query sits at the
        // newest rank (`att`'s second row, written by the append).
        let positions = self.cfg.rope.map(|_| (&self.att_qpos, &self.rank));
        let out = self.plan.run(q, &self.k, &self.v, &self.att_lens, positions)?;
        let (o, mass) = (out.o.clone(), out.mass.clone().ok_or(Error::Config("the plan writes no mass"))?);
        crate::tensor::count_launches(1);
        // SAFETY: as above; `mass` is the plan's `[B, Hkv, 1, c+1]` output.
        unsafe {
            let b = |t: &DeviceTensor| BufferArg::from_raw_parts(t.handle.clone(), t.buffer_len);
            with_float_type!(self.cfg.dtype, E => policy_step::launch_unchecked::<E>(c, grid.clone(), CubeDim::new_1d(self.step_threads as u32), b(&mass), b(&self.v), b(&self.ints), b(&self.fl), self.order.offset, self.rank.offset, self.free.offset, self.seq.offset, self.count.offset, cur_base, next_base, batch, hkv, cap1, d, layout.sinks, layout.middle, layout.recent, rule(policy), self.step_threads))
        }
        Ok((o, mass))
    }

    /// The host mirror of a step: the parity flips, every active sequence's length and position advance.
    fn advance(&mut self) {
        let cap = self.cfg.layout.capacity();
        let policy = self.cfg.policy;
        self.cur = 1 - self.cur;
        for s in self.host.iter_mut().flatten() {
            s.len = if policy != Policy::Full && s.len + 1 > cap { cap } else { s.len + 1 };
            s.seen += 1;
        }
    }

    /// A K/V input of the cache's kernels: `shape`, the cache's dtype, contiguous from any element offset (which the
    /// kernels honour).
    fn check(&self, name: &'static str, t: &DeviceTensor, shape: Vec<usize>) -> Result<(), Error> {
        self.check_query(name, t, shape)?;
        if !t.is_contiguous() {
            return Err(Error::Layout { tensor: name, reason: "must be contiguous (from any element offset)" });
        }
        Ok(())
    }

    /// A query input (read by decode attention): `shape`, the cache's dtype, any strides with a unit innermost one
    /// and any element offset (the query part of a fused QKV buffer).
    fn check_query(&self, name: &'static str, t: &DeviceTensor, shape: Vec<usize>) -> Result<(), Error> {
        t.check_in_buffer(name)?;
        if t.shape != shape {
            return Err(Error::ShapeMismatch { tensor: name, expected: shape, got: t.shape.clone() });
        }
        if t.dtype != self.cfg.dtype {
            return Err(Error::DtypeMismatch { tensor: name, got: t.dtype, expected: self.cfg.dtype });
        }
        if t.strides.last() != Some(&1) {
            return Err(Error::Layout { tensor: name, reason: "the head dim must have unit stride" });
        }
        Ok(())
    }
}

impl CompressedKvCache for PolicyCache {
    /// One decode step of every active sequence (retired ones are skipped; their output rows are zeros). A shape
    /// check plus launches — append, decode attention (planned at `new`), policy step — with no allocation, no
    /// upload and no read-back; lengths, positions and counters advance on the device. The output is the cache's
    /// own buffer, overwritten by the next step.
    fn step(&mut self, q: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor) -> Result<DeviceTensor, Error> {
        self.check_step(q, k, v)?;
        self.host_limits()?;
        crate::finite::check_inputs(&self.client, self.cfg.check_finite, &[("q", q), ("k", k), ("v", v)])?;
        let (o, mass) = self.launch_step(q, k, v, self.cur)?;
        if !self.stepped {
            // The first step compiles this cache's kernels: a compile or launch failure surfaces here. Later steps
            // launch the same variants on the same buffers and are not checked (no host round trip per step).
            crate::tensor::check_written(&self.client, &[&o, &mass, &self.ints])?;
            self.stepped = true;
        }
        self.advance();
        Ok(o)
    }

    /// The most entries any active sequence holds per KV head ([`PolicyCache::seq_len`] per sequence).
    fn len(&self) -> usize {
        self.host.iter().flatten().map(|s| s.len).max().unwrap_or(0)
    }

    fn capacity(&self) -> usize {
        self.cfg.layout.capacity()
    }

    fn physical_bytes(&self) -> usize {
        [&self.k, &self.v, &self.ints, &self.fl].iter().map(|t| t.buffer_len * t.dtype.size()).sum()
    }

    /// The decode plan's output buffer: every step writes it.
    fn step_output(&self) -> Option<&DeviceTensor> {
        Some(&self.plan.output().o)
    }

    /// Recordable unless the cache checks its inputs for non-finite values (a read-back per step); a step is
    /// recorded once a plain step has run (it checks the kernels). The parity is which half of the double-buffered
    /// `seq` the step reads.
    fn graph_parity(&self) -> Result<usize, Error> {
        self.recordable()?;
        self.host_limits()?;
        Ok(self.cur)
    }

    fn record_step(&mut self, q: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor, parity: usize) -> Result<(), Error> {
        self.recordable()?;
        if !self.stepped {
            return Err(Error::Config("a cache's step is recorded after its first plain step (which checks its kernels)"));
        }
        self.check_step(q, k, v)?;
        if parity > 1 {
            return Err(Error::Config("a step's parity is 0 or 1"));
        }
        self.launch_step(q, k, v, parity).map(|_| ())
    }

    fn note_replayed(&mut self) {
        self.advance();
    }

    /// Per sequence and KV head, the original positions kept in cache order (a retired sequence: empty). Reads
    /// back `order`, `seq` and `pos`.
    fn kept_positions(&self) -> Result<Vec<Vec<Vec<usize>>>, Error> {
        let PolicyCacheConfig { batch, hkv, layout, .. } = self.cfg;
        let cap1 = layout.capacity() + 1;
        let order = self.current_order()?;
        let pos = self.pos.to_host_f64(&self.client)?;
        Ok((0..batch)
            .map(|b| {
                let len = self.seq_len(b).unwrap_or(0);
                (0..hkv).map(|h| (0..len).map(|q| pos[(b * hkv + h) * cap1 + order[(b * hkv + h) * cap1 + q] as usize] as usize).collect()).collect()
            })
            .collect())
    }
}
