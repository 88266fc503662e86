//! `slim-identity-agent`: the SPIFFE identity sidecar. Its implementation is tracked in its own
//! issue; until it lands the binary only reports its version so the workspace layout is final.

fn main() {
    let arg = std::env::args().nth(1);
    match arg.as_deref() {
        Some("-version" | "--version") => println!("slim-identity-agent {}", env!("CARGO_PKG_VERSION")),
        _ => {
            eprintln!("slim-identity-agent: not implemented yet (only -version is supported)");
            std::process::exit(2);
        }
    }
}
