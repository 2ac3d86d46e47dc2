//! The ShopVerse API gateway.
//!
//! # Layout
//! - [`router`]: REST routes from the protos' `google.api.http` rules; a segment trie.
//! - [`transcode`]: JSON <-> protobuf (proto3 JSON mapping) and gRPC framing.

#![forbid(unsafe_code)]

pub mod router;
pub mod transcode;
