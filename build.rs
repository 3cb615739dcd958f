//! Records the rustls version from Cargo.lock for the build-info metric.
fn main() {
    println!("cargo:rerun-if-changed=Cargo.lock");
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    let mut version = "unknown".to_string();
    let mut in_rustls = false;
    for line in lock.lines() {
        if line == "name = \"rustls\"" {
            in_rustls = true;
        } else if in_rustls {
            if let Some(v) = line.strip_prefix("version = \"") {
                let v = v.trim_end_matches('"');
                // The workspace pins rustls 0.23; skip other major lines.
                if v.starts_with("0.23") {
                    version = v.to_string();
                }
            }
            in_rustls = false;
        }
    }
    println!("cargo:rustc-env=BUILD_RUSTLS_VERSION={version}");
}
