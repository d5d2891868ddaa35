//! The raw `wit-bindgen` bindings for the `beamlet:function` world.
//!
//! This is the only place the WIT is turned into Rust. Nothing here is API:
//! [`crate::export!`] reaches in through `$crate::__bindings`, and everything a
//! handler sees is mapped onto [`crate::Context`] and [`crate::Error`].

// The generated `handle` glue flattens the `context` record into core wasm
// parameters, one per field.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({
    path: "../wit",
    world: "beamlet:function/function",
    // The export macro is invoked from the handler's crate, not this one, so it
    // must be reachable across crates; `crate::export!` is the public face.
    pub_export_macro: true,
    export_macro_name: "export_raw",
    default_bindings_module: "$crate::__bindings",
});
