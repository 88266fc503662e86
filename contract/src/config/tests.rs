//! spiffe-helper's configuration rules, key by key.

use std::path::PathBuf;

use super::*;

fn seed_config() -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/helper.conf"))
        .expect("examples/helper.conf")
}

#[test]
fn the_seed_configmap_loads_unchanged() {
    let config = Config::from_hcl(&seed_config()).expect("seed config loads");
    assert_eq!(config.agent_address, "/run/spire/agent-sockets/api.sock");
    assert_eq!(config.cert_dir, PathBuf::from("/svids"));
    assert_eq!(config.x509, Some(("tls.crt".into(), "tls.key".into(), "svid_bundle.pem".into())));
    assert_eq!(config.jwt_bundle_file_name, "key.jwt");
    assert_eq!((config.cert_file_mode, config.key_file_mode, config.jwt_svid_file_mode), (0o600, 0o600, 0o600));
    assert_eq!(
        config.jwt_svids,
        vec![JwtSvidConfig {
            audience: "slim-demo".into(),
            extra_audiences: vec![],
            file_name: "jwt_svid.token".into()
        }]
    );
    assert!(config.daemon_mode);
    assert_eq!(config.jwt_bundle_format, JwtBundleFormat::SpiffeHelper, "spiffe-helper's format by default");
    assert_eq!(config.jwt_svid_write_mode, WriteMode::Swap, "atomic by default");
}

