//! The images of our binaries (and SLIM's), built once per test binary as OCI archives by
//! `scripts/oci-image.sh` and imported into the node's containerd.

use super::*;

/// The repository the chart's images are renamed to in the tests (never pulled).
pub const OPERATOR: &str = "slim.test/slim-operator:e2e";
pub const AGENT: &str = "slim.test/slim-identity-agent:e2e";
/// busybox and the agent binary: an app whose first line verifies its token.
pub const APP: &str = "slim.test/app:e2e";
/// A SLIM node: the `slim` binary of crates.io's agntcy-slim 3.4.6, the release the examples
/// name (so the quickstart runs with its own image names).
pub const SLIM: &str = "ghcr.io/agntcy/slim:3.4.6";
/// The SLIM channel manager 3.4.6 (crates.io's agntcy-slim-channel-manager).
pub const CHANNEL_MANAGER: &str = "ghcr.io/agntcy/slim/channel-manager:3.4.6";
/// Python with slim-bindings and the harness apps (`/harness/*.py`): SLIM apps in Pods.
pub const SLIM_APP: &str = "slim.test/slim-app:e2e";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/oci-image.sh")
}

fn release_binary(name: &str) -> Result<PathBuf, NodeError> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release").join(name);
    if !path.is_file() {
        return Err(NodeError::Missing(format!(
            "{} (build it first: cargo build --release -p slim-operator \
             -p slim-identity-agent --no-default-features --bins)",
            path.display()
        )));
    }
    Ok(path)
}

fn build(dir: &Path, file: &str, args: &[String]) -> Result<PathBuf, NodeError> {
    let out = dir.join(file);
    let mut all: Vec<String> = vec!["--out".into(), out.display().to_string()];
    all.extend(args.iter().cloned());
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    run(&script().display().to_string(), &refs)?;
    Ok(out)
}

/// The sandbox image: busybox's shell sleeping until TERM.
pub fn pause(dir: &Path) -> Result<PathBuf, NodeError> {
    let busybox = which("busybox").ok_or_else(|| NodeError::Missing("busybox (busybox-static)".into()))?;
    build(
        dir,
        "pause.oci.tar",
        &[
            "--name".into(),
            PAUSE_IMAGE.into(),
            "--entrypoint".into(),
            "/bin/busybox".into(),
            "--cmd".into(),
            "sh".into(),
            "--cmd".into(),
            "-c".into(),
            "--cmd".into(),
            "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done".into(),
            format!("{}=/bin/busybox", busybox.display()),
        ],
    )
}

/// Builds and imports the operator, agent and app images (once per test binary).
pub fn ensure(node: &Node) -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| build_ours(node).map_err(|e| e.to_string())).clone()
}

/// Builds and imports SLIM's images: the node, the channel manager, Python apps.
pub fn ensure_slim(node: &Node) -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| build_slim(node).map_err(|e| e.to_string())).clone()
}

/// A binary the test script installs into the cache (`$SLIM_CACHE/<dir>/bin/<name>`).
fn cached_binary(dir: &str, name: &str) -> Result<PathBuf, NodeError> {
    let path = crate::cache_dir().join(dir).join("bin").join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(NodeError::Missing(format!("{} (scripts/setup.sh installs it)", path.display())))
    }
}

