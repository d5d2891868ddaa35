//! Test fixture: an app whose `init` fails, so no worker can ever start.

use beamlet_sdk::{Context, Error};

fn setup() -> Result<(), Error> {
    eprintln!("looking for the model");
    Err(Error::failed("model file missing"))
}

fn handle(_ctx: &Context, _input: Option<serde::de::IgnoredAny>) -> Result<(), Error> {
    Ok(())
}

beamlet_sdk::export!(handle, init = setup);
