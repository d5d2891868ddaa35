//! Test fixture: allocates `{"mib": N}` MiB in 1 MiB chunks, all alive at once,
//! and returns `{"allocated_mib": N}`. Past the worker's memory limit the
//! allocation fails, which aborts: a trap.

use beamlet_sdk::{Context, Error};
use serde::{Deserialize, Serialize};

const MIB: usize = 1 << 20;

#[derive(Deserialize)]
struct Input {
    mib: u64,
}

#[derive(Serialize)]
struct Output {
    allocated_mib: u64,
}

fn hog(_ctx: &Context, input: Input) -> Result<Output, Error> {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    for _ in 0..input.mib {
        // Nonzero bytes so every page is really written, not just reserved.
        chunks.push(std::hint::black_box(vec![0xA5; MIB]));
    }
    let allocated_mib = std::hint::black_box(&chunks).len() as u64;
    println!("holding {allocated_mib} MiB");
    Ok(Output { allocated_mib })
}

beamlet_sdk::export!(hog);
