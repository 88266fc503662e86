//! Compiles the operator's own `.proto` subset with protox (no system protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/slim/name.proto", "proto/slim/controller.proto", "proto/slim/channel_manager.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        // Servers are generated too: the unit tests run faithful fakes of both APIs.
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
