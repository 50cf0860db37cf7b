//! decode_attention against the f64 reference: proptest-drawn shapes (lengths 1, tile−1, tile, tile+1, primes,
//! up to a few thousand; GQA 1/4/8; ragged batches; multi-token causal queries; strided views), poisoned
//! outputs, the derived tolerance, NaN/Inf parity, and every `Error` variant.

mod common;

use common::*;
use kvsqueeze::attention::{decode_attention, decode_attention_into, DecodeConfig, DecodeOutput, Plan};
use kvsqueeze::reference::attention::{attention, Dims};
use kvsqueeze::reference::cast_slice;
use kvsqueeze::reference::rope::Rope;
use kvsqueeze::rope::{RopeConfig, ANGLE_ERROR_RAD};
use kvsqueeze::{DType, DeviceTensor, Error};
use proptest::prelude::*;

/// One problem; `Display` is a one-line reproduction.
#[derive(Clone, Debug)]
struct Case {
    lens: Vec<usize>,
    lcap: usize,
    lq: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    dtype: DType,
    strided: bool,
    lse: bool,
    mass: bool,
    splits: Option<usize>,
    seed: u64,
    /// Put a NaN into this (batch, kv head, slot, dim) of K, or an Inf into V.
    poison: Option<(bool, usize, usize, usize, usize)>,
    /// RoPE in the kernel with this base; positions: slot ranks (`false`) or random up to `max_pos` (`true`).
    rope: Option<(f64, bool)>,
    max_pos: u32,
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

/// Inputs in f64, already rounded to the case's dtype; K/V as `[B, Hkv, L_cap, D]` with NaN past each length.
struct Inputs {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    /// `[B, Lq]` and `[B, L_cap]` RoPE positions (empty without RoPE).
    q_pos: Vec<u32>,
    k_pos: Vec<u32>,
}

fn inputs(c: &Case) -> Inputs {
    let b = c.lens.len();
    let mut rng = Rng(c.seed);
    let q = round_to(&rng.vec(b * c.lq * c.hq * c.d, 1.5), c.dtype);
    let mut k = round_to(&rng.vec(b * c.hkv * c.lcap * c.d, 1.5), c.dtype);
    let mut v = round_to(&rng.vec(b * c.hkv * c.lcap * c.d, 1.0), c.dtype);
    for (bi, &len) in c.lens.iter().enumerate() {
        for h in 0..c.hkv {
            for j in len..c.lcap {
                for dd in 0..c.d {
                    let at = ((bi * c.hkv + h) * c.lcap + j) * c.d + dd;
                    k[at] = f64::NAN;
                    v[at] = f64::NAN;
                }
            }
        }
    }
    if let Some((in_k, bi, h, j, dd)) = c.poison {
        let at = ((bi * c.hkv + h) * c.lcap + j) * c.d + dd;
        if in_k {
            k[at] = f64::NAN;
        } else {
            v[at] = f64::INFINITY;
        }
    }
    let (mut q_pos, mut k_pos) = (Vec::new(), Vec::new());
    if let Some((_, random)) = c.rope {
        for &len in &c.lens {
            let mut pos: Vec<u32> = (0..c.lcap as u32).collect();
            if random {
                // Increasing random positions (a cache holding a sparse subset of a long stream).
                let mut at = (rng.next_u64() % 1000) as u32;
                for p in pos.iter_mut() {
                    *p = at;
                    at = at.saturating_add(1 + (rng.next_u64() % (c.max_pos as u64 / c.lcap as u64 + 1)) as u32);
                }
            }
            let qp: Vec<u32> = (0..c.lq).map(|i| pos[len - c.lq + i]).collect();
            q_pos.extend(qp);
            k_pos.extend(pos);
        }
    }
    Inputs { q, k, v, q_pos, k_pos }
}

/// Reference outputs in `[B, Lq, Hq, D]`, `[B, Lq, Hq]`, `[B, Hkv, Lq, L_cap]` computed in `T`.
fn reference<T: kvsqueeze::reference::Real>(c: &Case, x: &Inputs) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (hq, hkv, d, lq, lcap) = (c.hq, c.hkv, c.d, c.lq, c.lcap);
    let (mut o, mut lse, mut mass) = (Vec::new(), Vec::new(), vec![0.0; c.lens.len() * hkv * lq * lcap]);
    for (bi, &len) in c.lens.iter().enumerate() {
        // Token-major [L, Hkv, D] for the reference.
        let gather = |src: &[f64]| -> Vec<T> {
            let mut out = Vec::with_capacity(len * hkv * d);
            for j in 0..len {
                for h in 0..hkv {
                    out.extend(src[((bi * hkv + h) * lcap + j) * d..][..d].iter().map(|&v| T::of(v)));
                }
            }
            out
        };
        let mut qb: Vec<T> = cast_slice(&x.q[bi * lq * hq * d..][..lq * hq * d]);
        let mut kb = gather(&x.k);
        if let Some((base, _)) = c.rope {
            let rope = Rope { base };
            for i in 0..lq {
                for h in 0..hq {
                    rope.apply(&mut qb[(i * hq + h) * d..][..d], x.q_pos[bi * lq + i] as usize);
                }
            }
            for j in 0..len {
                for h in 0..hkv {
                    rope.apply(&mut kb[(j * hkv + h) * d..][..d], x.k_pos[bi * lcap + j] as usize);
                }
            }
        }
        let scale = T::of(1.0 / (d as f64).sqrt());
        let out = attention(&qb, &kb, &gather(&x.v), Dims { lq, l: len, hq, hkv, d }, len - lq, scale);
        o.extend(cast_slice::<T, f64>(&out.o));
        lse.extend(cast_slice::<T, f64>(&out.lse));
        for i in 0..lq {
            for h in 0..hkv {
                for j in 0..len {
                    mass[((bi * hkv + h) * lq + i) * lcap + j] = out.group_mean[(i * hkv + h) * len + j].f64();
                }
            }
        }
    }
    (o, lse, mass)
}

