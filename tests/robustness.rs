//! Correct under any input (issue 13): the probes a demanding user tried, each now a typed error or a correct
//! result; the non-finite policy; views with offsets refused where a kernel cannot honour them; output files
//! that never follow an existing path; and a fuzz target over the public API (random shapes, strides,
//! offsets, dtypes, budgets, layouts; valid and invalid) that runs a fixed number of cases: no panic, every
//! refusal typed, every acceptance equal to the reference within the derived tolerance.

mod common;

use common::*;
use kvsqueeze::attention::{decode_attention, DecodeConfig};
use kvsqueeze::fourier::{FourierDims, FourierLayerCache, FourierLayerConfig, FourierPath};
use kvsqueeze::policy::{CompressedKvCache, Layout, Policy, PolicyCache, PolicyCacheConfig};
use kvsqueeze::reference::attention::{attention, Dims};
use kvsqueeze::reference::policy::{PolicyCache as RefCache, PolicyConfig, Positions};
use kvsqueeze::tensor::contiguous_strides;
use kvsqueeze::{DType, DeviceTensor, Error};
use proptest::prelude::*;
use std::process::{Command, Output};

fn f32t(shape: &[usize], seed: u64) -> DeviceTensor {
    let n: usize = shape.iter().product();
    upload(client(), &Rng(seed).vec(n, 1.0), shape, DType::F32)
}

// ---------------------------------------------------------------------------------------------------------------
// API probes

#[test]
fn layout_probes_are_typed_errors() {
    let cl = client();
    let (q, k) = (f32t(&[1, 1, 4, 8], 1), f32t(&[1, 1, 10, 8], 2));
    let cfg = DecodeConfig::new();
    // A k with 3 strides for 4 dims.
    let bad_rank = DeviceTensor { strides: vec![80, 8, 1], ..k.clone() };
    assert!(matches!(decode_attention(cl, &q, &bad_rank, &k, &[10], &cfg), Err(Error::Layout { tensor: "k", .. })));
    // A stride of usize::MAX (its span overflows) and an offset of usize::MAX.
    let huge = k.view(&[1, 1, 10, 8], &[80, 80, usize::MAX, 1], 0);
    assert!(matches!(decode_attention(cl, &q, &huge, &k, &[10], &cfg), Err(Error::Layout { tensor: "k", .. })));
    let far = q.view(&[1, 1, 4, 8], &[32, 32, 8, 1], usize::MAX);
    assert!(matches!(decode_attention(cl, &far, &k, &k, &[10], &cfg), Err(Error::Layout { tensor: "q", .. })));
    // A rank-0 q.
    let scalar = q.view(&[], &[], 0);
    assert_eq!(decode_attention(cl, &scalar, &k, &k, &[10], &cfg).err(), Some(Error::Rank { tensor: "q", expected: 4, got: 0 }));
    // Layouts whose sizes overflow, and a budget the device cannot hold.
    let mk = |layout, batch| PolicyCache::new(cl, PolicyCacheConfig::new(Policy::H2o, layout, batch, 4, 1, 8, DType::F32));
    assert!(matches!(mk(Layout { sinks: usize::MAX, middle: 1, recent: 1 }, 1), Err(Error::Config(_))));
    assert!(matches!(mk(Layout { sinks: 4, middle: 1_000_000_000, recent: 4 }, 1), Err(Error::DeviceLimit(_))));
    assert!(matches!(mk(Layout { sinks: 4, middle: 1 << 40, recent: 4 }, 1), Err(Error::Config(_))), "u32 slots");
    assert!(matches!(mk(Layout { sinks: 4, middle: 1 << 31, recent: 4 }, 1 << 30), Err(Error::DeviceLimit(_))));
    // Buffers too large for the device or the address range.
    assert!(matches!(DeviceTensor::empty(cl, &[1 << 20, 1 << 20, 1 << 20], DType::F32), Err(Error::DeviceLimit(_))));
    assert!(matches!(DeviceTensor::empty(cl, &[usize::MAX, 2], DType::F32), Err(Error::DeviceLimit(_))));
    assert!(matches!(kvsqueeze::util::random(cl, &[usize::MAX / 2, 3], DType::F32, 1, 1.0), Err(Error::DeviceLimit(_))));
    // Fourier sizes that overflow.
    let dims = FourierDims::uniform(1, 8, &[0], &[0]).unwrap();
    let r = FourierLayerCache::new(cl, FourierLayerConfig::new(1, 1, DType::F32, usize::MAX, 4, 2, 64, dims.clone()));
    assert!(matches!(r, Err(Error::Config(_))), "{:?}", r.err());
    let r = FourierLayerCache::new(cl, FourierLayerConfig::new(1 << 40, 1, DType::F32, 4, 4, 2, 64, dims));
    assert!(matches!(r, Err(Error::DeviceLimit(_))), "{:?}", r.err());
}

