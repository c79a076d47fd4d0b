//! A multilayer perceptron (Linear -> ReLU ... -> Linear) with seeded weights: the smallest model that exercises
//! every linear precision, dynamic batch sizes and external weight data. The main job and the tests build it.
use crate::models::qdq::{LinearWeights, linear};
use crate::onnx::{Dim, GraphBuilder, Value, proto::ModelProto};
use crate::quant::LinearPrecision;
use anyhow::Result;

#[derive(Clone, Debug)]
pub struct MlpConfig {
    pub input: usize,
    pub hidden: usize,
    pub output: usize,
    /// Number of Linear layers (at least 1).
    pub layers: usize,
    /// Batch dimension: fixed, or symbolic (dynamic, needs an optimization profile).
    pub batch: Dim,
    pub precision: LinearPrecision,
    pub seed: u64,
}

impl Default for MlpConfig {
    fn default() -> Self {
        Self {
            input: 64,
            hidden: 128,
            output: 32,
            layers: 3,
            batch: Dim::Fixed(4),
            precision: LinearPrecision::F32,
            seed: 0,
        }
    }
}

/// splitmix64: deterministic weights without a dependency.
struct SplitMix(u64);
impl SplitMix {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

impl MlpConfig {
    /// Bytes of weights in f32.
    pub fn weight_bytes(&self) -> u64 {
        self.dims()
            .windows(2)
            .map(|w| (w[0] * w[1] + w[1]) as u64 * 4)
            .sum()
    }

    fn dims(&self) -> Vec<usize> {
        let mut d = vec![self.input];
        d.extend(std::iter::repeat_n(
            self.hidden,
            self.layers.saturating_sub(1),
        ));
        d.push(self.output);
        d
    }

    pub fn graph(&self) -> Result<ModelProto> {
        let mut g = GraphBuilder::new("mlp", self.precision.min_opset());
        if self.precision == LinearPrecision::Nvfp4 {
            g.use_domain("trt", 1);
        }
        let float = crate::models::qdq::float_type(self.precision);
        let mut x: Value = g.input(
            "x",
            float,
            vec![self.batch.clone(), Dim::Fixed(self.input as i64)],
        )?;
        let mut rng = SplitMix(self.seed);
        let dims = self.dims();
        for (i, w) in dims.windows(2).enumerate() {
            let (k, n) = (w[0], w[1]);
            // Uniform(-1, 1) / sqrt(k) keeps activations of order one through the layers.
            let s = 1.0 / (k as f32).sqrt();
            let weight: Vec<f32> = (0..n * k).map(|_| rng.next_f32() * s).collect();
            let bias: Vec<f32> = (0..n).map(|_| rng.next_f32() * 0.1).collect();
            let lw = LinearWeights {
                weight: &weight,
                bias: Some(&bias),
                out_features: n,
                in_features: k,
            };
            x = linear(&mut g, &format!("layers.{i}"), &x, &lw, self.precision, 4.0)?;
            if i + 2 < dims.len() {
                x = g.op(
                    "Relu",
                    &format!("layers.{i}/relu"),
                    &[&x],
                    vec![],
                    float,
                    x.shape.clone(),
                )?;
            }
        }
        let y = g.op("Identity", "y", &[&x], vec![], float, x.shape.clone())?;
        g.output(&y);
        Ok(g.finish())
    }
}