/// Element offset of the case's views (1..=13, from the seed; odd ones misalign every vector width).
fn view_offset(c: &Case) -> usize {
    1 + (c.seed % 13) as usize
}

/// A poisoned output: contiguous, or (strided cases) a view at an offset inside a larger poisoned buffer.
fn out_view(c: &Case, shape: &[usize], dtype: DType) -> DeviceTensor {
    let cl = client();
    if !c.strided {
        return poisoned(cl, shape, dtype);
    }
    let n: usize = shape.iter().product();
    let off = view_offset(c);
    let big = poisoned(cl, &[n + off + 7], dtype);
    big.view(shape, &kvsqueeze::tensor::contiguous_strides(shape), off)
}

/// Every element of `t`'s buffer outside the view `t` is still the 0xFF poison (NaN): nothing around a view
/// is written.
fn assert_untouched_around(t: &DeviceTensor, case: &Case) {
    let whole = t.view(&[t.buffer_len], &[1], 0).to_host_f64(client()).unwrap();
    let n: usize = t.shape.iter().product();
    for (i, v) in whole.iter().enumerate() {
        if i < t.offset || i >= t.offset + n {
            assert!(v.is_nan(), "element {i} outside the view (offset {}, {n} elements) was written: {v}\n  case: {case}", t.offset);
        }
    }
}

/// Uploads positions behind a prefix of junk positions when the case is strided (a view at an offset).
fn positions(c: &Case, pos: &[u32], shape: &[usize]) -> DeviceTensor {
    let cl = client();
    if !c.strided {
        return DeviceTensor::from_host(cl, pos, shape).unwrap();
    }
    let off = view_offset(c);
    let mut data = vec![u32::MAX / 3; off];
    data.extend_from_slice(pos);
    DeviceTensor::from_host(cl, &data, &[data.len()]).unwrap().view(shape, &kvsqueeze::tensor::contiguous_strides(shape), off)
}

