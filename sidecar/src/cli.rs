//! Command line, spiffe-helper compatible: `-config FILE` (default `helper.conf`),
//! `-daemon-mode=true|false`, `-version`; plus `-config-env NAME`, `verify` and `dev`.
//! Exit codes: 0 success (and SIGTERM/SIGINT in daemon mode), 1 failure, 2 bad flags.

use std::path::PathBuf;

use crate::agent::{self, AgentError};
use crate::config::Config;
#[cfg(feature = "dev")]
use crate::dev::{self, DevOptions};

pub use slim_identity_contract::env::CONFIG_ENV_FLAG;

pub const USAGE: &str = "\
usage:
  slim-identity-agent [-config FILE | -config-env NAME] [-daemon-mode=true|false] [-version]
  slim-identity-agent verify --bundle FILE --audience AUD [--audience AUD...] TOKEN_FILE
                     (a JWT-SVID, or a Kubernetes service-account token against the cluster's JWKS)
  slim-identity-agent dev [--dir DIR] [--ttl SECONDS] [--trust-domain TD] [--spiffe-id ID] [--audience AUD] [--health-port PORT]
                     [--workload-api-socket PATH]   (serve the Workload API there, for SLIM's spire identity)

  -config FILE       spiffe-helper config (HCL), or YAML when FILE ends in .yaml/.yml (default helper.conf)
  -config-env NAME   read the YAML config from environment variable NAME (the injector's way)
  -daemon-mode BOOL  override daemon_mode from the config";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Version,
    Run { config: ConfigSource, daemon_mode: Option<bool> },
    Verify { bundle: PathBuf, audiences: Vec<String>, token: PathBuf },
    Dev(DevArgs),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    Env(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevArgs {
    pub dir: PathBuf,
    pub ttl_seconds: u64,
    pub trust_domain: String,
    pub spiffe_id: Option<String>,
    pub audience: String,
    pub health_port: u16,
    pub workload_api_socket: Option<PathBuf>,
}

/// Go `flag` style: `-name value`, `-name=value`, `--name` works too; booleans take `=false`.
pub fn parse(args: &[String]) -> Result<Command, String> {
    let normalized: Vec<(String, Option<String>)> = args
        .iter()
        .map(|a| {
            let bare = a.trim_start_matches('-');
            match (a.starts_with('-'), bare.split_once('=')) {
                (true, Some((name, value))) => (format!("-{name}"), Some(value.to_owned())),
                (true, None) => (format!("-{bare}"), None),
                (false, _) => (a.clone(), None),
            }
        })
        .collect();
    match normalized.first().map(|(a, _)| a.as_str()) {
        Some("verify") => return parse_verify(&normalized[1..]),
        Some("dev") => return parse_dev(&normalized[1..]),
        _ => {}
    }
    let mut config = ConfigSource::File(PathBuf::from("helper.conf"));
    let mut daemon_mode = None;
    let mut version = false;
    let mut items = normalized.into_iter();
    while let Some((flag, inline)) = items.next() {
        let value = |items: &mut std::vec::IntoIter<(String, Option<String>)>| {
            inline.clone().or_else(|| items.next().map(|(v, _)| v)).ok_or(format!("flag needs an argument: {flag}"))
        };
        match flag.as_str() {
            "-config" => config = ConfigSource::File(PathBuf::from(value(&mut items)?)),
            "-config-env" => config = ConfigSource::Env(value(&mut items)?),
            "-daemon-mode" => {
                daemon_mode = Some(match inline.as_deref() {
                    None | Some("true") | Some("1") | Some("t") | Some("T") | Some("TRUE") | Some("True") => true,
                    Some("false") | Some("0") | Some("f") | Some("F") | Some("FALSE") | Some("False") => false,
                    Some(other) => return Err(format!("invalid boolean value {other:?} for -daemon-mode")),
                })
            }
            "-version" => version = true,
            "-h" | "-help" => return Err(String::new()),
            other => return Err(format!("flag provided but not defined: {other}")),
        }
    }
    Ok(if version { Command::Version } else { Command::Run { config, daemon_mode } })
}

fn parse_verify(args: &[(String, Option<String>)]) -> Result<Command, String> {
    let (mut bundle, mut audiences, mut token) = (None, Vec::new(), None);
    let mut items = args.iter().cloned();
    while let Some((arg, inline)) = items.next() {
        let mut value =
            || inline.clone().or_else(|| items.next().map(|(v, _)| v)).ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "-bundle" => bundle = Some(PathBuf::from(value()?)),
            "-audience" => audiences.push(value()?),
            other if !other.starts_with('-') && token.is_none() => token = Some(PathBuf::from(other)),
            other => return Err(format!("verify: unexpected {other}")),
        }
    }
    match (bundle, token) {
        (Some(bundle), Some(token)) if !audiences.is_empty() => Ok(Command::Verify { bundle, audiences, token }),
        _ => Err("verify needs --bundle FILE, at least one --audience and the token file".into()),
    }
}

#[cfg(not(feature = "dev"))]
fn parse_dev(_: &[(String, Option<String>)]) -> Result<Command, String> {
    Err("this build of slim-identity-agent has no dev mode (built without the `dev` feature)".into())
}

#[cfg(feature = "dev")]
fn parse_dev(args: &[(String, Option<String>)]) -> Result<Command, String> {
    let defaults = DevOptions::default();
    let mut dev = DevArgs {
        dir: defaults.dir,
        ttl_seconds: defaults.ttl.as_secs(),
        trust_domain: defaults.trust_domain,
        spiffe_id: None,
        audience: defaults.audience,
        health_port: defaults.health_port,
        workload_api_socket: None,
    };
    let mut items = args.iter().cloned();
    while let Some((arg, inline)) = items.next() {
        let mut value =
            || inline.clone().or_else(|| items.next().map(|(v, _)| v)).ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "-dir" => dev.dir = PathBuf::from(value()?),
            "-ttl" => {
                dev.ttl_seconds =
                    value()?.trim_end_matches('s').parse().map_err(|_| "--ttl takes seconds".to_owned())?
            }
            "-trust-domain" => dev.trust_domain = value()?,
            "-spiffe-id" => dev.spiffe_id = Some(value()?),
            "-audience" => dev.audience = value()?,
            "-health-port" => {
                dev.health_port = value()?.parse().map_err(|_| "--health-port takes a port".to_owned())?
            }
            "-workload-api-socket" => dev.workload_api_socket = Some(PathBuf::from(value()?)),
            other => return Err(format!("dev: unexpected {other}")),
        }
    }
    if dev.ttl_seconds < 2 {
        return Err("--ttl must be at least 2 seconds".into());
    }
    Ok(Command::Dev(dev))
}

/// Runs a parsed command; returns the exit code.
pub async fn execute(command: Command) -> i32 {
    match command {
        Command::Version => {
            println!("slim-identity-agent {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Command::Verify { bundle, audiences, token } => {
            match crate::verify::verify(&bundle, &audiences, &token, agent::unix_now()) {
                Ok(verified) => {
                    println!("{}", verified.subject);
                    if !verified.details.is_empty() {
                        eprintln!("{}", verified.details);
                    }
                    0
                }
                Err(error) => {
                    eprintln!("token rejected: {error}");
                    1
                }
            }
        }
        #[cfg(not(feature = "dev"))]
        Command::Dev(_) => {
            eprintln!("slim-identity-agent: this build has no dev mode");
            2
        }
        #[cfg(feature = "dev")]
        Command::Dev(args) => {
            let options = DevOptions {
                spiffe_id: args.spiffe_id.unwrap_or_else(|| format!("spiffe://{}/dev", args.trust_domain)),
                dir: args.dir,
                trust_domain: args.trust_domain,
                audience: args.audience,
                ttl: std::time::Duration::from_secs(args.ttl_seconds),
                health_port: args.health_port,
                workload_api_socket: args.workload_api_socket,
            };
            report(dev::run(options, shutdown_signal()).await)
        }
        Command::Run { config, daemon_mode } => {
            let loaded = match &config {
                ConfigSource::File(path) => Config::load(path),
                ConfigSource::Env(name) => Config::from_env(name),
            };
            let mut config = match loaded {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("slim-identity-agent: {error}");
                    return 1;
                }
            };
            if let Some(daemon_mode) = daemon_mode {
                config.daemon_mode = daemon_mode;
            }
            if config.daemon_mode {
                report(agent::run_daemon(config, shutdown_signal()).await)
            } else {
                report(agent::run_once(config).await)
            }
        }
    }
}

fn report(result: Result<(), AgentError>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(error) => {
            tracing::error!(%error, "exiting");
            eprintln!("slim-identity-agent: {error}");
            1
        }
    }
}

/// SIGTERM or SIGINT: the pod is stopping (a native sidecar must exit 0 then).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn spiffe_helper_flags() {
        assert_eq!(
            parse(&args(&[])),
            Ok(Command::Run { config: ConfigSource::File("helper.conf".into()), daemon_mode: None })
        );
        assert_eq!(
            parse(&args(&["-config", "config/helper.conf", "-daemon-mode=false"])),
            Ok(Command::Run { config: ConfigSource::File("config/helper.conf".into()), daemon_mode: Some(false) })
        );
        assert_eq!(
            parse(&args(&["-config=x.yaml", "-daemon-mode"])),
            Ok(Command::Run { config: ConfigSource::File("x.yaml".into()), daemon_mode: Some(true) })
        );
        assert_eq!(parse(&args(&["-version"])), Ok(Command::Version));
        assert_eq!(
            parse(&args(&["-config-env", "SLIM_IDENTITY_AGENT_CONFIG"])),
            Ok(Command::Run { config: ConfigSource::Env("SLIM_IDENTITY_AGENT_CONFIG".into()), daemon_mode: None })
        );
        assert!(parse(&args(&["-nope"])).is_err_and(|e| e.contains("not defined")));
        assert!(parse(&args(&["-daemon-mode=maybe"])).is_err());
        assert!(parse(&args(&["-config"])).is_err_and(|e| e.contains("needs an argument")));
    }

    #[test]
    fn verify_and_dev_arguments() {
        assert_eq!(
            parse(&args(&["verify", "--bundle", "key.jwt", "--audience", "a", "--audience=b", "jwt.token"])),
            Ok(Command::Verify {
                bundle: "key.jwt".into(),
                audiences: vec!["a".into(), "b".into()],
                token: "jwt.token".into()
            })
        );
        assert!(parse(&args(&["verify", "jwt.token"])).is_err());
        let Ok(Command::Dev(dev)) = parse(&args(&["dev", "--dir", "/tmp/s", "--ttl", "30"])) else { panic!("dev") };
        assert_eq!((dev.dir, dev.ttl_seconds, dev.workload_api_socket), (PathBuf::from("/tmp/s"), 30, None));
        let Ok(Command::Dev(dev)) = parse(&args(&["dev", "--workload-api-socket=/run/a.sock"])) else { panic!("dev") };
        assert_eq!(dev.workload_api_socket, Some(PathBuf::from("/run/a.sock")));
    }
}