/// The Python of the test venv (with slim-bindings), its standard library and the harness
/// apps, under /opt/python (the interpreter finds its library next to itself).
fn slim_app_args() -> Result<Vec<String>, NodeError> {
    let venv_python = crate::python().map_err(|e| NodeError::Missing(e.to_string()))?;
    let python = std::fs::canonicalize(&venv_python)?;
    let prefix = python.parent().and_then(Path::parent).ok_or_else(|| NodeError::Missing("a Python prefix".into()))?;
    let stdlib = prefix.join("lib/python3.11");
    let site = venv_python
        .parent()
        .and_then(Path::parent)
        .map(|venv| venv.join("lib/python3.11/site-packages/slim_bindings"))
        .filter(|p| p.is_dir())
        .ok_or_else(|| NodeError::Missing("slim_bindings in the test venv".into()))?;
    let busybox = which("busybox").ok_or_else(|| NodeError::Missing("busybox (busybox-static)".into()))?;
    // By default the quickstart's app (examples/05-app.yaml); tests give other commands.
    let mut args: Vec<String> =
        ["--name", SLIM_APP, "--entrypoint", "/opt/python/bin/python3", "--cmd", "/harness/quickstart_app.py"]
            .into_iter()
            .map(String::from)
            .collect();
    for skip in [
        "./site-packages",
        "./test",
        "*/__pycache__",
        "./idlelib",
        "./tkinter",
        "./ensurepip",
        "./lib2to3",
        "./config-3.11-*",
    ] {
        args.extend(["--exclude".into(), skip.into()]);
    }
    args.extend([
        format!("{}=/opt/python/bin/python3", python.display()),
        format!("{}=/opt/python/lib/python3.11", stdlib.display()),
        format!("{}=/opt/python/lib/python3.11/site-packages/slim_bindings", site.display()),
        format!("{}=/harness", Path::new(env!("CARGO_MANIFEST_DIR")).join("harness").display()),
        format!("{}=/bin/sh", busybox.display()),
        format!("{}=/bin/busybox", busybox.display()),
    ]);
    Ok(args)
}

/// Builds the archives side by side, then imports them.
fn build_and_import<const N: usize>(node: &Node, specs: [(&str, Vec<String>); N]) -> Result<(), NodeError> {
    let built: Vec<Result<PathBuf, NodeError>> = std::thread::scope(|scope| {
        let handles: Vec<_> =
            specs.iter().map(|(file, args)| scope.spawn(move || build(&node.dir, file, args))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(NodeError::Missing("an image build panicked".into()))))
            .collect()
    });
    for archive in built {
        node.import(&archive?)?;
    }
    Ok(())
}

fn build_ours(node: &Node) -> Result<(), NodeError> {
    let operator = release_binary("slim-operator")?;
    let agent = release_binary("slim-identity-agent")?;
    let busybox = which("busybox").ok_or_else(|| NodeError::Missing("busybox (busybox-static)".into()))?;
    let archives = [
        (
            "operator.oci.tar",
            vec![
                "--name".into(),
                OPERATOR.into(),
                "--entrypoint".into(),
                "/slim-operator".into(),
                "--cmd".into(),
                "run".into(),
                "--user".into(),
                "65532:65532".into(),
                format!("{}=/slim-operator", operator.display()),
            ],
        ),
        (
            "agent.oci.tar",
            vec![
                "--name".into(),
                AGENT.into(),
                "--entrypoint".into(),
                "/slim-identity-agent".into(),
                "--user".into(),
                "65532:65532".into(),
                format!("{}=/slim-identity-agent", agent.display()),
            ],
        ),
        (
            "app.oci.tar",
            vec![
                "--name".into(),
                APP.into(),
                "--entrypoint".into(),
                "/bin/sh".into(),
                format!("{}=/bin/busybox", busybox.display()),
                format!("{}=/bin/sh", busybox.display()),
                format!("{}=/usr/bin/slim-identity-agent", agent.display()),
            ],
        ),
    ];
    build_and_import(node, archives)
}

fn build_slim(node: &Node) -> Result<(), NodeError> {
    let archives = [
        (
            "slim.oci.tar",
            vec![
                "--name".into(),
                SLIM.into(),
                "--entrypoint".into(),
                "/slim".into(),
                format!("{}=/slim", cached_binary("slim", "slim")?.display()),
            ],
        ),
        (
            "channel-manager.oci.tar",
            vec![
                "--name".into(),
                CHANNEL_MANAGER.into(),
                "--entrypoint".into(),
                "/channel-manager".into(),
                format!("{}=/channel-manager", cached_binary("cm", "channel-manager")?.display()),
            ],
        ),
        ("slim-app.oci.tar", slim_app_args()?),
    ];
    build_and_import(node, archives)
}
