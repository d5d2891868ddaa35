//! Test fixture: a handler that never returns, for timeouts, cancellation and
//! epoch interruption. Input `{"after_ms": N}` is accepted and ignored; an empty
//! input works too. With `{"sleep": true}` it waits in a host call (wasi poll)
//! instead of running wasm code. Its `init` waits a moment in a host call too,
//! so a new instance after a cancelled task shows whether that cancel leaks
//! into `init`.

use beamlet_sdk::{Context, Error};
use serde::Deserialize;

#[derive(Deserialize)]
struct Input {
    #[serde(default)]
    after_ms: Option<u64>,
    #[serde(default)]
    sleep: bool,
}

fn spin(ctx: &Context, input: Option<Input>) -> Result<(), Error> {
    let after_ms = input.as_ref().and_then(|i| i.after_ms);
    if input.is_some_and(|i| i.sleep) {
        println!("sleeping forever (task {})", ctx.task_id);
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    println!("spinning forever (task {}, after_ms {after_ms:?})", ctx.task_id);
    let mut n = 0u64;
    loop {
        // black_box keeps the loop (and its epoch checks) from being optimized away.
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

fn warm_up() -> Result<(), Error> {
    std::thread::sleep(std::time::Duration::from_millis(20));
    Ok(())
}

beamlet_sdk::export!(spin, init = warm_up);