/// Views are views in the caches too: a policy cache fed its query as the q part of a fused `[B, Hq + 2·Hkv, D]`
/// QKV buffer at an offset, and K/V (and an admitted prompt) at element offsets, equals — outputs bit for bit, kept
/// sets — a twin fed contiguous copies. FourierAttention's query kernels index from the buffer start: a query view
/// with an offset is refused (typed) and the cache is unchanged.
#[test]
fn offsets_honoured_or_refused() {
    use kvsqueeze::policy::{Admission, Pool};
    let cl = client();
    let (b, hq, hkv, d) = (2, 4, 2, 8);
    let layout = Layout { sinks: 1, middle: 4, recent: 2 };
    let mk = || PolicyCache::new(cl, PolicyCacheConfig::new(Policy::H2o, layout, b, hq, hkv, d, DType::F32).with_rope(10_000.0)).unwrap();
    let (mut viewed, mut plain) = (mk(), mk());
    let mut rng = Rng(3);
    // Slot 1 admits a 20-token prompt by SnapKV, given at an offset.
    let l = 20;
    let (pk, pv, pq) = (rng.vec(hkv * l * d, 1.5), rng.vec(hkv * l * d, 1.0), rng.vec(4 * hq * d, 1.5));
    let at = |x: &[f64], shape: &[usize], off: usize| {
        let mut big = vec![f64::NAN; off];
        big.extend_from_slice(x);
        big.push(f64::NAN);
        upload(cl, &big, &[big.len()], DType::F32).view(shape, &contiguous_strides(shape), off)
    };
    for (cache, off) in [(&mut viewed, 7), (&mut plain, 0)] {
        cache.retire(1).unwrap();
        let (k, v, q) = (at(&pk, &[1, hkv, l, d], off), at(&pv, &[1, hkv, l, d], off + 3), at(&pq, &[1, 4, hq, d], off + 1));
        cache.admit(1, Admission::SnapKv { q_win: &q, k: &k, v: &v, kernel: 3, pool: Pool::Avg }).unwrap();
    }
    assert_eq!(viewed.kept_positions().unwrap(), plain.kept_positions().unwrap(), "admission");
    let w = hq + 2 * hkv;
    for t in 0..20 {
        let (q, k, v) = (rng.vec(b * hq * d, 1.5), rng.vec(b * hkv * d, 1.5), rng.vec(b * hkv * d, 1.0));
        // The fused buffer: per sequence [q heads | k heads | v heads], after 5 leading elements.
        let mut fused = vec![f64::NAN; 5];
        for bi in 0..b {
            fused.extend_from_slice(&q[bi * hq * d..][..hq * d]);
            fused.extend_from_slice(&k[bi * hkv * d..][..hkv * d]);
            fused.extend_from_slice(&v[bi * hkv * d..][..hkv * d]);
        }
        let fused = upload(cl, &fused, &[fused.len()], DType::F32);
        let qv = fused.view(&[b, 1, hq, d], &[w * d, w * d, d, 1], 5);
        let (kv, vv) = (at(&k, &[b, hkv, d], 9), at(&v, &[b, hkv, d], 2));
        let o1 = viewed.step(&qv, &kv, &vv).unwrap().to_host_f64(cl).unwrap();
        let o2 = plain.step(&upload(cl, &q, &[b, 1, hq, d], DType::F32), &upload(cl, &k, &[b, hkv, d], DType::F32), &upload(cl, &v, &[b, hkv, d], DType::F32)).unwrap().to_host_f64(cl).unwrap();
        assert_eq!(o1, o2, "step {t}");
        assert_eq!(viewed.kept_positions().unwrap(), plain.kept_positions().unwrap(), "step {t}");
    }
    // K/V must be contiguous (from any offset): a padded view is refused.
    let padded = upload(cl, &rng.vec(b * hkv * (d + 1), 1.0), &[b * hkv * (d + 1)], DType::F32).view(&[b, hkv, d], &[hkv * (d + 1), d + 1, 1], 0);
    let q = f32t(&[b, 1, hq, d], 6);
    assert!(matches!(viewed.step(&q, &padded, &padded), Err(Error::Layout { tensor: "k", .. })));
    // FourierAttention's query.
    let big = f32t(&[64], 3);
    let q_off = big.view(&[1, 1, hq, d], &contiguous_strides(&[1, 1, hq, d]), 5);
    let dims = FourierDims::uniform(hkv, d, &[0, 1], &[0, 1]).unwrap();
    let mut fc = FourierLayerCache::new(cl, FourierLayerConfig::new(1, hq, DType::F32, 1, 2, 1, 16, dims)).unwrap();
    fc.prefill(0, &f32t(&[6, hkv, d], 7), &f32t(&[6, hkv, d], 8)).unwrap();
    assert!(matches!(fc.attend(&q_off, 0.3, FourierPath::Spectral), Err(Error::Layout { tensor: "q", .. })));
    let before = fc.lens();
    assert!(matches!(fc.step(&q_off, &f32t(&[1, hkv, d], 4), &f32t(&[1, hkv, d], 5)), Err(Error::Layout { tensor: "q", .. })));
    assert_eq!(fc.lens(), before, "a refused step leaves the cache unchanged");
    assert!(fc.attend(&f32t(&[1, 1, hq, d], 6), 0.3, FourierPath::Spectral).is_ok());
}

