//! [`export!`](crate::export!) and the JSON glue it expands to.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{__bindings, Context, Error};

/// Exports a handler function as this crate's beamlet component.
///
/// ```text
/// beamlet_sdk::export!(handler);
/// beamlet_sdk::export!(handler, init = setup);
/// ```
///
/// `handler` is any `fn(&Context, I) -> Result<O, E>` where `I: Deserialize`,
/// `O: Serialize` and `E: Into<Error>`. `setup`, if given, is a
/// `fn() -> Result<(), E>` run once per worker before its first task; its error
/// stops the worker from starting and is reported on the replica.
///
/// The task's input bytes are decoded as JSON into `I` (an empty input reads as
/// `null`, so `Option<I>` or `()` accept it); a decode failure answers
/// [`ErrorKind::BadInput`](crate::ErrorKind::BadInput) without calling the
/// handler. The output is encoded as JSON.
///
/// Use it once per crate, at the top level of a `cdylib` crate.
#[macro_export]
macro_rules! export {
    ($handler:path $(,)?) => {
        $crate::export!($handler, init = $crate::__private::no_init);
    };
    ($handler:path, init = $init:path $(,)?) => {
        const _: () = {
            struct BeamletHandler;

            impl $crate::__bindings::Guest for BeamletHandler {
                fn init() -> $crate::__private::InitResult {
                    $crate::__private::init($init)
                }

                fn handle(
                    ctx: $crate::__bindings::Context,
                    input: $crate::__private::Bytes,
                ) -> $crate::__private::HandleResult {
                    $crate::__private::handle($handler, ctx, input)
                }
            }

            $crate::__bindings::export_raw! { BeamletHandler with_types_in $crate::__bindings }
        };
    };
}

/// What [`export!`](crate::export!) expands to call. Not API.
#[doc(hidden)]
pub mod __private {
    use super::*;

    pub type Bytes = Vec<u8>;
    pub type InitResult = Result<(), String>;
    pub type HandleResult = Result<Vec<u8>, __bindings::Error>;

    pub fn no_init() -> Result<(), Error> {
        Ok(())
    }

    pub fn init<E: Into<Error>>(setup: impl FnOnce() -> Result<(), E>) -> InitResult {
        setup().map_err(|err| err.into().to_string())
    }

    pub fn handle<I, O, E>(
        handler: impl FnOnce(&Context, I) -> Result<O, E>,
        ctx: __bindings::Context,
        input: Bytes,
    ) -> HandleResult
    where
        I: DeserializeOwned,
        O: Serialize,
        E: Into<Error>,
    {
        call(handler, &Context::from(ctx), &input).map_err(Into::into)
    }
}

fn call<I, O, E>(
    handler: impl FnOnce(&Context, I) -> Result<O, E>,
    ctx: &Context,
    input: &[u8],
) -> Result<Vec<u8>, Error>
where
    I: DeserializeOwned,
    O: Serialize,
    E: Into<Error>,
{
    let input = decode(input)?;
    let output = handler(ctx, input).map_err(Into::into)?;
    serde_json::to_vec(&output)
        .map_err(|err| Error::failed(format!("failed to encode the handler's output as JSON: {err}")))
}

fn decode<I: DeserializeOwned>(input: &[u8]) -> Result<I, Error> {
    // An empty body means "no input": handlers taking an `Option` get `None`.
    if input.trim_ascii().is_empty() {
        return serde_json::from_slice(b"null").map_err(|_| {
            Error::bad_input("the input is empty; this handler needs a JSON input (e.g. --data '{...}')")
        });
    }
    serde_json::from_slice(input).map_err(|err| match err.classify() {
        // Well-formed JSON of another shape: a missing field, a wrong type.
        serde_json::error::Category::Data => {
            Error::bad_input(format!("the input does not match what this handler takes: {err}"))
        }
        _ => Error::bad_input(format!("input is not valid JSON for this handler: {err}")),
    })
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use serde::Deserialize;

    use super::*;
    use crate::ErrorKind;

    #[derive(Deserialize)]
    struct In {
        name: String,
    }

    #[derive(Serialize)]
    struct Out {
        message: String,
    }

    fn hello(ctx: &Context, input: In) -> Result<Out, Error> {
        if input.name.is_empty() {
            return Err(Error::bad_input("name is empty"));
        }
        Ok(Out { message: format!("Hello, {} from worker {}!", input.name, ctx.worker) })
    }

    fn ctx() -> Context {
        Context {
            task_id: "task".into(),
            attempt: 1,
            app: "hello".into(),
            replica: "r0".into(),
            worker: 3,
            deadline: SystemTime::now(),
        }
    }

    #[test]
    fn decodes_input_and_encodes_output_as_json() {
        let out = call(hello, &ctx(), br#"{"name": "Ada"}"#).unwrap();
        assert_eq!(out, br#"{"message":"Hello, Ada from worker 3!"}"#);
    }

    #[test]
    fn undecodable_input_is_bad_input_and_skips_the_handler() {
        let never = |_: &Context, _: In| -> Result<Out, Error> { panic!("handler must not run") };
        for (input, said) in [
            (&b"not json"[..], "input is not valid JSON for this handler: "),
            (br#"{"nom": "Ada"}"#, "the input does not match what this handler takes: missing field `name`"),
        ] {
            let err = call(never, &ctx(), input).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::BadInput);
            assert!(err.message().starts_with(said), "{err}");
        }
        let err = call(never, &ctx(), b"").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadInput);
        assert!(err.message().starts_with("the input is empty"), "{err}");
    }

    #[test]
    fn empty_input_reads_as_null() {
        let out = call(|_: &Context, input: Option<In>| Ok::<_, Error>(input.is_none()), &ctx(), b" \n").unwrap();
        assert_eq!(out, b"true");
    }

    #[test]
    fn handler_errors_pass_through_and_convert() {
        let err = call(hello, &ctx(), br#"{"name": ""}"#).unwrap_err();
        assert_eq!(err, Error::bad_input("name is empty"));
        let err = call(|_: &Context, _: ()| Err::<(), _>("handler said no"), &ctx(), b"null").unwrap_err();
        assert_eq!(err, Error::failed("handler said no"));
    }

    #[test]
    fn init_errors_become_their_message() {
        assert_eq!(__private::init(__private::no_init), Ok(()));
        assert_eq!(__private::init(|| Err::<(), _>(Error::failed("no model"))), Err("no model".to_string()));
    }
}
