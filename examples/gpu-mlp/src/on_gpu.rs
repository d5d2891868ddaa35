//! The same forward pass as [`Mlp::forward`], on the replica's GPU.

use beamlet_sdk::gpu::{self, Buffer, Gemm, GpuError};

use crate::model::Mlp;

/// The model's weights in device memory, uploaded once per worker.
pub struct GpuMlp {
    layers: Vec<GpuLayer>,
}

struct GpuLayer {
    inputs: u64,
    outputs: u64,
    /// Column-major `outputs` x `inputs`, as in [`crate::model::Layer`].
    weights: Buffer<f32>,
    bias: Buffer<f32>,
}

impl GpuMlp {
    pub fn upload(mlp: &Mlp) -> Result<GpuMlp, GpuError> {
        let layers = mlp
            .layers
            .iter()
            .map(|layer| {
                Ok(GpuLayer {
                    inputs: layer.inputs as u64,
                    outputs: layer.outputs as u64,
                    weights: Buffer::from_slice(&layer.weights)?,
                    bias: Buffer::from_slice(&layer.bias)?,
                })
            })
            .collect::<Result<_, GpuError>>()?;
        Ok(GpuMlp { layers })
    }

    /// Class probabilities for the column-major `inputs` x `batch` matrix `x`:
    /// per layer one GEMM, the bias, then ReLU or (last) a softmax per column.
    pub fn forward(&self, x: &[f32], batch: usize) -> Result<Vec<f32>, GpuError> {
        let batch = batch as u64;
        let mut act = Buffer::from_slice(x)?;
        for (n, layer) in self.layers.iter().enumerate() {
            let out = Buffer::<f32>::zeros(layer.outputs * batch)?;
            Gemm::new(layer.outputs, batch, layer.inputs).run(&layer.weights, &act, &out)?;
            gpu::add_bias(&out, &layer.bias, layer.outputs, batch)?;
            if n + 1 < self.layers.len() {
                gpu::relu(&out)?;
            } else {
                gpu::softmax_columns(&out, layer.outputs, batch)?;
            }
            act = out;
        }
        act.to_vec()
    }
}