// ---------------------------------------------------------------------------------------------------------------
// The non-finite policy

fn with_nan(shape: &[usize], at: usize, seed: u64) -> DeviceTensor {
    let n: usize = shape.iter().product();
    let mut x = Rng(seed).vec(n, 1.0);
    x[at] = f64::NAN;
    upload(client(), &x, shape, DType::F32)
}

#[test]
fn non_finite_inputs_are_named() {
    let cl = client();
    let (q, k) = (f32t(&[2, 1, 4, 8], 11), f32t(&[2, 2, 20, 8], 12));
    let cfg = DecodeConfig::new().with_check_finite(true);
    assert!(decode_attention(cl, &q, &k, &k, &[20, 7], &cfg).is_ok());
    // NaN in K at (1, 0, 5, 3): inside sequence 1's 7 valid rows.
    let kn = with_nan(&[2, 2, 20, 8], (2 * 20 + 5) * 8 + 3, 12);
    let r = decode_attention(cl, &q, &kn, &k, &[20, 7], &cfg);
    assert_eq!(r.err(), Some(Error::NonFinite { tensor: "k", index: vec![1, 0, 5, 3] }));
    // The same NaN past sequence 1's length is spare capacity, never read: accepted.
    let kn = with_nan(&[2, 2, 20, 8], (2 * 20 + 9) * 8 + 3, 12);
    assert!(decode_attention(cl, &q, &kn, &k, &[20, 7], &cfg).is_ok());
    // An infinity in q; and a NaN in a strided view of v.
    let mut qx = Rng(11).vec(64, 1.0);
    qx[37] = f64::INFINITY;
    let qi = upload(cl, &qx, &[2, 1, 4, 8], DType::F32);
    assert_eq!(decode_attention(cl, &qi, &k, &k, &[20, 7], &cfg).err(), Some(Error::NonFinite { tensor: "q", index: vec![1, 0, 0, 5] }));
    // Off by default: the NaN flows through (as the reference would), no error.
    assert!(decode_attention(cl, &qi, &k, &k, &[20, 7], &DecodeConfig::new()).is_ok());

    // A policy cache with the check: a NaN key is refused and the cache is unchanged — its next steps equal a
    // twin's that never saw the bad token (H2O would otherwise decide on a NaN score).
    let (b, hq, hkv, d) = (1, 4, 2, 8);
    let layout = Layout { sinks: 1, middle: 4, recent: 2 };
    let mk = || PolicyCache::new(cl, PolicyCacheConfig::new(Policy::H2o, layout, b, hq, hkv, d, DType::F32).with_check_finite(true)).unwrap();
    let (mut a, mut twin) = (mk(), mk());
    let mut rng = Rng(13);
    for t in 0..24 {
        let (q, k, v) = (rng.vec(b * hq * d, 1.5), rng.vec(b * hkv * d, 1.5), rng.vec(b * hkv * d, 1.0));
        let up = |x: &[f64], s: &[usize]| upload(cl, x, s, DType::F32);
        if t % 5 == 2 {
            let mut bad = k.clone();
            bad[d + 2] = f64::NAN;
            let r = a.step(&up(&q, &[b, 1, hq, d]), &up(&bad, &[b, hkv, d]), &up(&v, &[b, hkv, d]));
            assert_eq!(r.err(), Some(Error::NonFinite { tensor: "k", index: vec![0, 1, 2] }), "step {t}");
        }
        let oa = a.step(&up(&q, &[b, 1, hq, d]), &up(&k, &[b, hkv, d]), &up(&v, &[b, hkv, d])).unwrap().to_host_f64(cl).unwrap();
        let ob = twin.step(&up(&q, &[b, 1, hq, d]), &up(&k, &[b, hkv, d]), &up(&v, &[b, hkv, d])).unwrap().to_host_f64(cl).unwrap();
        assert_eq!(oa, ob, "step {t}");
        assert_eq!(a.kept_positions().unwrap(), twin.kept_positions().unwrap(), "step {t}");
    }
    // FourierAttention with the check: a NaN in the prompt is refused, the sequence stays empty.
    let dims = FourierDims::uniform(hkv, d, &[0, 1], &[0, 1]).unwrap();
    let mut fc = FourierLayerCache::new(cl, FourierLayerConfig::new(1, hq, DType::F32, 1, 2, 1, 16, dims).with_check_finite(true)).unwrap();
    let r = fc.prefill(0, &with_nan(&[6, hkv, d], 17, 14), &f32t(&[6, hkv, d], 15));
    assert_eq!(r.err(), Some(Error::NonFinite { tensor: "k", index: vec![1, 0, 1] }));
    assert_eq!(fc.lens(), vec![0]);
    fc.prefill(0, &f32t(&[6, hkv, d], 14), &f32t(&[6, hkv, d], 15)).unwrap();
}

