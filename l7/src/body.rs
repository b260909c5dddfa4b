//! The response body type every step of the engine answers with: an
//! upstream's streamed body or a buffered one (synthetic, direct or
//! redirect responses).

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// A complete, in-memory body.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}
