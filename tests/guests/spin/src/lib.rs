//! Test fixture: a handler that never returns, for timeouts, cancellation and
//! epoch interruption. Input `{"after_ms": N}` is accepted and ignored; an empty
//! input works too.

use beamlet_sdk::{Context, Error};
use serde::Deserialize;

#[derive(Deserialize)]
struct Input {
    #[serde(default)]
    after_ms: Option<u64>,
}

fn spin(ctx: &Context, input: Option<Input>) -> Result<(), Error> {
    let after_ms = input.and_then(|i| i.after_ms);
    println!("spinning forever (task {}, after_ms {after_ms:?})", ctx.task_id);
    let mut n = 0u64;
    loop {
        // black_box keeps the loop (and its epoch checks) from being optimized away.
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

beamlet_sdk::export!(spin);