// ---------------------------------------------------------------------------------------------------------------
// The command line

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvsqueeze"));
    c.env("XDG_RUNTIME_DIR", std::env::temp_dir());
    c
}

fn no_panic(args: &[&str], out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked") && out.status.code().is_some(), "{args:?} panicked or was killed: {err}");
    err
}

fn run(args: &[&str]) -> (i32, String) {
    let out = bin().args(args).output().unwrap();
    let err = no_panic(args, &out);
    (out.status.code().unwrap(), err)
}

fn write_trace(path: &std::path::Path, shapes: [&[usize]; 3], nan_at: Option<usize>) {
    let mut rng = Rng(31);
    let data: Vec<Vec<f32>> = shapes.iter().map(|s| rng.vec(s.iter().product(), 1.0).into_iter().map(|x| x as f32).collect()).collect();
    let mut data = data;
    if let Some(i) = nan_at {
        data[1][i] = f32::NAN;
    }
    let views: Vec<_> = ["q", "k", "v"]
        .iter()
        .zip(&data)
        .zip(shapes)
        .map(|((n, x), s)| (*n, safetensors::tensor::TensorView::new(safetensors::tensor::Dtype::F32, s.to_vec(), bytemuck::cast_slice(x)).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn cli_probes() {
    // compare with short streams (every --steps from 2 to 56 indexed past its samples before).
    for steps in ["9", "16", "23", "56"] {
        let (code, err) = run(&["compare", "--steps", steps, "--budgets", "8", "--policies", "h2o,treekv", "--json"]);
        assert_eq!(code, 0, "--steps {steps}: {err}");
    }
    let dir = std::env::temp_dir().join(format!("kvsqueeze-robust-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("trace.safetensors");
    write_trace(&trace, [&[12, 4, 8], &[12, 2, 8], &[12, 2, 8]], None);
    let t = trace.to_str().unwrap();
    // Sinks that wrap the layout check.
    let (code, err) = run(&["replay", "--policy", "h2o", "--budget", "8", "--sinks", "18446744073709551615", "--trace", t]);
    assert_eq!(code, 2, "{err}");
    // A budget the device cannot hold: refused before any allocation, no abort.
    let (code, err) = run(&["replay", "--policy", "h2o", "--budget", "1000000000", "--trace", t]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("device limit"), "{err}");
    // An output directory that does not exist: reported before the run.
    let (code, err) = run(&["replay", "--policy", "h2o", "--budget", "8", "--trace", t, "--out", "/nonexistent-dir/out.safetensors"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not exist") && !err.contains("replayed"), "{err}");
    // A rank-0 q, and a malformed header, with the reason.
    let bad = dir.join("bad.safetensors");
    write_trace(&bad, [&[], &[12, 2, 8], &[12, 2, 8]], None);
    let (code, err) = run(&["replay", "--policy", "h2o", "--budget", "8", "--trace", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("`q` has shape []"), "{err}");
    std::fs::write(&bad, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all").unwrap();
    let (code, err) = run(&["replay", "--policy", "h2o", "--budget", "8", "--trace", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not a readable safetensors trace:") && err.len() > 60, "the reason is kept: {err}");
    // A NaN in the trace: refused, naming the tensor and the element.
    let nan = dir.join("nan.safetensors");
    write_trace(&nan, [&[12, 4, 8], &[12, 2, 8], &[12, 2, 8]], Some(5 * 16 + 9));
    let (code, err) = run(&["replay", "--policy", "h2o", "--budget", "8", "--trace", nan.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("`k` holds a NaN or infinity at [0, 1, 1]"), "{err}");
    // Symlinks planted at the old temporary name and at the destination: neither victim is written; the
    // destination becomes a regular file with the output.
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, b"keep me").unwrap();
    let out = dir.join("out.safetensors");
    let _ = std::fs::remove_file(&out);
    std::os::unix::fs::symlink(&victim, dir.join("out.safetensors.partial")).unwrap();
    std::os::unix::fs::symlink(&victim, &out).unwrap();
    let (code, err) = run(&["replay", "--policy", "h2o", "--budget", "8", "--trace", t, "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    assert!(!std::fs::symlink_metadata(&out).unwrap().file_type().is_symlink());
    let written = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&written).unwrap();
    assert_eq!(st.tensor("o").unwrap().shape(), &[12, 4, 8]);
    assert_eq!(st.tensor("kept").unwrap().shape(), &[12, 2, 8]);
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with(".out")).collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    // A bench whose buffers the device cannot hold is refused (typed), not timed.
    let (code, err) = run(&["bench", "--len", "4194304", "--batch", "64"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("device limit"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------------------------------------------------
// The fuzz target

/// A tensor argument as the fuzzer builds it: contiguous, padded (larger strides), at an offset, or broken
/// (a stride rank that does not match, a view past its buffer).
#[derive(Clone, Copy, Debug)]
enum ViewKind {
    Contiguous,
    Padded,
    Offset(usize),
    BadRank,
    PastEnd,
}

fn view_kind() -> impl Strategy<Value = ViewKind> {
    prop_oneof![
        3 => Just(ViewKind::Contiguous),
        2 => Just(ViewKind::Padded),
        3 => (1usize..40).prop_map(ViewKind::Offset),
    ]
}

fn broken_kind() -> impl Strategy<Value = ViewKind> {
    prop_oneof![Just(ViewKind::BadRank), Just(ViewKind::PastEnd)]
}

/// Places row-major `x` of `shape` into a device buffer as the kind of view asked for (NaN outside the view).
fn place(x: &[f64], shape: &[usize], kind: ViewKind, dtype: DType) -> DeviceTensor {
    let cl = client();
    match kind {
        ViewKind::Contiguous => upload(cl, x, shape, dtype),
        ViewKind::BadRank => {
            let t = upload(cl, x, shape, dtype);
            DeviceTensor { strides: t.strides[1..].to_vec(), ..t }
        }
        ViewKind::PastEnd => {
            let t = upload(cl, x, shape, dtype);
            let s = t.strides.clone();
            t.view(shape, &s, 1)
        }
        ViewKind::Padded | ViewKind::Offset(_) => {
            let off = if let ViewKind::Offset(o) = kind { o } else { 0 };
            // Innermost stride 1; every outer dim padded by 3 elements per row (Padded) or not (Offset).
            let pad = if off == 0 { 3 } else { 0 };
            let mut strides = vec![1usize; shape.len()];
            for i in (0..shape.len().saturating_sub(1)).rev() {
                strides[i] = strides[i + 1] * shape[i + 1] + if i + 1 == shape.len() - 1 { pad } else { 0 };
            }
            let span = shape.iter().zip(&strides).map(|(&n, &s)| (n.max(1) - 1) * s).sum::<usize>() + 1;
            let mut big = vec![f64::NAN; off + span];
            let n: usize = shape.iter().product();
            for (i, &v) in x.iter().enumerate().take(n) {
                let mut rest = i;
                let mut at = off;
                for (dim, &size) in shape.iter().enumerate().rev() {
                    at += (rest % size) * strides[dim];
                    rest /= size;
                }
                big[at] = v;
            }
            upload(cl, &big, &[big.len()], dtype).view(shape, &strides, off)
        }
    }
}

#[derive(Clone, Debug)]
struct AttnCase {
    b: usize,
    lq: usize,
    hkv: usize,
    g: usize,
    d: usize,
    lcap: usize,
    lens: Vec<usize>,
    views: [ViewKind; 3],
    mass: bool,
    dtype: DType,
    seed: u64,
}

fn attn_case() -> impl Strategy<Value = AttnCase> {
    // Mostly valid problems (lengths in range, well-formed views), with one broken view, an out-of-range length
    // or an unsupported head dim now and then.
    let broken = prop::option::weighted(0.2, (0usize..3, broken_kind()));
    (
        1usize..3,
        1usize..3,
        1usize..3,
        prop::sample::select(vec![1usize, 2, 4, 3]),
        prop::sample::select(vec![8usize, 16, 8, 16, 12]),
        1usize..140,
        prop::collection::vec(any::<u32>(), 3),
        [view_kind(), view_kind(), view_kind()],
        broken,
        (any::<bool>(), prop::sample::select(vec![DType::F32, DType::F16])),
        any::<u64>(),
    )
        .prop_map(|(b, lq, hkv, g, d, lcap, raw, mut views, broken, (mass, dtype), seed)| {
            let lens = raw[..b].iter().map(|&r| if r % 10 == 0 { (r / 10) as usize % 150 } else { lq + r as usize % (lcap.saturating_sub(lq) + 1) }).collect();
            if let Some((i, kind)) = broken {
                views[i] = kind;
            }
            AttnCase { b, lq, hkv, g, d, lcap, lens, views, mass, dtype, seed }
        })
}

/// One decode-attention call on fuzzed input: either a typed refusal that the input deserves, or the reference's
/// answer within the derived tolerance.
fn fuzz_attention(c: &AttnCase) {
    let cl = client();
    let hq = c.hkv * c.g;
    let mut rng = Rng(c.seed);
    let (qs, ks) = ([c.b, c.lq, hq, c.d], [c.b, c.hkv, c.lcap, c.d]);
    if !kvsqueeze::attention::dtype_supported(cl, c.dtype) {
        skip(&format!("{:?} fuzz case", c.dtype), "dtype unsupported on this device");
        return;
    }
    // Inputs rounded to the storage dtype: the kernel and every reference see the same values.
    let q = round_to(&rng.vec(qs.iter().product(), 1.5), c.dtype);
    let k = round_to(&rng.vec(ks.iter().product(), 1.5), c.dtype);
    let v = round_to(&rng.vec(ks.iter().product(), 1.0), c.dtype);
    let (qd, kd, vd) = (place(&q, &qs, c.views[0], c.dtype), place(&k, &ks, c.views[1], c.dtype), place(&v, &ks, c.views[2], c.dtype));
    let lens: Vec<u32> = c.lens.iter().map(|&l| l as u32).collect();
    let r = decode_attention(cl, &qd, &kd, &vd, &lens, &DecodeConfig::new().with_mass(c.mass));
    let broken = c.views.iter().any(|v| matches!(v, ViewKind::BadRank | ViewKind::PastEnd));
    let bad_len = c.lens.iter().any(|&l| l < c.lq || l > c.lcap);
    let should_refuse = broken || bad_len || c.d % 8 != 0;
    match r {
        Err(e) => {
            assert!(should_refuse, "a valid input was refused: {e}\n  case: {c:?}");
            match e {
                Error::Layout { .. } => assert!(broken, "{e}: {c:?}"),
                Error::ZeroLength { .. } | Error::LengthBeyondCapacity { .. } => assert!(bad_len, "{e}: {c:?}"),
                Error::UnsupportedHeadDim { .. } => assert!(c.d % 8 != 0, "{e}: {c:?}"),
                other => panic!("unexpected refusal {other}: {c:?}"),
            }
        }
        Ok(out) => {
            assert!(!should_refuse, "an invalid input was accepted: {c:?}");
            let got = out.o.to_host_f64(cl).unwrap();
            let mass = out.mass.map(|m| m.to_host_f64(cl).unwrap());
            for bi in 0..c.b {
                let len = c.lens[bi];
                let tok = |x: &[f64]| -> Vec<f64> {
                    (0..len).flat_map(|j| (0..c.hkv).flat_map(move |h| ((bi * c.hkv + h) * c.lcap + j) * c.d..((bi * c.hkv + h) * c.lcap + j + 1) * c.d)).map(|i| x[i]).collect()
                };
                let qb = &q[bi * c.lq * hq * c.d..][..c.lq * hq * c.d];
                let dims = Dims { lq: c.lq, l: len, hq, hkv: c.hkv, d: c.d };
                let scale = 1.0 / (c.d as f64).sqrt();
                let gold = attention(qb, &tok(&k), &tok(&v), dims, len - c.lq, scale);
                let naive = match c.dtype {
                    DType::F16 => naive_o::<half::f16>(qb, &tok(&k), &tok(&v), dims, len - c.lq, scale),
                    _ => naive_o::<f32>(qb, &tok(&k), &tok(&v), dims, len - c.lq, scale),
                };
                let kernel = &got[bi * c.lq * hq * c.d..][..c.lq * hq * c.d];
                let mag = gold.o.iter().fold(1.0f64, |a, &x| a.max(x.abs()));
                check_tolerance("fuzz o", &format!("{c:?}"), kernel, &naive, &gold.o, 4.0 * eps(c.dtype) * mag);
                if let Some(m) = &mass {
                    for i in 0..c.lq {
                        for h in 0..c.hkv {
                            for j in 0..c.lcap {
                                let want = if j < len { gold.group_mean[(i * c.hkv + h) * len + j] } else { 0.0 };
                                let at = ((bi * c.hkv + h) * c.lq + i) * c.lcap + j;
                                assert!((m[at] - want).abs() <= 1e-5, "fuzz mass {} vs {want} at {at}: {c:?}", m[at]);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The same-dtype naive reference's output (design.md §5's yardstick).
fn naive_o<T: kvsqueeze::reference::Real>(q: &[f64], k: &[f64], v: &[f64], dims: Dims, offset: usize, scale: f64) -> Vec<f64> {
    use kvsqueeze::reference::cast_slice;
    let out = attention(&cast_slice::<f64, T>(q), &cast_slice::<f64, T>(k), &cast_slice::<f64, T>(v), dims, offset, T::of(scale));
    cast_slice::<T, f64>(&out.o)
}

#[derive(Clone, Debug)]
struct CacheCase {
    policy: Policy,
    layout: Layout,
    batch: usize,
    hkv: usize,
    g: usize,
    d: usize,
    steps: usize,
    /// Feed a k of the wrong shape at this step (must be refused, cache unchanged).
    bad_step: Option<usize>,
    seed: u64,
}

fn cache_case() -> impl Strategy<Value = CacheCase> {
    let policies = vec![Policy::Full, Policy::StreamingLlm, Policy::H2o, Policy::Tova, Policy::TreeKv { select_left: false }, Policy::WeightedKv];
    (
        prop::sample::select(policies),
        0usize..3,
        0usize..6,
        0usize..3,
        0usize..3,
        1usize..3,
        prop::sample::select(vec![1usize, 2, 3]),
        prop::sample::select(vec![8usize, 16]),
        1usize..30,
        prop::option::of(0usize..30),
        any::<u64>(),
    )
        .prop_map(|(policy, sinks, middle, recent, batch0, hkv, g, d, steps, bad_step, seed)| CacheCase {
            policy,
            layout: Layout { sinks, middle, recent },
            batch: batch0 + 1,
            hkv,
            g,
            d,
            steps,
            bad_step,
            seed,
        })
}

/// A policy cache on fuzzed configuration and steps: refused exactly when the configuration is invalid; when
/// accepted, every step's output and kept set equal the reference's (per sequence and KV head).
fn fuzz_cache(c: &CacheCase) {
    let cl = client();
    let (b, hkv, d) = (c.batch, c.hkv, c.d);
    let hq = hkv * c.g;
    let cap = c.layout.capacity();
    let needs_middle = matches!(c.policy, Policy::TreeKv { .. } | Policy::WeightedKv);
    let r = PolicyCache::new(cl, PolicyCacheConfig::new(c.policy, c.layout, b, hq, hkv, d, DType::F32));
    let valid = cap > 0 && !(needs_middle && c.layout.middle == 0);
    let mut dev = match r {
        Err(e) => {
            assert!(!valid && matches!(e, Error::Config(_)), "refused {e}: {c:?}");
            return;
        }
        Ok(dev) => {
            assert!(valid, "accepted an invalid layout: {c:?}");
            dev
        }
    };
    let rcfg = PolicyConfig { policy: c.policy, layout: c.layout, rope: None, positions: Positions::CacheRank, scale: 1.0 / (d as f64).sqrt() };
    let mut refs: Vec<RefCache<f32>> = (0..b * hkv).map(|_| RefCache::new(rcfg, d)).collect();
    let mut rng = Rng(c.seed);
    let f32s = |x: &[f64]| -> Vec<f32> { x.iter().map(|&v| v as f32).collect() };
    for t in 0..c.steps {
        // Values exactly representable in f32, so the device and the same-precision reference see the same input.
        let (q, k, v) = (round_to(&rng.vec(b * hq * d, 1.5), DType::F32), round_to(&rng.vec(b * hkv * d, 1.5), DType::F32), round_to(&rng.vec(b * hkv * d, 1.0), DType::F32));
        let (q32, k32, v32) = (f32s(&q), f32s(&k), f32s(&v));
        let up = |x: &[f64], s: &[usize]| upload(cl, x, s, DType::F32);
        if c.policy == Policy::Full && t >= cap {
            assert!(matches!(dev.step(&up(&q, &[b, 1, hq, d]), &up(&k, &[b, hkv, d]), &up(&v, &[b, hkv, d])), Err(Error::LengthBeyondCapacity { .. })));
            return;
        }
        if c.bad_step == Some(t) {
            let r = dev.step(&up(&q, &[b, 1, hq, d]), &up(&k[..hkv * d], &[1, hkv, d]), &up(&v, &[b, hkv, d]));
            assert!(b == 1 || matches!(r, Err(Error::ShapeMismatch { tensor: "k", .. })), "{r:?}: {c:?}");
            if b == 1 {
                // The same shape is valid at B = 1: the step ran, so the reference takes it too.
                let _ = r.unwrap();
                for (h, rc) in refs.iter_mut().enumerate() {
                    let _ = rc.step(&q32[h * c.g * d..][..c.g * d], &k32[h * d..][..d], &v32[h * d..][..d]);
                }
                continue;
            }
        }
        let o = dev.step(&up(&q, &[b, 1, hq, d]), &up(&k, &[b, hkv, d]), &up(&v, &[b, hkv, d])).unwrap_or_else(|e| panic!("step {t}: {e}: {c:?}"));
        let o = o.to_host_f64(cl).unwrap();
        let kept = dev.kept_positions().unwrap();
        for bi in 0..b {
            for h in 0..hkv {
                let head = bi * hkv + h;
                let qs = &q32[(bi * hq + h * c.g) * d..][..c.g * d];
                let want = refs[head].step(qs, &k32[head * d..][..d], &v32[head * d..][..d]).o;
                let got = &o[(bi * hq + h * c.g) * d..][..c.g * d];
                for (a, &w) in got.iter().zip(&want) {
                    let w = w as f64;
                    assert!((a - w).abs() <= 1e-4 * (1.0 + w.abs()), "step {t} seq {bi} head {h}: {a} vs {w}: {c:?}");
                }
                assert_eq!(kept[bi][h], refs[head].kept_positions(), "step {t} seq {bi} head {h}: {c:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn fuzz_decode_attention(c in attn_case()) {
        fuzz_attention(&c);
    }

    #[test]
    fn fuzz_policy_cache(c in cache_case()) {
        fuzz_cache(&c);
    }
}

/// An adapter that cannot bind a kernel's storage buffers is reported in one typed line naming the kernel, before
/// anything is allocated or launched (`tensor::check_bindings_against`, which every op and cache constructor runs
/// with the device's limit). WebGPU's default adapter limit (8, 7 after cubecl's scalar buffer) is still below our
/// widest kernels; every kernel fits Mesa's OpenGL (16, so 15).
#[test]
fn binding_limits_are_reported_up_front() {
    use kvsqueeze::tensor::check_bindings_against;
    // An adapter with 4 free bindings (below WebGPU's default) cannot run decode attention's split (7 slices).
    let e = check_bindings_against(4, &["fourier_transform", "decode_split"]).unwrap_err();
    assert!(matches!(e, Error::DeviceLimit(_)) && e.to_string().contains("`decode_split` binds 8") && e.to_string().contains("allows 5"), "{e}");
    assert!(check_bindings_against(4, &["fourier_transform", "decode_combine", "find_non_finite"]).is_ok());
    let all: Vec<&str> = kvsqueeze_kernels::BINDINGS.iter().map(|&(n, _)| n).collect();
    check_bindings_against(7, &all).expect("every kernel binds within WebGPU's default of 8 storage buffers");
    check_bindings_against(15, &all).expect("every kernel binds within OpenGL's 16 storage buffers");
}
