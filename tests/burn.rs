//! `kvsqueeze::burn` (feature `burn`): burn's CubeCL tensors and `DeviceTensor` share buffers both ways — decode
//! attention over burn tensors (one of them a view at an offset into a fused buffer) equals the same call over our
//! own tensors bit for bit, an output written into a burn tensor is read back through burn's handle, nothing is
//! allocated, uploaded or launched by a conversion, and malformed conversions are refused.
#![cfg(feature = "burn")]

mod common;

use burn_backend::DType as BurnDType;
use burn_cubecl::tensor::CubeTensor;
use common::*;
use cubecl::zspace::metadata::Metadata;
use kvsqueeze::attention::{decode_attention, decode_attention_into, DecodeConfig, DecodeOutput};
use kvsqueeze::burn::{from_burn, to_burn};
use kvsqueeze::tensor::{contiguous_strides, device_allocations, device_launches};
use kvsqueeze::{DType, DeviceTensor, Error};

#[test]
fn burn_tensors_are_views_of_the_same_buffers() {
    let cl = client();
    let device = kvsqueeze::runtime::device().expect("the device the client came from");
    let (b, hq, hkv, d, lcap) = (2, 8, 2, 64, 77);
    let mut rng = Rng(9173);
    // q as a view into a fused buffer [B, 1, 3·Hq·D] (q, then two other projections), at an element offset that is
    // a whole number of the device's binding alignment, so that burn can hold it as a handle offset.
    let align = (cl.properties().memory.alignment as usize / 4).max(1);
    let lead = align * 2;
    let fused_len = lead + b * 3 * hq * d;
    let fused = upload(cl, &rng.vec(fused_len, 1.5), &[fused_len], DType::F32);
    let q = fused.view(&[b, 1, hq, d], &[3 * hq * d, 3 * hq * d, d, 1], lead);
    let k = upload(cl, &rng.vec(b * hkv * lcap * d, 1.5), &[b, hkv, lcap, d], DType::F32);
    let v = upload(cl, &rng.vec(b * hkv * lcap * d, 1.0), &[b, hkv, lcap, d], DType::F32);
    let lens = [77u32, 13];
    let cfg = DecodeConfig::new().with_lse(true);
    let want = decode_attention(cl, &q, &k, &v, &lens, &cfg).unwrap();

    let (allocs, launches) = (device_allocations(), device_launches());
    let (bq, bk, bv) = (to_burn(&device, &q).unwrap(), to_burn(&device, &k).unwrap(), to_burn(&device, &v).unwrap());
    let (q2, k2, v2) = (from_burn(&bq).unwrap(), from_burn(&bk).unwrap(), from_burn(&bv).unwrap());
    assert_eq!((device_allocations(), device_launches()), (allocs, launches), "a conversion allocated, uploaded or launched");
    assert_eq!(bq.meta.shape().to_vec(), vec![b, 1, hq, d]);
    assert_eq!(bq.meta.strides().to_vec(), vec![3 * hq * d, 3 * hq * d, d, 1]);
    assert!(k2.same_buffer(&k) && v2.same_buffer(&v), "round trip keeps the buffer");
    assert!(q2.offset == 0 && q2.buffer_len == fused_len - lead, "the offset view came back as a handle offset");

    let got = decode_attention(&bq.client, &q2, &k2, &v2, &lens, &cfg).unwrap();
    let (wo, go) = (want.o.to_host_f64(cl).unwrap(), got.o.to_host_f64(cl).unwrap());
    let (wl, gl) = (want.lse.unwrap().to_host_f64(cl).unwrap(), got.lse.unwrap().to_host_f64(cl).unwrap());
    assert!(wo == go && wl == gl, "burn tensors give other outputs than the same buffers as our own");
    assert!(wo.iter().all(|x| x.is_finite()) && wo.iter().any(|&x| x != 0.0), "a real output");

    // Our op writes into a burn-owned output; burn reads the result through its own handle.
    let o_burn = to_burn(&device, &poisoned(cl, &[b, 1, hq, d], DType::F32)).unwrap();
    let mut out = DecodeOutput::new(from_burn(&o_burn).unwrap(), None, None);
    decode_attention_into(&o_burn.client, &q2, &k2, &v2, &lens, &DecodeConfig::new(), &mut out).unwrap();
    let bytes = o_burn.client.read_one(o_burn.handle.clone()).unwrap();
    let seen: Vec<f64> = bytemuck::pod_collect_to_vec::<u8, f32>(&bytes).into_iter().map(f64::from).collect();
    assert!(seen == wo, "burn does not see what our op wrote into its tensor");

    // Refusals: a dtype we do not store, a view past its buffer, an offset the device cannot bind.
    let meta = |shape: &[usize]| Metadata::new(shape.to_vec(), contiguous_strides(shape));
    let i64_t = CubeTensor::new(bk.client.clone(), bk.handle.clone(), meta(&[4]), device.clone(), BurnDType::I64);
    assert!(matches!(from_burn(&i64_t), Err(Error::Layout { .. })));
    let long = CubeTensor::new(bk.client.clone(), bk.handle.clone(), meta(&[b * hkv * lcap * d + 1]), device.clone(), BurnDType::F32);
    assert!(matches!(from_burn(&long), Err(Error::Layout { .. })));
    if align > 1 {
        let odd = fused.view(&[4], &[1], 1);
        assert!(matches!(to_burn(&device, &odd), Err(Error::Layout { .. })));
    } else {
        skip("misaligned offset refusal", "this device binds any element offset");
    }
    let past = DeviceTensor { shape: vec![fused_len + 1], strides: vec![1], ..fused.clone() };
    assert!(matches!(to_burn(&device, &past), Err(Error::Layout { .. })));
}
