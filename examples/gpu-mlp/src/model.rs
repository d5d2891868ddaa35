//! The MLP itself, in plain Rust: seeded weights, seeded inputs, and the
//! reference forward pass the GPU path is checked against.

/// Layer widths: 64 inputs, two hidden layers of 256, 10 classes.
pub const SIZES: [usize; 4] = [64, 256, 256, 10];

/// Inputs per sample.
pub const INPUTS: usize = SIZES[0];

/// Classes, the length of every output.
pub const CLASSES: usize = SIZES[SIZES.len() - 1];

/// The weights' seed: every worker of every replica builds the same model.
pub const WEIGHT_SEED: u64 = 0x0062_6561_6d6c_6574;

/// splitmix64 (Steele, Lea and Flood): tiny, fast and the same everywhere,
/// which is all seeded test data needs.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-bound, bound), from the top 24 bits (exact in f32).
    pub fn uniform(&mut self, bound: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u32 << 24) as f32;
        (2.0 * unit - 1.0) * bound
    }
}

/// One dense layer: `y = w * x + bias`, `w` column-major `outputs` x `inputs`.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    pub inputs: usize,
    pub outputs: usize,
    /// Element (o, i) at `o + i * outputs`.
    pub weights: Vec<f32>,
    pub bias: Vec<f32>,
}

/// Dense layers with ReLU between them and a softmax at the end.
#[derive(Debug, Clone, PartialEq)]
pub struct Mlp {
    pub layers: Vec<Layer>,
}

impl Mlp {
    /// Weights and biases uniform in ±1/sqrt(fan_in) (PyTorch's default for
    /// `nn.Linear`), drawn layer by layer, weights before bias, from one stream.
    pub fn generate(sizes: &[usize], seed: u64) -> Mlp {
        let mut rng = SplitMix64::new(seed);
        let layers = sizes
            .windows(2)
            .map(|pair| {
                let (inputs, outputs) = (pair[0], pair[1]);
                let bound = 1.0 / (inputs as f32).sqrt();
                let weights = (0..inputs * outputs).map(|_| rng.uniform(bound)).collect();
                let bias = (0..outputs).map(|_| rng.uniform(bound)).collect();
                Layer { inputs, outputs, weights, bias }
            })
            .collect();
        Mlp { layers }
    }

    /// The example's model: [`SIZES`] from [`WEIGHT_SEED`].
    pub fn example() -> Mlp {
        Mlp::generate(&SIZES, WEIGHT_SEED)
    }

    pub fn inputs(&self) -> usize {
        self.layers[0].inputs
    }

    pub fn outputs(&self) -> usize {
        self.layers[self.layers.len() - 1].outputs
    }

    /// The forward pass on the CPU, in the order the GPU path runs it: for a
    /// column-major `inputs` x `batch` matrix, the column-major `outputs` x
    /// `batch` matrix of class probabilities.
    pub fn forward(&self, x: &[f32], batch: usize) -> Vec<f32> {
        assert_eq!(x.len(), self.inputs() * batch, "x is inputs x batch");
        let mut act = x.to_vec();
        for (n, layer) in self.layers.iter().enumerate() {
            let mut out = vec![0.0f32; layer.outputs * batch];
            for col in 0..batch {
                let x_col = &act[col * layer.inputs..][..layer.inputs];
                let y_col = &mut out[col * layer.outputs..][..layer.outputs];
                for (i, &xi) in x_col.iter().enumerate() {
                    let w_col = &layer.weights[i * layer.outputs..][..layer.outputs];
                    for (y, &w) in y_col.iter_mut().zip(w_col) {
                        *y += w * xi;
                    }
                }
                for (y, &b) in y_col.iter_mut().zip(&layer.bias) {
                    *y += b;
                }
                if n + 1 < self.layers.len() {
                    y_col.iter_mut().for_each(|y| *y = y.max(0.0));
                } else {
                    softmax(y_col);
                }
            }
            act = out;
        }
        act
    }
}

/// In place, shifted by the maximum so large logits do not overflow.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    x.iter_mut().for_each(|v| *v /= sum);
}

/// The input vector for `seed`: [`INPUTS`] values uniform in [-1, 1).
pub fn input_from_seed(seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..INPUTS).map(|_| rng.uniform(1.0)).collect()
}

