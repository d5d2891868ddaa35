//! A small MLP (64 -> 256 -> 256 -> 10, ReLU, softmax) on the replica's GPU.
//!
//! The weights come from a fixed seed and are uploaded once per worker in
//! `init`; each task uploads its inputs, runs three GEMMs with their biases and
//! activations, and reads the class probabilities back. The same code runs on
//! CUDA and on `beamlet serve --gpu-backend cpu`. With `"reference": true` the
//! guest answers from a plain-Rust forward pass instead, so a test can compare
//! the two.

pub mod model;
mod on_gpu;

use std::sync::OnceLock;

use beamlet_sdk::gpu::Device;
use beamlet_sdk::{Context, Error};
use serde::{Deserialize, Serialize};

use crate::model::{CLASSES, INPUTS, Mlp, argmax, input_from_seed};
use crate::on_gpu::GpuMlp;

/// Largest batch one task may send.
pub const MAX_BATCH: usize = 1024;

/// The task's input: exactly one of `seed`, `input`, `seeds`, `inputs`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// One sample generated from this seed.
    pub seed: Option<u64>,
    /// One sample of 64 numbers.
    pub input: Option<Vec<f32>>,
    /// A batch, one sample per seed.
    pub seeds: Option<Vec<u64>>,
    /// A batch of samples of 64 numbers each.
    pub inputs: Option<Vec<Vec<f32>>>,
    /// Answer from the plain-Rust forward pass, not the GPU.
    #[serde(default)]
    pub reference: bool,
}

/// `{"output", "argmax", "backend"}` for one sample, `{"outputs", "argmax",
/// "backend"}` for a batch.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Output {
    One { output: Vec<f32>, argmax: usize, backend: String },
    Batch { outputs: Vec<Vec<f32>>, argmax: Vec<usize>, backend: String },
}

/// The samples of one task: column-major `INPUTS` x `batch`.
#[derive(Debug, PartialEq)]
pub struct Samples {
    pub x: Vec<f32>,
    pub batch: usize,
    /// Whether the caller sent one sample (`seed`/`input`) rather than a batch.
    pub single: bool,
}

impl Input {
    /// Checks the input and lays the samples out as the model's columns.
    pub fn samples(&self) -> Result<Samples, Error> {
        let given = [self.seed.is_some(), self.input.is_some(), self.seeds.is_some(), self.inputs.is_some()];
        if given.iter().filter(|&&g| g).count() != 1 {
            return Err(Error::bad_input(format!(
                "send exactly one of `seed` (a number), `input` ({INPUTS} numbers), `seeds` (a list of numbers) \
                 or `inputs` (a list of lists of {INPUTS} numbers)"
            )));
        }
        // Checked before any sample is made: a million seeds would make
        // 256 MB of samples only to be refused.
        let batch = match self {
            Input { seeds: Some(seeds), .. } => seeds.len(),
            Input { inputs: Some(inputs), .. } => inputs.len(),
            _ => 1,
        };
        if batch == 0 || batch > MAX_BATCH {
            return Err(Error::bad_input(format!("a batch holds 1 to {MAX_BATCH} samples, not {batch}")));
        }
        let (columns, single): (Vec<Vec<f32>>, bool) = match self {
            Input { seed: Some(seed), .. } => (vec![input_from_seed(*seed)], true),
            Input { input: Some(input), .. } => (vec![input.clone()], true),
            Input { seeds: Some(seeds), .. } => (seeds.iter().map(|&s| input_from_seed(s)).collect(), false),
            Input { inputs: Some(inputs), .. } => (inputs.clone(), false),
            _ => unreachable!("exactly one field is set"),
        };
        if let Some((i, column)) = columns.iter().enumerate().find(|(_, c)| c.len() != INPUTS) {
            let which = if single { "`input`".to_string() } else { format!("`inputs[{i}]`") };
            return Err(Error::bad_input(format!("{which} must hold {INPUTS} numbers, not {}", column.len())));
        }
        Ok(Samples { batch: columns.len(), x: columns.concat(), single })
    }
}

/// What every task of a worker shares.
struct Model {
    mlp: Mlp,
    gpu: GpuMlp,
    /// `"cuda"` or `"cpu"`.
    backend: String,
}

static MODEL: OnceLock<Model> = OnceLock::new();

fn setup() -> Result<(), Error> {
    let device = Device::info().map_err(|err| {
        Error::failed(format!(
            "gpu-mlp needs a GPU; deploy it with examples/gpu-mlp/beamlet.toml (gpu = \"any\"): {err}"
        ))
    })?;
    let mlp = Mlp::example();
    let gpu = GpuMlp::upload(&mlp)
        .map_err(|err| Error::failed(format!("failed to upload the MLP's weights to the GPU: {err}")))?;
    println!("gpu-mlp: weights on {} ({} backend)", device.name, device.backend);
    // A second init of the same instance keeps the first model.
    let _ = MODEL.set(Model { mlp, gpu, backend: device.backend });
    Ok(())
}

