//! `crds/` (and the chart's copy) must hold exactly what `slim-operator crds` prints.

use std::path::PathBuf;

use slim_operator::api;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn committed_crds_match_the_rust_types() {
    let regenerate = "regenerate with \
                      `SLIM_UPDATE_CRDS=1 cargo test -p slim-operator --test crds_up_to_date`";
    let mut expected_files = Vec::new();
    for crd in api::crds() {
        let path = repo_root().join("crds").join(api::crd_file_name(&crd));
        let yaml = api::crd_yaml(&crd).expect("render CRD");
        if std::env::var_os("SLIM_UPDATE_CRDS").is_some() {
            std::fs::write(&path, &yaml).expect("write CRD");
            // The chart ships the same files (tests/tests/chart.rs keeps them identical).
            let chart_copy = repo_root().join("charts/slim-operator/crds").join(api::crd_file_name(&crd));
            std::fs::write(chart_copy, &yaml).expect("write chart CRD");
        }
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{} is missing ({e}); {regenerate}", path.display()));
        assert!(committed == yaml, "{} is out of date with the Rust types; {regenerate}", path.display());
        expected_files.push(api::crd_file_name(&crd));
    }
    let mut present: Vec<String> = std::fs::read_dir(repo_root().join("crds"))
        .expect("crds/ exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(present, expected_files, "crds/ holds files no CRD generates; {regenerate}");
}

#[test]
fn printed_stream_is_the_committed_files_concatenated() {
    let printed = api::crds_yaml().expect("render");
    let concatenated: String = api::crds()
        .iter()
        .map(|crd| std::fs::read_to_string(repo_root().join("crds").join(api::crd_file_name(crd))).unwrap_or_default())
        .collect();
    assert_eq!(printed, concatenated);
}
