//! Test fixture: every way a handler can end, picked by `{"mode": ...}`.
//!
//! - `ok` returns `{"ok": true}`
//! - `panic` panics with "guest panicked on purpose" (a trap)
//! - `unreachable` executes the wasm `unreachable` instruction (a trap)
//! - `error` returns `Error::failed("handler said no")`
//! - `bad` returns `Error::bad_input("bad field")`
//! - `counter` bumps a per-instance counter and returns `{"counter": N}`,
//!   so 1, 2, 3... on a reused instance and 1 on a fresh one
//!
//! - `flaky` panics on attempts before `succeed_on` and then returns
//!   `{"attempt": N}` (retries and the attempt number in `ctx`)
//! - `big` returns a string output of `bytes` bytes (result size limits)
//!
//! `init` prints "trap guest init".

use std::sync::atomic::{AtomicU64, Ordering};

use beamlet_sdk::{Context, Error};
use serde::{Deserialize, Serialize};

static COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Deserialize)]
struct Input {
    mode: Mode,
    #[serde(default)]
    succeed_on: u32,
    #[serde(default)]
    bytes: usize,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Ok,
    Panic,
    Unreachable,
    Error,
    Bad,
    Counter,
    Flaky,
    Big,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Output {
    Ok { ok: bool },
    Counter { counter: u64 },
    Attempt { attempt: u32 },
    Big(String),
}

fn setup() -> Result<(), Error> {
    println!("trap guest init");
    Ok(())
}

fn trap(ctx: &Context, input: Input) -> Result<Output, Error> {
    match input.mode {
        Mode::Ok => Ok(Output::Ok { ok: true }),
        Mode::Panic => panic!("guest panicked on purpose"),
        Mode::Unreachable => unreachable_instruction(),
        Mode::Error => Err(Error::failed("handler said no")),
        Mode::Bad => Err(Error::bad_input("bad field")),
        Mode::Counter => Ok(Output::Counter { counter: COUNTER.fetch_add(1, Ordering::SeqCst) + 1 }),
        Mode::Flaky if ctx.attempt < input.succeed_on => panic!("attempt {} fails on purpose", ctx.attempt),
        Mode::Flaky => Ok(Output::Attempt { attempt: ctx.attempt }),
        Mode::Big => Ok(Output::Big("x".repeat(input.bytes))),
    }
}

#[cfg(target_arch = "wasm32")]
fn unreachable_instruction() -> ! {
    core::arch::wasm32::unreachable()
}

#[cfg(not(target_arch = "wasm32"))]
fn unreachable_instruction() -> ! {
    std::process::abort()
}

beamlet_sdk::export!(trap, init = setup);
