//! The rtpay binary's library: the pieces of `serve`, `demo` and `bench`, shared with the
//! end-to-end tests so that they drive the real server the real way.

pub mod bench;
pub mod client;
pub mod demo;
pub mod keys;
pub mod process;
pub mod serve;
