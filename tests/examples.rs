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

/// The environment of one replica of examples/cluster/compose.yaml.
fn cluster_env(advertise: &str) -> impl Fn(&str) -> Option<String> + '_ {
    move |key| match key {
        "PULLTHROUGH_S3_ACCESS_KEY_ID" => Some("GK0123456789abcdef01234567".to_owned()),
        "PULLTHROUGH_S3_SECRET_ACCESS_KEY" => Some("0".repeat(64)),
        "PULLTHROUGH_CLUSTER_SECRET" => Some("a-cluster-secret-of-some-length".to_owned()),
        "PULLTHROUGH_CLUSTER_ADVERTISE" => Some(advertise.to_owned()),
        _ => None,
    }
}

/// The replica config every replica of the cluster example (and tests/cluster/run.sh) reads
/// is valid with the environment compose.yaml gives each replica, names the region Garage's
/// garage.toml serves, and each replica advertises the name nginx.conf balances over.
#[test]
fn cluster_example_config_is_valid_for_each_replica() {
    let text = std::fs::read_to_string("examples/cluster/pullthrough.toml").unwrap();
    let compose = std::fs::read_to_string("examples/cluster/compose.yaml").unwrap();
    let nginx = std::fs::read_to_string("examples/cluster/nginx.conf").unwrap();
    let garage: toml::Table =
        toml::from_str(&std::fs::read_to_string("examples/cluster/garage.toml").unwrap()).unwrap();
    for replica in 1..=3 {
        let advertise = format!("http://pullthrough-{replica}:5000");
        assert!(
            compose.contains(&format!("PULLTHROUGH_CLUSTER_ADVERTISE: {advertise}\n")),
            "compose.yaml does not give replica {replica} its address"
        );
        assert!(
            nginx.contains(&format!("server pullthrough-{replica}:5000 ")),
            "nginx.conf does not balance over replica {replica}"
        );
        let mut config = Config::from_toml(&text).unwrap();
        config.apply_env(cluster_env(&advertise));
        config.validate().unwrap();
        assert_eq!(config.cluster.unwrap().advertise, advertise);
        let shared = config.storage.shared.unwrap();
        assert_eq!(
            Some(shared.region.as_str()),
            garage["s3_api"]["s3_region"].as_str()
        );
        assert_eq!(shared.bucket, "pullthrough");
    }
}

#[test]
fn cluster_example_config_needs_the_secrets_from_the_environment() {
    let text = std::fs::read_to_string("examples/cluster/pullthrough.toml").unwrap();
    let config = Config::from_toml(&text).unwrap();
    assert!(config.validate().is_err());
}