#[test]
fn defaults_match_spiffe_helper() {
    let config = Config::from_hcl(r#"jwt_bundle_file_name = "b.json""#).expect("minimal");
    assert_eq!(
        (config.cert_file_mode, config.key_file_mode, config.jwt_bundle_file_mode, config.jwt_svid_file_mode),
        (0o644, 0o600, 0o600, 0o600)
    );
    assert!(config.daemon_mode);
    assert!(!config.health_checks.listener_enabled);
    assert_eq!(config.jwt_svid_refresh_percent, 50);
    let zero = Config::from_hcl("jwt_bundle_file_name = \"b\"\ncert_file_mode = 0").expect("0 is the default");
    assert_eq!(zero.cert_file_mode, 0o644);
}

#[test]
fn yaml_carries_the_same_settings() {
    let yaml = r#"
agent_address: /run/spire/agent-sockets/api.sock
cert_dir: /svids
svid_file_name: tls.crt
svid_key_file_name: tls.key
svid_bundle_file_name: svid_bundle.pem
jwt_bundle_file_name: key.jwt
jwt_bundle_format: jwks
jwt_svid_write_mode: in-place
cert_file_mode: "0600"
key_file_mode: 384
jwt_svids:
  - {jwt_audience: slim-demo, jwt_svid_file_name: jwt_svid.token, jwt_extra_audiences: [other]}
health_checks: {listener_enabled: true, bind_port: 9090}
daemon_mode: true
"#;
    let config = Config::from_yaml(yaml).expect("yaml");
    assert_eq!((config.cert_file_mode, config.key_file_mode), (0o600, 0o600));
    assert_eq!(config.jwt_bundle_format, JwtBundleFormat::Jwks);
    assert_eq!(config.jwt_svid_write_mode, WriteMode::InPlace);
    assert_eq!(config.jwt_svids[0].audiences(), vec!["slim-demo".to_owned(), "other".to_owned()]);
    assert_eq!(config.health_checks.bind_port, 9090);
    assert_eq!(config.health_checks.liveness_path, "/live");
}

#[test]
fn unknown_keys_are_errors_everywhere() {
    for (text, expected) in [
        ("jwt_bundle_file_name = \"b\"\ncertDir = \"/x\"", "line 2: unknown field `certDir`"),
        ("jwt_bundle_file_name = \"b\"\nagentAddress = \"/x\"", "agentAddress"),
        (
            "jwt_svids = [{jwt_audience=\"a\", jwt_svid_file_name=\"f\", jwt_file=\"g\"}]",
            "jwt_svids[0] at line 1: unknown field `jwt_file`",
        ),
        (
            "jwt_bundle_file_name = \"b\"\nhealth_checks { listener_enabled = true\n port = 1 }",
            "health_checks at line 3: unknown field `port`",
        ),
    ] {
        let error = Config::from_hcl(text).expect_err(text).to_string();
        assert!(error.contains(expected), "{text}: {error}");
    }
    // YAML says where too.
    let error = Config::from_yaml("jwt_bundle_file_name: b\njwt_svids:\n  - jwt_audience: a\n    jwt_file: g\n")
        .expect_err("unknown key")
        .to_string();
    assert!(error.contains("jwt_svids[0]: unknown field `jwt_file`") && error.contains("line 4"), "{error}");
}

#[test]
fn spiffe_helper_validation_rules() {
    for (text, expected) in [
        ("cert_dir = \"/x\"", "at least one of"),
        ("svid_file_name = \"a\"\nsvid_key_file_name = \"b\"", "all or none of"),
        ("jwt_svids = [{jwt_audience=\"a\"}]", "'jwt_file_name' is required"),
        ("jwt_svids = [{jwt_svid_file_name=\"f\"}]", "'jwt_audience' is required"),
        ("jwt_bundle_file_name = \"b\"\ncert_file_mode = -1", "must not be negative"),
        (
            "jwt_bundle_file_name = \"b\"\npid_file_name = \"/p\"\nrenew_signal = \"SIGHUP\"\ndaemon_mode = false",
            "daemon_mode is false",
        ),
        ("jwt_bundle_file_name = \"b\"\npid_file_name = \"/p\"", "renew_signal is not"),
        ("jwt_bundle_file_name = \"b\"\nrenew_signal = \"SIGNOPE\"", "not a known signal"),
        ("jwt_bundle_file_name = \"b\"\nhealth_checks { bind_port = -1 }", "must not be negative"),
        (
            "jwt_bundle_file_name = \"b\"\ndaemon_mode = \"yes\"",
            "daemon_mode at line 2: invalid type: string \"yes\", expected a boolean",
        ),
        ("jwt_bundle_file_name = \"b\"\njwt_bundle_format = \"pem\"", "jwt_bundle_format"),
        ("jwt_bundle_file_name = \"b\"\njwt_svid_refresh_percent = 80", "between 1 and 50"),
        ("jwt_bundle_file_name = \"b\"\njwt_svid_write_mode = \"rename\"", "not \"atomic\" or \"in-place\""),
    ] {
        let error = Config::from_hcl(text).expect_err(text).to_string();
        assert!(error.contains(expected), "{text}: {error}");
    }
}

#[test]
fn health_defaults_apply_only_when_enabled() {
    let off = Config::from_hcl("jwt_bundle_file_name = \"b\"\nhealth_checks { bind_port = 9000 }").expect("ok");
    assert!(!off.health_checks.listener_enabled);
    assert_eq!(off.health_checks.bind_port, 8081, "ignored while disabled");
    let on = Config::from_hcl(
        "jwt_bundle_file_name = \"b\"\nhealth_checks { listener_enabled = true\n readiness_path = \"/r\" }",
    )
    .expect("ok");
    assert_eq!((on.health_checks.bind_port, on.health_checks.readiness_path.as_str()), (8081, "/r"));
}

#[test]
fn socket_addresses_as_paths_or_uris() {
    assert_eq!(socket_path_of("/run/spire/api.sock").expect("path"), PathBuf::from("/run/spire/api.sock"));
    assert_eq!(socket_path_of("unix:///run/spire/api.sock").expect("uri"), PathBuf::from("/run/spire/api.sock"));
    assert_eq!(socket_path_of("unix:/run/spire/api.sock").expect("uri"), PathBuf::from("/run/spire/api.sock"));
    assert!(socket_path_of("unix://host/run/api.sock").is_err());
    assert!(socket_path_of("tcp://127.0.0.1:8000").is_err_and(|e| e.to_string().contains("not supported")));
    let config = Config::from_hcl("jwt_bundle_file_name = \"b\"\nagent_address = \"unix:///a.sock\"").expect("ok");
    assert_eq!(config.socket_path().expect("socket"), PathBuf::from("/a.sock"));
}

#[test]
fn refresh_is_never_later_than_half_the_remaining_life() {
    let hour = std::time::Duration::from_secs(3600);
    assert_eq!(refresh_after(hour, 50), std::time::Duration::from_secs(1801), "spiffe-helper's remaining/2 + 1 s");
    assert_eq!(refresh_after(hour, 25), std::time::Duration::from_secs(901));
    assert_eq!(refresh_after(std::time::Duration::ZERO, 50), std::time::Duration::from_secs(1));
}

#[test]
fn a_typed_config_reads_back_as_itself() {
    let defaults = Config { jwt_bundle_file_name: "b.json".into(), ..Default::default() };
    assert_eq!(
        Config::from_yaml("jwt_bundle_file_name: b.json").expect("minimal"),
        defaults,
        "Default is what parsing assumes"
    );
    let full = Config {
        agent_address: "unix:///run/spire/agent-sockets/api.sock".into(),
        cert_dir: PathBuf::from("/svids"),
        x509: Some(("tls.crt".into(), "tls.key".into(), "bundle.pem".into())),
        jwt_bundle_file_name: "key.jwt".into(),
        jwt_svids: vec![
            JwtSvidConfig {
                audience: "slim".into(),
                extra_audiences: vec!["other".into()],
                file_name: "a.token".into(),
            },
            JwtSvidConfig { audience: "b".into(), extra_audiences: vec![], file_name: "b.token".into() },
        ],
        cert_file_mode: 0o640,
        key_file_mode: 0o600,
        jwt_bundle_file_mode: 0o644,
        jwt_svid_file_mode: 0o640,
        health_checks: HealthChecks {
            listener_enabled: true,
            bind_port: 9090,
            liveness_path: "/l".into(),
            readiness_path: "/r".into(),
        },
        jwt_bundle_format: JwtBundleFormat::Jwks,
        jwt_bundle_trust_domain: "example.org".into(),
        jwt_svid_refresh_percent: 30,
        renew_on_jwt_update: true,
        jwt_svid_write_mode: WriteMode::InPlace,
        workload_api_socket: Some(PathBuf::from("/run/slim-identity/agent.sock")),
        ..defaults.clone()
    };
    for config in [defaults, full] {
        let yaml = config.to_yaml().expect("renders");
        assert_eq!(Config::from_yaml(&yaml).expect("reads back"), config, "{yaml}");
    }
}

#[test]
fn kubernetes_source_keys_defaults_and_contradictions() {
    let config = Config::from_yaml(
        "identity_source: kubernetes\ncert_dir: /svids\njwt_bundle_file_name: key.jwt\n\
         jwt_svids: [{jwt_audience: slim, jwt_svid_file_name: jwt_svid.token}]\n",
    )
    .expect("kubernetes source");
    assert_eq!(config.identity_source, IdentitySource::Kubernetes(KubernetesSource::default()));
    assert_eq!(config.jwt_bundle_format, JwtBundleFormat::Jwks, "a plain JWKS by default");
    let IdentitySource::Kubernetes(source) = &config.identity_source else { unreachable!() };
    assert_eq!(source.token_file, PathBuf::from("/var/run/secrets/slim.agntcy.org/token"));
    assert_eq!(source.jwks_refresh, Duration::from_secs(600));
    // Round trip, with every key set.
    let mut custom = config.clone();
    custom.identity_source = IdentitySource::Kubernetes(KubernetesSource {
        token_file: "/t/token".into(),
        api_server: "https://10.0.0.1:443".into(),
        ca_file: "/t/ca.crt".into(),
        api_token_file: "/t/api".into(),
        jwks_refresh: Duration::from_secs(60),
        issuer: Some(Box::new(crate::config::IssuerSource {
            url: "https://slim-operator.slim-system.svc:8444".into(),
            token_file: "/t/issuer-token".into(),
            ca_file: "/t/issuer-ca.crt".into(),
            server_name: "issuer.example".into(),
        })),
    });
    custom.workload_api_socket = Some("/run/slim-identity/agent.sock".into());
    assert_eq!(Config::from_yaml(&custom.to_yaml().expect("yaml")).expect("reads back"), custom);

    let base = "cert_dir: /svids\njwt_svids: [{jwt_audience: slim, jwt_svid_file_name: t}]\n";
    for (extra, message) in [
        ("kubernetes_token_file: /t\n", "the kubernetes_* keys need identity_source: kubernetes"),
        ("identity_source: k8s\n", "identity_source \"k8s\" is not \"spiffe\" or \"kubernetes\""),
        ("identity_source: kubernetes\nkubernetes_api_server: http://x\n", "must be an https:// URL"),
        ("identity_source: kubernetes\nkubernetes_jwks_refresh_seconds: 1\n", "must be at least 10"),
        ("identity_source: kubernetes\nagent_address: /a.sock\n", "does not use one"),
        ("identity_source: kubernetes\njwt_bundle_format: spiffe-helper\n", "jwt_bundle_format must be \"jwks\""),
        ("identity_source: kubernetes\nworkload_api_socket: /s.sock\n", "only from an issuer"),
        ("identity_source: kubernetes\nkubernetes_issuer_token_file: /t\n", "need kubernetes_issuer_url"),
        ("identity_source: kubernetes\nkubernetes_issuer_url: http://x\n", "must be an https:// URL"),
        ("identity_source: kubernetes\nkubernetes_issuer_url: https://x\n", "needs kubernetes_issuer_token_file"),
        (
            "identity_source: kubernetes\nkubernetes_issuer_url: https://x\nkubernetes_issuer_token_file: /t\nkubernetes_issuer_ca_file: /c\n",
            "which is not set",
        ),
        (
            "identity_source: kubernetes\nsvid_file_name: a\nsvid_key_file_name: b\nsvid_bundle_file_name: c\n",
            "writes JWTs only",
        ),
    ] {
        let error = Config::from_yaml(&format!("{base}{extra}")).expect_err(extra).to_string();
        assert!(error.contains(message), "{extra}: {error}");
    }
    let error = Config::from_yaml("identity_source: kubernetes\njwt_bundle_file_name: k\n").expect_err("no jwt");
    assert!(error.to_string().contains("needs a 'jwt_svids' entry"), "{error}");
    // HCL too (spiffe-helper's format with our keys).
    let hcl = Config::from_hcl(
        "identity_source = \"kubernetes\"\nkubernetes_token_file = \"/t\"\njwt_svids = [{jwt_audience = \"slim\", jwt_svid_file_name = \"t\"}]\n",
    )
    .expect("hcl");
    assert!(matches!(hcl.identity_source, IdentitySource::Kubernetes(ref k) if k.token_file == Path::new("/t")));
}

#[test]
fn the_workload_api_socket_in_yaml_and_hcl() {
    let yaml = Config::from_yaml("workload_api_socket: unix:///run/slim-identity/agent.sock\n").expect("yaml");
    assert_eq!(yaml.workload_api_socket, Some(PathBuf::from("/run/slim-identity/agent.sock")), "alone is enough");
    let hcl =
        Config::from_hcl("workload_api_socket = \"/run/s/agent.sock\"\njwt_bundle_file_name = \"k\"\n").expect("hcl");
    assert_eq!(hcl.workload_api_socket, Some(PathBuf::from("/run/s/agent.sock")));
    for (text, message) in [
        ("workload_api_socket: tcp:127.0.0.1:1\n", "TCP Workload API endpoints are not supported"),
        ("workload_api_socket: /a.sock\nagent_address: /a.sock\n", "is the upstream agent's socket"),
        (
            "workload_api_socket: /a.sock\nidentity_source: kubernetes\njwt_svids: [{jwt_audience: s, jwt_svid_file_name: t}]\n",
            "identity_source kubernetes has them only from an issuer",
        ),
    ] {
        let error = Config::from_yaml(text).expect_err(text).to_string();
        assert!(error.contains(message), "{text}: {error}");
    }
}

/// The agent's config as users and the injector write it: no text makes the parsers panic, and
/// every config accepted reads back from its YAML unchanged. `PROPTEST_CASES` sets the case count.
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// The keys the agent reads at the top level, each with values of its type.
    fn typed_line() -> impl Strategy<Value = String> {
        let text = || "[a-zA-Z0-9./_-]{1,16}".prop_map(|s| format!("\"{s}\""));
        let path = || "(/[a-z0-9_.-]{1,8}){1,3}".prop_map(|s| format!("\"{s}\""));
        let boolean = || prop_oneof![Just("true".to_owned()), Just("false".to_owned())];
        let mode = || prop_oneof!["0[0-7]{3}", "0[0-7]{3}".prop_map(|m| format!("\"{m}\""))];
        let one_of = |choices: &'static [&'static str]| prop::sample::select(choices).prop_map(|c| format!("\"{c}\""));
        prop_oneof![
            path().prop_map(|v| format!("agent_address = {v}")),
            path().prop_map(|v| format!("cert_dir = {v}")),
            text().prop_map(|v| format!("cmd = {v}")),
            text().prop_map(|v| format!("cmd_args = {v}")),
            text().prop_map(|v| format!("pid_file_name = {v}")),
            boolean().prop_map(|v| format!("daemon_mode = {v}")),
            boolean().prop_map(|v| format!("add_intermediates_to_bundle = {v}")),
            boolean().prop_map(|v| format!("include_federated_domains = {v}")),
            boolean().prop_map(|v| format!("omit_expired = {v}")),
            one_of(&["SIGHUP", "SIGUSR1", "SIGTERM"]).prop_map(|v| format!("renew_signal = {v}")),
            (text(), text(), text()).prop_map(|(a, b, c)| {
                format!("svid_file_name = {a}\nsvid_key_file_name = {b}\nsvid_bundle_file_name = {c}")
            }),
            one_of(&["spiffe-helper", "jwks"]).prop_map(|v| format!("jwt_bundle_format = {v}")),
            one_of(&["atomic", "in-place"]).prop_map(|v| format!("jwt_svid_write_mode = {v}")),
            mode().prop_map(|v| format!("cert_file_mode = {v}")),
            mode().prop_map(|v| format!("key_file_mode = {v}")),
            mode().prop_map(|v| format!("jwt_bundle_file_mode = {v}")),
            mode().prop_map(|v| format!("jwt_svid_file_mode = {v}")),
            (1..100u8).prop_map(|v| format!("jwt_svid_refresh_percent = {v}")),
            text().prop_map(|v| format!("hint = {v}")),
            path().prop_map(|v| format!("workload_api_socket = {v}")),
        ]
    }

    /// A value of any shape HCL has, for any key (strings kept to characters that need no escaping).
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9 ./_:-]{0,16}".prop_map(|s| format!("\"{s}\"")),
            "-?[0-9]{1,6}",
            "0[0-7]{3}",
            Just("true".to_owned()),
            Just("false".to_owned()),
            Just("\"kubernetes\"".to_owned()),
        ]
    }

    fn jwt_svids() -> impl Strategy<Value = String> {
        prop::collection::vec(("[a-z:-]{0,10}", "[a-z._]{0,10}", prop::collection::vec("[a-z]{1,6}", 0..3)), 0..3)
            .prop_map(|entries| {
                let entries: Vec<String> = entries
                    .into_iter()
                    .map(|(audience, file, extra)| {
                        let extra: Vec<String> = extra.iter().map(|a| format!("\"{a}\"")).collect();
                        format!(
                            "{{ jwt_audience = \"{audience}\"\n jwt_svid_file_name = \"{file}\"\n jwt_extra_audiences = [{}] }}",
                            extra.join(", ")
                        )
                    })
                    .collect();
                format!("jwt_svids = [{}]", entries.join(",\n"))
            })
    }

    pub(super) fn document() -> impl Strategy<Value = String> {
        let odd = ("[a-z_]{1,24}", value()).prop_map(|(k, v)| format!("{k} = {v}"));
        let line = prop_oneof![9 => typed_line(), 1 => odd];
        (prop::collection::vec(line, 0..10), prop::option::of(jwt_svids())).prop_map(|(mut lines, svids)| {
            lines.push("jwt_bundle_file_name = \"bundle.json\"".into());
            lines.extend(svids);
            lines.join("\n")
        })
    }

    /// Text made of HCL's own tokens, in any order.
    fn hcl_like() -> impl Strategy<Value = String> {
        let token = prop_oneof![
            Just("{"),
            Just("}"),
            Just("["),
            Just("]"),
            Just("="),
            Just(","),
            Just("\""),
            Just("\n"),
            Just("# c\n"),
            Just("/*"),
            Just("*/"),
            Just("\\"),
            Just("key"),
            Just("jwt_svids"),
            Just("07"),
            Just("-"),
            Just("true"),
        ];
        prop::collection::vec(token, 0..40).prop_map(|tokens| tokens.concat())
    }

    proptest! {
        #[test]
        fn no_text_makes_a_parser_panic(text in "\\PC{0,200}") {
            let _ = Config::from_hcl(&text);
            let _ = Config::from_yaml(&text);
        }

        #[test]
        fn no_arrangement_of_hcl_tokens_makes_the_parser_panic(text in hcl_like()) {
            let _ = Config::from_hcl(&text);
        }

        #[test]
        fn every_config_accepted_reads_back_from_its_yaml_unchanged(text in document()) {
            if let Ok(config) = Config::from_hcl(&text) {
                let yaml = config.to_yaml().map_err(|e| TestCaseError::fail(e.to_string()))?;
                let again = Config::from_yaml(&yaml).map_err(|e| TestCaseError::fail(format!("{e}\n{yaml}")))?;
                prop_assert_eq!(again, config, "{}", yaml);
            }
        }
    }
}

/// The round-trip property above is only as good as the configs it sees: most generated documents
/// are accepted.
#[test]
fn the_generated_documents_are_mostly_valid_configs() {
    use proptest::strategy::{Strategy, ValueTree};
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let accepted = (0..200)
        .filter(|_| {
            let text = properties::document().new_tree(&mut runner).expect("a document").current();
            Config::from_hcl(&text).is_ok()
        })
        .count();
    assert!(accepted >= 60, "only {accepted} of 200 generated documents were valid configs");
}