fn classify(_ctx: &Context, input: Input) -> Result<Output, Error> {
    let samples = input.samples()?;
    let model = MODEL.get().ok_or_else(|| Error::failed("the model is not loaded: init did not run"))?;
    let (probs, backend) = if input.reference {
        (model.mlp.forward(&samples.x, samples.batch), "reference".to_string())
    } else {
        (model.gpu.forward(&samples.x, samples.batch)?, model.backend.clone())
    };
    Ok(output(probs, samples.single, backend))
}

fn output(probs: Vec<f32>, single: bool, backend: String) -> Output {
    let mut outputs: Vec<Vec<f32>> = probs.chunks(CLASSES).map(<[f32]>::to_vec).collect();
    let argmaxes: Vec<usize> = outputs.iter().map(|o| argmax(o)).collect();
    if single {
        Output::One { output: outputs.remove(0), argmax: argmaxes[0], backend }
    } else {
        Output::Batch { outputs, argmax: argmaxes, backend }
    }
}

beamlet_sdk::export!(classify, init = setup);

#[cfg(test)]
mod tests {
    use beamlet_sdk::ErrorKind;

    use super::*;

    fn parse(json: &str) -> Result<Samples, Error> {
        serde_json::from_str::<Input>(json).unwrap().samples()
    }

    fn bad_input(json: &str) -> String {
        let err = parse(json).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadInput, "{json}");
        err.message().to_string()
    }

    #[test]
    fn one_sample_from_a_seed_or_numbers() {
        let from_seed = parse(r#"{"seed": 3}"#).unwrap();
        assert_eq!(from_seed, Samples { x: input_from_seed(3), batch: 1, single: true });
        let numbers = serde_json::to_string(&input_from_seed(3)).unwrap();
        assert_eq!(parse(&format!(r#"{{"input": {numbers}, "reference": true}}"#)).unwrap(), from_seed);
    }

    #[test]
    fn batches_are_laid_out_column_by_column() {
        let samples = parse(r#"{"seeds": [1, 2, 3]}"#).unwrap();
        assert_eq!((samples.batch, samples.single), (3, false));
        assert_eq!(samples.x, [input_from_seed(1), input_from_seed(2), input_from_seed(3)].concat());
        let inputs = format!("[{0}, {0}]", serde_json::to_string(&vec![0.5f32; INPUTS]).unwrap());
        assert_eq!(parse(&format!(r#"{{"inputs": {inputs}}}"#)).unwrap().batch, 2);
    }

    #[test]
    fn exactly_one_field() {
        for json in [r#"{}"#, r#"{"seed": 1, "seeds": [2]}"#, r#"{"reference": true}"#] {
            assert!(bad_input(json).starts_with("send exactly one of `seed`"), "{json}");
        }
    }

    #[test]
    fn wrong_lengths_and_sizes_are_named() {
        assert_eq!(bad_input(r#"{"input": [1, 2, 3]}"#), "`input` must hold 64 numbers, not 3");
        let one = serde_json::to_string(&vec![0.0f32; INPUTS]).unwrap();
        assert_eq!(bad_input(&format!(r#"{{"inputs": [{one}, [1]]}}"#)), "`inputs[1]` must hold 64 numbers, not 1");
        assert_eq!(bad_input(r#"{"seeds": []}"#), "a batch holds 1 to 1024 samples, not 0");
        let many = serde_json::to_string(&vec![1; MAX_BATCH + 1]).unwrap();
        assert_eq!(bad_input(&format!(r#"{{"seeds": {many}}}"#)), "a batch holds 1 to 1024 samples, not 1025");
    }

    #[test]
    fn unknown_fields_do_not_decode() {
        assert!(serde_json::from_str::<Input>(r#"{"seed": 1, "sed": 2}"#).is_err());
    }

    #[test]
    fn output_shapes() {
        let probs: Vec<f32> = (0..2 * CLASSES).map(|i| if i == 3 || i == CLASSES + 7 { 0.9 } else { 0.01 }).collect();
        let one = serde_json::to_value(output(probs[..CLASSES].to_vec(), true, "cpu".into())).unwrap();
        assert_eq!(one["argmax"], 3);
        assert_eq!(one["backend"], "cpu");
        assert_eq!(one["output"].as_array().unwrap().len(), CLASSES);
        let batch = serde_json::to_value(output(probs, false, "cuda".into())).unwrap();
        assert_eq!(batch["argmax"], serde_json::json!([3, 7]));
        assert_eq!(batch["outputs"].as_array().unwrap().len(), 2);
    }
}
