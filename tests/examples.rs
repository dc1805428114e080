//! The shipped configs are ones the mirror accepts.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

use pullthrough::config::Config;

#[test]
fn container_config_is_valid() {
    let text = std::fs::read_to_string("examples/mirror.container.toml").unwrap();
    let config = Config::from_toml(&text).unwrap();
    config.validate().unwrap();
    assert_eq!(config.storage.dir.to_str(), Some("/var/lib/pullthrough"));
}

#[test]
fn repository_config_is_valid() {
    let text = std::fs::read_to_string("mirror.toml").unwrap();
    Config::from_toml(&text).unwrap().validate().unwrap();
}

/// The `mirror.toml: |` block of a ConfigMap, without its indentation.
fn configmap_file(yaml: &str, key: &str) -> String {
    let header = format!("  {key}: |");
    let mut lines = yaml.lines().skip_while(|l| l.trim_end() != header).skip(1);
    let mut text = String::new();
    for line in lines.by_ref() {
        if !line.is_empty() && !line.starts_with("    ") {
            break;
        }
        text.push_str(line.strip_prefix("    ").unwrap_or(line));
        text.push('\n');
    }
    text
}

#[test]
fn kubernetes_configmap_holds_a_valid_config() {
    let yaml = std::fs::read_to_string("examples/kubernetes/configmap.yaml").unwrap();
    let text = configmap_file(&yaml, "mirror.toml");
    assert!(text.contains("[upstreams.\"docker.io\"]"), "{text}");
    let config = Config::from_toml(&text).unwrap();
    config.validate().unwrap();
    let statefulset = std::fs::read_to_string("examples/kubernetes/statefulset.yaml").unwrap();
    let dir = config.storage.dir.to_str().unwrap();
    assert!(
        statefulset.contains(&format!("mountPath: {dir}\n")),
        "storage.dir {dir} is not the volume's mount path"
    );
    let max = config.storage.max_size.unwrap();
    assert!(
        max < bytesize::ByteSize::gib(50) && statefulset.contains("storage: 50Gi"),
        "storage.max_size {max} must stay below the volume's 50Gi"
    );
}

#[test]
fn several_registries_config_is_valid() {
    let text = std::fs::read_to_string("examples/registries.toml").unwrap();
    let config = Config::from_toml(&text).unwrap();
    config.validate().unwrap();
    for registry in [
        "docker.io",
        "ghcr.io",
        "quay.io",
        "registry.k8s.io",
        "registry.example.com",
    ] {
        assert!(config.upstreams.contains_key(registry), "{registry}");
    }
}

/// Every registry the mirror config names has a containerd hosts.toml and a registries.conf
/// prefix mirror, so the client files and the mirror config cannot drift apart.
#[test]
fn client_files_cover_every_configured_registry() {
    let text = std::fs::read_to_string("examples/registries.toml").unwrap();
    let config = Config::from_toml(&text).unwrap();
    let conf = std::fs::read_to_string("examples/registries.conf").unwrap();
    for registry in config.upstreams.keys() {
        let hosts = format!("examples/containerd/certs.d/{registry}/hosts.toml");
        let hosts = std::fs::read_to_string(&hosts).unwrap_or_else(|e| panic!("{hosts}: {e}"));
        assert!(
            hosts.contains("[host.\"http://mirror.example:5000\"]"),
            "{registry}"
        );
        assert!(
            conf.contains(&format!("prefix = \"{registry}\"")),
            "{registry}"
        );
        if registry != "docker.io" {
            assert!(
                conf.contains(&format!("location = \"mirror.example:5000/{registry}\"")),
                "{registry}"
            );
        }
    }
}
