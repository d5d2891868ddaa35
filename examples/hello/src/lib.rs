//! The smallest beamlet app: `{"name": "Ada"}` in, `{"message": "Hello, Ada!"}` out.

use beamlet_sdk::{Context, Error};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Input {
    name: String,
}

#[derive(Serialize)]
struct Output {
    message: String,
}

fn hello(ctx: &Context, input: Input) -> Result<Output, Error> {
    if input.name.trim().is_empty() {
        return Err(Error::bad_input("`name` must not be empty"));
    }
    println!("greeting {} (task {}, attempt {}, worker {})", input.name, ctx.task_id, ctx.attempt, ctx.worker);
    Ok(Output { message: format!("Hello, {}!", input.name) })
}

beamlet_sdk::export!(hello);