/// Index of the largest value (the first, on ties).
pub fn argmax(x: &[f32]) -> usize {
    x.iter().enumerate().fold(0, |best, (i, &v)| if v > x[best] { i } else { best })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_its_published_sequence() {
        // The first outputs for seed 1234567, as listed with the reference C code.
        let mut rng = SplitMix64::new(1234567);
        assert_eq!(rng.next_u64(), 6457827717110365317);
        assert_eq!(rng.next_u64(), 3203168211198807973);
    }

    #[test]
    fn weights_are_deterministic_and_bounded() {
        let a = Mlp::example();
        assert_eq!(a, Mlp::example(), "same seed, same model");
        assert_ne!(a, Mlp::generate(&SIZES, WEIGHT_SEED + 1));
        let shapes: Vec<_> = a.layers.iter().map(|l| (l.inputs, l.outputs, l.weights.len(), l.bias.len())).collect();
        assert_eq!(shapes, [(64, 256, 16384, 256), (256, 256, 65536, 256), (256, 10, 2560, 10)]);
        for layer in &a.layers {
            let bound = 1.0 / (layer.inputs as f32).sqrt();
            assert!(layer.weights.iter().chain(&layer.bias).all(|w| (-bound..bound).contains(w)));
            let mean = layer.weights.iter().sum::<f32>() / layer.weights.len() as f32;
            assert!(mean.abs() < bound / 10.0, "roughly centred: {mean}");
        }
    }

    #[test]
    fn seeded_inputs_are_deterministic() {
        assert_eq!(input_from_seed(7), input_from_seed(7));
        assert_ne!(input_from_seed(7), input_from_seed(8));
        assert_eq!(input_from_seed(7).len(), INPUTS);
        assert!(input_from_seed(7).iter().all(|v| (-1.0..1.0).contains(v)));
    }

    #[test]
    fn forward_gives_probabilities() {
        let mlp = Mlp::example();
        let x: Vec<f32> = (0..3).flat_map(input_from_seed).collect();
        let y = mlp.forward(&x, 3);
        assert_eq!(y.len(), CLASSES * 3);
        for col in y.chunks(CLASSES) {
            let sum: f32 = col.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "{sum}");
            assert!(col.iter().all(|p| *p > 0.0 && *p < 1.0));
        }
        assert_ne!(y[..CLASSES], y[CLASSES..2 * CLASSES], "different inputs, different outputs");
    }

    #[test]
    fn forward_batches_column_by_column() {
        let mlp = Mlp::example();
        let (a, b) = (input_from_seed(1), input_from_seed(2));
        let both = mlp.forward(&[a.clone(), b.clone()].concat(), 2);
        assert_eq!(both, [mlp.forward(&a, 1), mlp.forward(&b, 1)].concat());
    }

    #[test]
    fn forward_is_column_major_relu_then_softmax() {
        // 2 -> 2 -> 2 by hand: w1 = [[1, 2], [-3, 4]] (rows), stored by column.
        let mlp = Mlp {
            layers: vec![
                Layer { inputs: 2, outputs: 2, weights: vec![1.0, -3.0, 2.0, 4.0], bias: vec![0.5, -10.0] },
                Layer { inputs: 2, outputs: 2, weights: vec![1.0, 0.0, 0.0, 1.0], bias: vec![0.0, 0.0] },
            ],
        };
        // h = relu([1*1 + 2*1 + 0.5, -3*1 + 4*1 - 10]) = [3.5, 0]; softmax([3.5, 0]).
        let y = mlp.forward(&[1.0, 1.0], 1);
        let e = 3.5f32.exp();
        assert!((y[0] - e / (e + 1.0)).abs() < 1e-6 && (y[1] - 1.0 / (e + 1.0)).abs() < 1e-6, "{y:?}");
    }

    #[test]
    fn softmax_survives_large_logits_and_argmax_takes_the_first_maximum() {
        let mut x = [1000.0, 1000.0, -1000.0];
        softmax(&mut x);
        assert_eq!(x, [0.5, 0.5, 0.0]);
        assert_eq!(argmax(&x), 0);
        assert_eq!(argmax(&[0.1, 0.7, 0.2]), 1);
    }
}
