//! Test fixture: an `init` that takes 3 s (waiting in a host call), so a
//! worker rebuilding its instance after a trap stays busy for a while. Input
//! `{"trap": true}` panics; anything else returns `{"ok": true}`.

use std::time::Duration;

use beamlet_sdk::{Context, Error};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Input {
    #[serde(default)]
    trap: bool,
}

#[derive(Serialize)]
struct Output {
    ok: bool,
}

fn handle(_ctx: &Context, input: Option<Input>) -> Result<Output, Error> {
    if input.is_some_and(|i| i.trap) {
        panic!("trapping on purpose");
    }
    Ok(Output { ok: true })
}

fn slow_start() -> Result<(), Error> {
    std::thread::sleep(Duration::from_secs(3));
    Ok(())
}

beamlet_sdk::export!(handle, init = slow_start);
