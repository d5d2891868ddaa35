//! Sleeps for the requested time and says who did it and when, which makes
//! workers running tasks side by side easy to see.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use beamlet_sdk::{Context, Error};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Input {
    ms: u64,
}

#[derive(Serialize)]
struct Output {
    replica: String,
    worker: u32,
    started_at_ms: u64,
    ended_at_ms: u64,
    slept_ms: u64,
}

fn sleep(ctx: &Context, input: Input) -> Result<Output, Error> {
    let started_at_ms = unix_ms(SystemTime::now());
    let clock = Instant::now();
    std::thread::sleep(Duration::from_millis(input.ms));
    let slept_ms = u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
    let ended_at_ms = unix_ms(SystemTime::now());
    println!("replica {} worker {} slept {slept_ms} ms", ctx.replica, ctx.worker);
    Ok(Output { replica: ctx.replica.clone(), worker: ctx.worker, started_at_ms, ended_at_ms, slept_ms })
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

beamlet_sdk::export!(sleep);
