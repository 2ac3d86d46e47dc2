//! Compiles every `.proto` under the workspace's `proto/` with `protox` (pure Rust, no system
//! `protoc`), generates prost messages and tonic clients and servers, and writes the encoded
//! `FileDescriptorSet` that reflection and the gateway's transcoder read.

use std::path::PathBuf;

use prost::Message;

const FILES: &[&str] = &[
    "shopverse/api/v1/options.proto",
    "shopverse/common/v1/common.proto",
    "shopverse/events/v1/envelope.proto",
    "shopverse/users/v1/users.proto",
    "shopverse/products/v1/products.proto",
    "shopverse/orders/v1/orders.proto",
    "shopverse/payments/v1/payments.proto",
    "shopverse/notifications/v1/notifications.proto",
    "shopverse/delivery/v1/delivery.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", root.display());

    // Encode the set from protox's own descriptors: decoding into prost-types first would
    // drop the custom options (google.api.http, shopverse.api.v1.access) the gateway reads.
    let mut compiler = protox::Compiler::new([&root])?;
    compiler.include_imports(true).include_source_info(false);
    compiler.open_files(FILES)?;
    let encoded = compiler.encode_file_descriptor_set();
    std::fs::write(out.join("shopverse_descriptor.bin"), &encoded)?;
    let fds = prost_types::FileDescriptorSet::decode(encoded.as_slice())?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Well-known types come from prost-types; google.api's messages are ours.
        .compile_well_known_types(false)
        .compile_fds(fds)?;
    Ok(())
}