/// Runs the kernel on poisoned outputs. Strided cases: K/V as strided views into a larger NaN-padded buffer, `q`
/// as the query part of a fused `[B, Lq, Hq + 2·Hkv, D]` QKV buffer at an offset, outputs and positions as views
/// at an offset.
fn run_kernel(c: &Case, x: &Inputs) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>, Plan), Error> {
    let cl = client();
    let b = c.lens.len();
    let q = if c.strided {
        let (w, off) = (c.hq + 2 * c.hkv, view_offset(c));
        let mut big = vec![f64::NAN; off + b * c.lq * w * c.d];
        for bi in 0..b {
            for i in 0..c.lq {
                let src = &x.q[((bi * c.lq + i) * c.hq) * c.d..][..c.hq * c.d];
                big[off + (bi * c.lq + i) * w * c.d..][..c.hq * c.d].copy_from_slice(src);
            }
        }
        upload(cl, &big, &[big.len()], c.dtype).view(&[b, c.lq, c.hq, c.d], &[c.lq * w * c.d, w * c.d, c.d, 1], off)
    } else {
        upload(cl, &x.q, &[b, c.lq, c.hq, c.d], c.dtype)
    };
    let kv = |src: &[f64]| -> DeviceTensor {
        if !c.strided {
            return upload(cl, src, &[b, c.hkv, c.lcap, c.d], c.dtype);
        }
        // Physical [B, Hkv+1, L_cap+5, D+8]; the view skips head 0 and the padding, which is NaN.
        let (ph, pl, pd) = (c.hkv + 1, c.lcap + 5, c.d + 8);
        let mut big = vec![f64::NAN; b * ph * pl * pd];
        for bi in 0..b {
            for h in 0..c.hkv {
                for j in 0..c.lcap {
                    let at = ((bi * ph + h + 1) * pl + j) * pd;
                    big[at..at + c.d].copy_from_slice(&src[((bi * c.hkv + h) * c.lcap + j) * c.d..][..c.d]);
                }
            }
        }
        let t = upload(cl, &big, &[big.len()], c.dtype);
        t.view(&[b, c.hkv, c.lcap, c.d], &[ph * pl * pd, pl * pd, pd, 1], pl * pd)
    };
    let (k, v) = (kv(&x.k), kv(&x.v));
    let mut cfg = DecodeConfig::new().with_lse(c.lse).with_mass(c.mass);
    if let Some(s) = c.splits {
        cfg = cfg.with_splits(s);
    }
    if let Some((base, _)) = c.rope {
        let q_pos = positions(c, &x.q_pos, &[b, c.lq]);
        let k_pos = positions(c, &x.k_pos, &[b, c.lcap]);
        cfg = cfg.with_rope(RopeConfig { base, q_pos, k_pos });
    }
    let mut out =
        DecodeOutput::new(out_view(c, &[b, c.lq, c.hq, c.d], c.dtype), c.lse.then(|| out_view(c, &[b, c.lq, c.hq], DType::F32)), c.mass.then(|| out_view(c, &[b, c.hkv, c.lq, c.lcap], DType::F32)));
    let lens = lens32(c);
    decode_attention_into(cl, &q, &k, &v, &lens, &cfg, &mut out)?;
    for t in std::iter::once(&out.o).chain(out.lse.iter()).chain(out.mass.iter()) {
        assert_untouched_around(t, c);
    }
    let read = |t: &Option<DeviceTensor>| t.as_ref().map(|t| t.to_host_f64(cl).unwrap()).unwrap_or_default();
    Ok((out.o.to_host_f64(cl).unwrap(), read(&out.lse), read(&out.mass), out.plan))
}

fn lens32(c: &Case) -> Vec<u32> {
    c.lens.iter().map(|&l| l as u32).collect()
}

/// Checks one case: output, lse and mass against the f64 reference with the derived tolerance.
fn check(c: &Case) {
    if !dtype_ok(c.dtype) {
        skip(&format!("{:?} decode attention", c.dtype), "dtype unsupported on this device");
        return;
    }
    let x = inputs(c);
    let (go, gl, gm) = reference::<f64>(c, &x);
    let (no, nl, nm) = match c.dtype {
        DType::F32 => reference::<f32>(c, &x),
        DType::F16 => reference::<half::f16>(c, &x),
        DType::BF16 => reference::<half::bf16>(c, &x),
        DType::U32 => unreachable!("float storage only"),
    };
    let (ko, kl, km, plan) = run_kernel(c, &x).unwrap_or_else(|e| panic!("kernel refused: {e}\n  case: {c}"));
    let case = format!("{c} plan={plan:?}");
    let mag = go.iter().filter(|v| v.is_finite()).fold(1.0f64, |a, &v| a.max(v.abs()));
    // With RoPE, the kernel's documented angle error δ moves a score by at most δ·‖q‖·‖k‖·scale, and the
    // output by about that times max|v| (= 1 here); twice that joins the floor.
    let norm = |x: &[f64]| x.chunks(c.d).map(|r| r.iter().filter(|v| v.is_finite()).map(|v| v * v).sum::<f64>().sqrt()).fold(0.0, f64::max);
    let rope_floor = if c.rope.is_some() { 2.0 * ANGLE_ERROR_RAD * norm(&x.q) * norm(&x.k) / (c.d as f64).sqrt() } else { 0.0 };
    check_tolerance("o", &case, &ko, &no, &go, 4.0 * eps(c.dtype) * mag + rope_floor);
    if c.lse {
        check_tolerance("lse", &case, &kl, &nl, &gl, 1e-5 * (1.0 + gl.iter().fold(0.0f64, |a, v| a.max(v.abs()))) + rope_floor);
    }
    if c.mass {
        check_tolerance("mass", &case, &km, &nm, &gm, 1e-6 + rope_floor);
    }
}

