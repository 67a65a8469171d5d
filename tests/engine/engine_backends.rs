//! The engine's own CPU forward against candle's on the real SmolLM2: the same
//! tokens give logits that agree (both quantise, differently, so up to a
//! tolerance), and the same top token, for one prefill chunk and for the
//! decode steps after it.
#![cfg(feature = "node")]

use crate::engine_support;

use candle_core::Device;
use sgl::engine::model::{self, KvCache, Model, StepItem, WeightFormat};

fn logits(m: &Model, steps: &[&[u32]]) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(m, 64).expect("cache");
    let mut out = Vec::new();
    for toks in steps {
        let mut items = [StepItem {
            tokens: toks,
            cache: &mut cache,
            want_logits: true,
        }];
        let l = m.forward(&mut items).expect("forward").expect("logits");
        out.push(model::row(&l, 0).expect("row"));
    }
    out
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
        .0
}

#[test]
fn cpu_forward_agrees_with_candle() {
    let Some(path) = engine_support::model_path() else {
        return;
    };
    let (reference, _) =
        Model::load_gguf(&path, &Device::Cpu, WeightFormat::Native, Some(256)).expect("candle");
    // A chat prompt prefix, then three decode steps.
    let prompt: Vec<u32> = vec![
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308,
    ];
    let steps: Vec<&[u32]> = vec![&prompt, &[28], &[1242], &[3458]];
    let want = logits(&reference, &steps);
    for format in [WeightFormat::Auto, WeightFormat::Q8_0] {
        let (m, _) = Model::load_gguf(&path, &Device::Cpu, format, Some(256)).expect("cpu");
        let got = logits(&m, &steps);
        for (s, (g, w)) in got.iter().zip(&want).enumerate() {
            let max_err = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let spread = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            eprintln!("{format:?} step {s}: max |diff| {max_err} (logit scale {spread})");
            assert_eq!(
                argmax(g),
                argmax(w),
                "{format:?} step {s}: top token differs"
            );
            assert!(max_err < 0.1 * spread, "{format:?} step {s}: {max_err}");
        }
    }
}

#[test]
fn q4_1_kernel_agrees_with_candle_on_real_weights() {
    use candle_core::quantized::{gguf_file, QMatMul};
    use candle_core::{Module, Tensor};
    use sgl::engine::cpu::pool::Pool;
    use sgl::engine::cpu::qmat::{matmul, ActQ, QMatrix};
    let Some(path) = engine_support::model_path() else {
        return;
    };
    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let qt = content
        .tensor(&mut f, "blk.0.ffn_down.weight", &Device::Cpu)
        .unwrap();
    let (n, k) = qt.shape().dims2().unwrap();
    let raw = qt.data().unwrap().to_vec();
    let ours = QMatrix::from_gguf_q4_1(&raw, n, k).unwrap();
    let wf = qt
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let x: Vec<f32> = (0..k)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let exact: Vec<f32> = (0..n)
        .map(|j| (0..k).map(|i| wf[j * k + i] * x[i]).sum())
        .collect();
    let mm = QMatMul::from_qtensor(qt).unwrap();
    let xt = Tensor::from_vec(x.clone(), (1, k), &Device::Cpu).unwrap();
    let c = mm
        .forward(&xt)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut a = ActQ::default();
    a.quantize(&x, 1, k, ours.format());
    let mut y = vec![0f32; n];
    matmul(&ours, &a, &mut y, &Pool::new(2));
    let err = |v: &[f32]| {
        v.iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    eprintln!("n {n} k {k}: candle err {} ours err {}", err(&c), err(&y));
    // The same weights as candle reads them, and no worse than candle's own
    // 8-bit-activation matmul against the exact f32 product.
    let mut wr = vec![0f32; k];
    for j in [0, 3, n - 1] {
        ours.dequantize_row(j, &mut wr);
        assert_eq!(&wr[..], &wf[j * k..(j + 1) * k], "row {j}");
    }
    assert!(
        err(&y) <= 1.5 * err(&c) + 1e-3,
        "ours {} candle {}",
        err(&y),
        err(&c)
    );
}

#[test]
fn chunked_prefill_gives_the_same_logits() {
    let Some(path) = engine_support::model_path() else {
        return;
    };
    let prompt: Vec<u32> = (0..40).map(|i| 100 + i * 37).collect();
    for format in [WeightFormat::Auto, WeightFormat::Native] {
        let (m, _) = Model::load_gguf(&path, &Device::Cpu, format, Some(256)).expect("load");
        let whole = logits(&m, &[&prompt]).pop().unwrap();
        let chunks: Vec<&[u32]> = prompt.chunks(16).collect();
        let parts = logits(&m, &chunks).pop().unwrap();
        let diff = whole
            .iter()
            .zip(&parts)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{format:?}: chunked vs whole max diff {diff}");
        if format == WeightFormat::Auto {
            assert_eq!(whole, parts, "the CPU forward is chunk-independent");
        }
    }
}