fn dtype_ok(dtype: DType) -> bool {
    kvsqueeze::attention::dtype_supported(client(), dtype)
}

/// Lengths that stress the tiling (tile = 128): 1, tile−1, tile, tile+1, primes, a few thousand.
fn length() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => prop::sample::select(vec![1usize, 2, 127, 128, 129, 131, 255, 257, 509, 1021, 2003]),
        2 => 1usize..3000,
    ]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(length(), 1..4),
        0usize..4,
        prop::sample::select(vec![(1usize, 1usize), (2, 4), (1, 8), (2, 1), (1, 4)]),
        prop::sample::select(vec![64usize, 128]),
        prop::sample::select(vec![DType::F32, DType::F16]),
        (any::<bool>(), any::<bool>(), any::<bool>()),
        prop::option::of(1usize..6),
        prop::sample::select(vec![1usize, 1, 1, 2, 3]),
        any::<u64>(),
        prop::sample::select(vec![None, None, Some((10_000.0, false)), Some((500_000.0, true))]),
    )
        .prop_map(|(mut lens, extra, (hkv, g), d, dtype, (strided, lse, mass), splits, lq, seed, rope)| {
            for l in lens.iter_mut() {
                *l = (*l).max(lq);
            }
            let lcap = lens.iter().copied().max().unwrap() + extra;
            Case { lens, lcap, lq, hq: hkv * g, hkv, d, dtype, strided, lse, mass, splits, seed, poison: None, rope, max_pos: 1 << 24 }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn decode_matches_reference(c in case_strategy()) {
        check(&c);
    }
}

fn base(lens: Vec<usize>, hkv: usize, g: usize, d: usize, dtype: DType) -> Case {
    let lcap = lens.iter().copied().max().unwrap();
    Case { lens, lcap, lq: 1, hq: hkv * g, hkv, d, dtype, strided: false, lse: true, mass: true, splits: None, seed: 11, poison: None, rope: None, max_pos: 1 << 24 }
}

/// Head dim 96 goes through the same kernel with D/N = 12 vectors per row (not a power of two).
#[test]
fn head_dim_96_and_general_multiples_of_8() {
    for d in [96, 40, 8] {
        check(&base(vec![300, 77], 2, 4, d, DType::F32));
    }
    check(&Case { splits: Some(3), ..base(vec![1000], 1, 8, 96, DType::F16) });
}

/// bf16 storage: runs where the device offers it (CUDA), a visible skip elsewhere (lavapipe).
#[test]
fn bf16_storage() {
    check(&base(vec![513, 64], 2, 4, 128, DType::BF16));
    check(&Case { splits: Some(4), lq: 2, ..base(vec![1500], 1, 8, 128, DType::BF16) });
}

/// GQA 8 with several query tokens exceeds 16 rows per cube: two row blocks, mass through the finalize pass.
#[test]
fn row_blocks_and_forced_splits() {
    check(&Case { lq: 3, ..base(vec![700, 300], 1, 8, 64, DType::F32) });
    check(&Case { lq: 3, splits: Some(1), ..base(vec![700], 1, 8, 64, DType::F32) });
    check(&Case { splits: Some(5), strided: true, ..base(vec![129, 1, 640], 2, 4, 64, DType::F16) });
}

/// A NaN in a visible key makes its group's rows NaN, as in the reference; an Inf value likewise.
#[test]
fn nan_and_inf_parity() {
    for (in_k, j) in [(true, 5), (false, 200), (true, 299)] {
        let c = Case { poison: Some((in_k, 0, 1, j, 3)), ..base(vec![300, 50], 2, 4, 64, DType::F32) };
        check(&c);
        let c = Case { splits: Some(3), lq: 2, ..c };
        check(&c);
    }
}

/// RoPE inside the kernel: cache-rank positions, sparse positions up to 2^24, and positions near 2^32 (all
/// three 10/10/12-bit chunks of the angle reduction), with the NTK-scaled base of LongLLaDA.
#[test]
fn rope_positions() {
    let ntk = kvsqueeze::rope::ntk_scaled_base(128, 500_000.0, 4096, 32768);
    check(&Case { rope: Some((10_000.0, false)), ..base(vec![300, 129], 2, 4, 128, DType::F32) });
    check(&Case { rope: Some((ntk, true)), splits: Some(3), lq: 2, ..base(vec![1000], 1, 8, 64, DType::F16) });
    check(&Case { rope: Some((500_000.0, true)), max_pos: u32::MAX - 5000, ..base(vec![200], 2, 1, 128, DType::F32) });
    check(&Case { rope: Some((10_000.0, true)), ..base(vec![77], 1, 4, 8, DType::F32) });
}

/// Every `Error` variant, and that a refused call leaves caller-owned outputs untouched.
#[test]
fn every_error_variant() {
    let cl = client();
    let f32t = |shape: &[usize]| upload(cl, &vec![0.5; shape.iter().product()], shape, DType::F32);
    let (q, k, v) = (f32t(&[2, 1, 8, 64]), f32t(&[2, 2, 100, 64]), f32t(&[2, 2, 100, 64]));
    let cfg = DecodeConfig::new();
    let call = |q: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor, lens: &[u32], cfg: &DecodeConfig| decode_attention(cl, q, k, v, lens, cfg).map(|_| ());
    assert!(call(&q, &k, &v, &[100, 3], &cfg).is_ok());
    assert!(matches!(call(&f32t(&[2, 1, 8, 32]), &k, &v, &[100, 3], &cfg), Err(Error::ShapeMismatch { tensor: "k", .. })));
    assert!(matches!(call(&q, &k, &f32t(&[2, 2, 99, 64]), &[100, 3], &cfg), Err(Error::ShapeMismatch { tensor: "v", .. })));
    assert!(matches!(call(&q, &k, &v, &[100], &cfg), Err(Error::ShapeMismatch { tensor: "lens", .. })));
    assert!(matches!(call(&f32t(&[2, 1, 6, 64]), &f32t(&[2, 4, 100, 64]), &f32t(&[2, 4, 100, 64]), &[1, 1], &cfg), Err(Error::GqaRatio { hq: 6, hkv: 4 })));
    assert!(matches!(call(&q, &k, &v, &[100, 0], &cfg), Err(Error::ZeroLength { batch: 1 })));
    assert!(matches!(call(&f32t(&[2, 4, 8, 64]), &k, &v, &[100, 3], &cfg), Err(Error::ZeroLength { batch: 1 })));
    assert!(matches!(call(&q, &k, &v, &[101, 3], &cfg), Err(Error::LengthBeyondCapacity { batch: 0, len: 101, capacity: 100 })));
    let odd = |d| (f32t(&[1, 1, 1, d]), f32t(&[1, 1, 4, d]));
    for d in [12, 264] {
        let (q, k) = odd(d);
        assert!(matches!(call(&q, &k, &k, &[4], &cfg), Err(Error::UnsupportedHeadDim { .. })), "d = {d}");
    }
    let kh = upload(cl, &vec![0.5; 2 * 2 * 100 * 64], &[2, 2, 100, 64], DType::F16);
    assert!(matches!(call(&q, &kh, &v, &[100, 3], &cfg), Err(Error::DtypeMismatch { tensor: "k", .. })));
    let transposed = k.view(&[2, 2, 100, 64], &[2 * 100 * 64, 100 * 64, 1, 100], 0);
    assert!(matches!(call(&q, &transposed, &v, &[100, 3], &cfg), Err(Error::Layout { tensor: "k", .. })));
    let past_end = k.view(&[2, 2, 100, 64], &[2 * 100 * 64, 100 * 64, 64, 1], 64);
    assert!(matches!(call(&q, &past_end, &v, &[100, 3], &cfg), Err(Error::Layout { tensor: "k", .. })));
    assert!(matches!(call(&q, &k, &v, &[100, 3], &DecodeConfig::new().with_splits(0)), Err(Error::Config(_))));
    assert!(matches!(call(&q, &k, &v, &[100, 3], &DecodeConfig::new().with_scale(f32::NAN)), Err(Error::Config(_))));
    let pos = |n: usize| DeviceTensor::from_host(cl, &vec![1u32; n], &[2, n / 2]).unwrap();
    let rope = |q_pos, k_pos, base| DecodeConfig::new().with_rope(RopeConfig { base, q_pos, k_pos });
    assert!(call(&q, &k, &v, &[100, 3], &rope(pos(2), pos(200), 1e4)).is_ok());
    assert!(matches!(call(&q, &k, &v, &[100, 3], &rope(pos(2), pos(198), 1e4)), Err(Error::ShapeMismatch { tensor: "k_pos", .. })));
    assert!(matches!(call(&q, &k, &v, &[100, 3], &rope(pos(4), pos(200), 1e4)), Err(Error::ShapeMismatch { tensor: "q_pos", .. })));
    assert!(matches!(call(&q, &k, &v, &[100, 3], &rope(f32t(&[2, 1]), pos(200), 1e4)), Err(Error::DtypeMismatch { tensor: "q_pos", .. })));
    assert!(matches!(call(&q, &k, &v, &[100, 3], &rope(pos(2), pos(200), f64::NAN)), Err(Error::Config(_))));
    if !dtype_ok(DType::BF16) {
        let b = |shape: &[usize]| upload(cl, &vec![0.5; shape.iter().product()], shape, DType::BF16);
        let r = call(&b(&[2, 1, 8, 64]), &b(&[2, 2, 100, 64]), &b(&[2, 2, 100, 64]), &[100, 3], &cfg);
        assert!(matches!(r, Err(Error::DtypeUnsupported { dtype: DType::BF16, .. })), "{r:?}");
    } else {
        eprintln!("SKIP DtypeUnsupported check: every dtype is supported on this device (not a failure: the variant cannot occur here)");
    }
    // A refused call launches nothing: the poisoned outputs stay poisoned.
    let mut out = DecodeOutput::new(poisoned(cl, &[2, 1, 8, 64], DType::F32), None, None);
    let before = out.o.to_host_f64(cl).unwrap();
    assert!(decode_attention_into(cl, &q, &k, &v, &[100, 300], &cfg, &mut out).is_err());
    assert!(matches!(decode_attention_into(cl, &q, &k, &v, &[100, 3], &DecodeConfig::new().with_mass(true), &mut out), Err(Error::Config(_))));
    let after = out.o.to_host_f64(cl).unwrap();
    assert!(before.iter().all(|v| v.is_nan()) && after.iter().all(|v| v.is_nan()));
}

/// `DecodePlan`: planned once for a capacity, run with device lengths — ragged, one slot inactive (length 0:
/// zero output and mass) — and RoPE positions, several times without allocating; equal to the one-shot op on each
/// live sequence.
#[test]
fn plan_runs_match_one_shot_calls() {
    use kvsqueeze::attention::{DecodePlan, DecodeShape};
    let cl = client();
    let (b, hq, hkv, d, lcap) = (3, 8, 2, 64, 300);
    let mut rng = Rng(4242);
    let q = upload(cl, &rng.vec(b * hq * d, 1.5), &[b, 1, hq, d], DType::F32);
    let k = upload(cl, &rng.vec(b * hkv * lcap * d, 1.5), &[b, hkv, lcap, d], DType::F32);
    let v = upload(cl, &rng.vec(b * hkv * lcap * d, 1.0), &[b, hkv, lcap, d], DType::F32);
    let lens = [257u32, 0, 9];
    let lens_d = DeviceTensor::from_host(cl, &lens, &[b]).unwrap();
    let q_pos = DeviceTensor::from_host(cl, &[256u32, 0, 8], &[b, 1]).unwrap();
    let k_pos = DeviceTensor::from_host(cl, &(0..b * lcap).map(|i| (i % lcap) as u32).collect::<Vec<_>>(), &[b, lcap]).unwrap();
    let mut plan = DecodePlan::new(cl, DecodeShape::new(b, 1, hq, hkv, d, lcap, DType::F32).with_rope(10_000.0), &DecodeConfig::new().with_mass(true)).unwrap();
    let before = kvsqueeze::tensor::device_allocations();
    for _ in 0..3 {
        plan.run(&q, &k, &v, &lens_d, Some((&q_pos, &k_pos))).unwrap();
    }
    let (o, mass) = (plan.output().o.to_host_f64(cl).unwrap(), plan.output().mass.as_ref().unwrap().to_host_f64(cl).unwrap());
    assert_eq!(kvsqueeze::tensor::device_allocations() - before, 0, "runs allocated or uploaded");
    assert!(o[hq * d..2 * hq * d].iter().all(|&x| x == 0.0), "an inactive slot's output is zero");
    assert!(mass[hkv * lcap..2 * hkv * lcap].iter().all(|&x| x == 0.0), "an inactive slot's mass is zero");
    for bi in [0usize, 2] {
        let one = |t: &DeviceTensor, shape: &[usize], stride: usize| t.view(shape, &kvsqueeze::tensor::contiguous_strides(shape), bi * stride);
        let pos = |t: &DeviceTensor, n: usize| t.view(&[1, n], &[n, 1], bi * n);
        let cfg = DecodeConfig::new().with_mass(true).with_rope(RopeConfig { base: 10_000.0, q_pos: pos(&q_pos, 1), k_pos: pos(&k_pos, lcap) });
        let want = decode_attention(cl, &one(&q, &[1, 1, hq, d], hq * d), &one(&k, &[1, hkv, lcap, d], hkv * lcap * d), &one(&v, &[1, hkv, lcap, d], hkv * lcap * d), &[lens[bi]], &cfg).unwrap();
        let (wo, wm) = (want.o.to_host_f64(cl).unwrap(), want.mass.unwrap().to_host_f64(cl).unwrap());
        let (eo, _) = compare(&o[bi * hq * d..][..hq * d], &wo);
        let (em, _) = compare(&mass[bi * hkv * lcap..][..hkv * lcap], &wm);
        assert!(eo < 1e-5 && em < 1e-6, "sequence {bi}: output {eo:.2e}, mass {em:.2e}");
    }
    // The u32 inputs as views of one buffer at offsets (as the caches pass them): bound as they are — no copy
    // launch — with the same outputs; and a plan without RoPE reads `lens` from its view's offset.
    let mut packed = vec![7u32; 5];
    let (at_l, at_q, at_k) = (packed.len(), packed.len() + b + 2, packed.len() + 2 * b + 5);
    packed.resize(at_k + b * lcap + 3, 7);
    packed[at_l..at_l + b].copy_from_slice(&lens);
    packed[at_q..at_q + b].copy_from_slice(&[256, 0, 8]);
    for i in 0..b * lcap {
        packed[at_k + i] = (i % lcap) as u32;
    }
    let one_buf = DeviceTensor::from_host(cl, &packed, &[packed.len()]).unwrap();
    let (lens_v, qp_v, kp_v) = (one_buf.view(&[b], &[1], at_l), one_buf.view(&[b, 1], &[1, 1], at_q), one_buf.view(&[b, lcap], &[lcap, 1], at_k));
    let launches = kvsqueeze::tensor::device_launches();
    plan.run(&q, &k, &v, &lens_v, Some((&qp_v, &kp_v))).unwrap();
    assert_eq!(kvsqueeze::tensor::device_launches() - launches, plan.output().plan.launches, "shared-buffer inputs are bound without a copy");
    let (o2, mass2) = (plan.output().o.to_host_f64(cl).unwrap(), plan.output().mass.as_ref().unwrap().to_host_f64(cl).unwrap());
    assert!(o2 == o && mass2 == mass, "the packed inputs give the same outputs as separate buffers");
    let mut plain = DecodePlan::new(cl, DecodeShape::new(b, 1, hq, hkv, d, lcap, DType::F32), &DecodeConfig::new()).unwrap();
    let out_view = plain.run(&q, &k, &v, &lens_v, None).unwrap().o.to_host_f64(cl).unwrap();
    let out_own = plain.run(&q, &k, &v, &lens_d, None).unwrap().o.to_host_f64(cl).unwrap();
    assert!(out_view == out_own && out_own[hq * d..2 * hq * d].iter().all(|&x| x == 0.0), "lens read from its view's offset");
    // Refusals: wrong lens dtype/shape, positions without a RoPE base or missing with one.
    let bad_lens = DeviceTensor::from_host(cl, &[1u32, 2], &[2]).unwrap();
    assert!(matches!(plan.run(&q, &k, &v, &bad_lens, Some((&q_pos, &k_pos))), Err(Error::ShapeMismatch { tensor: "lens", .. })));
    assert!(matches!(plan.run(&q, &k, &v, &lens_d, None), Err(Error::Config(_))));
    assert!(matches!(DecodePlan::new(cl, DecodeShape::new(b, 1, hq, hkv, d, 0, DType::F32), &DecodeConfig::new()), Err(Error::Config(_))));
}
