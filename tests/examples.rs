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

/// Every file under `dir`, relative, with its bytes; directories with `None`.
fn tree(dir: &std::path::Path) -> std::collections::BTreeMap<String, Option<Vec<u8>>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let name = path.strip_prefix(dir).unwrap().display().to_string();
            if path.is_dir() {
                out.insert(name, None);
                stack.push(path);
            } else {
                out.insert(name, Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

/// The node-hosts script, running in its own process group (its `sleep` too).
struct NodeHosts {
    child: std::process::Child,
    stdout: std::sync::mpsc::Receiver<String>,
}

impl NodeHosts {
    fn start(shell: &[&str], dir: &std::path::Path) -> NodeHosts {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new(shell[0])
            .args(&shell[1..])
            .arg(dir.join("node-hosts.sh"))
            .env("CERTS_D", dir.join("certs.d"))
            .env("CONFIG", dir.join("mirror.toml"))
            .env("MIRROR", "http://10.96.0.50:5000")
            .stdout(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines() {
                if tx.send(line.unwrap()).is_err() {
                    return;
                }
            }
        });
        let mut node = NodeHosts { child, stdout: rx };
        node.wait_for_line("ready");
        node
    }

    fn wait_for_line(&mut self, want: &str) {
        loop {
            // A generous deadline: the script answers in milliseconds.
            match self.stdout.recv_timeout(std::time::Duration::from_secs(60)) {
                Ok(line) if line == want => return,
                Ok(_) => {}
                Err(e) => panic!(
                    "no `{want}` from the script ({e}): {:?}",
                    self.child.try_wait()
                ),
            }
        }
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on the child's own pid; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    fn wait(mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the script did not stop"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for NodeHosts {
    fn drop(&mut self) {
        // Whatever the script left running in its group (its sleep after a SIGKILL).
        let group = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on the child's process group; no memory is involved.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// examples/kubernetes/node-hosts/daemonset.yaml's script, run as its DaemonSet runs it but on a temp
/// dir: it writes a hosts.toml for every registry of the mirror's config through the Service's
/// address, keeps the node's own aside, survives a SIGKILL and a restart without losing it, and
/// on SIGTERM leaves the directory exactly as it found it. With `sh` and, when installed,
/// `busybox sh` (the image's shell).
#[test]
fn kubernetes_node_hosts_script_writes_hosts_toml_and_puts_the_node_back_on_sigterm() {
    let yaml = std::fs::read_to_string("examples/kubernetes/node-hosts/daemonset.yaml").unwrap();
    let script = configmap_file(&yaml, "node-hosts.sh");
    assert!(script.contains("trap stop TERM"), "{script}");
    let service = std::fs::read_to_string("examples/kubernetes/service.yaml").unwrap();
    assert!(
        service.contains("clusterIP: 10.96.0.50\n") && service.contains("port: 5000\n"),
        "the Service is not the address the DaemonSet's MIRROR names"
    );
    assert!(yaml.contains("value: http://10.96.0.50:5000\n"));
    // The mirror's config as the DaemonSet mounts it, with two more registries.
    let configmap = std::fs::read_to_string("examples/kubernetes/configmap.yaml").unwrap();
    let config = configmap_file(&configmap, "mirror.toml")
        + "\n[upstreams.\"ghcr.io\"]\nurl = \"https://ghcr.io\"\n\
           [upstreams.\"quay.io\"]\nurl = \"https://quay.io\"\n";
    Config::from_toml(&config).unwrap().validate().unwrap();

    let mut shells = vec![vec!["sh"]];
    if std::process::Command::new("busybox")
        .arg("true")
        .status()
        .is_ok_and(|s| s.success())
    {
        shells.push(vec!["busybox", "sh"]);
    }
    for shell in shells {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("node-hosts.sh"), &script).unwrap();
        std::fs::write(dir.path().join("mirror.toml"), &config).unwrap();
        // What the node had: its own hosts.toml for docker.io, a CA for quay.io, and a
        // registry the mirror does not serve.
        let certs = dir.path().join("certs.d");
        let own = "server = \"https://registry-1.docker.io\"\n# the node's own\n";
        for (file, text) in [
            ("docker.io/hosts.toml", own),
            ("quay.io/ca.crt", "a CA\n"),
            (
                "example.org/hosts.toml",
                "server = \"https://example.org\"\n",
            ),
        ] {
            let path = certs.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let before = tree(&certs);

        let node = NodeHosts::start(&shell, dir.path());
        let written = |registry: &str| {
            let text = std::fs::read_to_string(certs.join(registry).join("hosts.toml")).unwrap();
            let toml: toml::Table = toml::from_str(&text).unwrap();
            let server = toml["server"].as_str().unwrap().to_owned();
            let host = &toml["host"]["http://10.96.0.50:5000"]["capabilities"];
            assert_eq!(
                host.as_array().unwrap().len(),
                2,
                "{shell:?} {registry}: {text}"
            );
            server
        };
        assert_eq!(written("docker.io"), "https://registry-1.docker.io");
        assert_eq!(written("ghcr.io"), "https://ghcr.io");
        assert_eq!(written("quay.io"), "https://quay.io");
        let saved = certs.join("docker.io/hosts.toml.pullthrough-backup");
        assert_eq!(std::fs::read_to_string(&saved).unwrap(), own);
        assert_eq!(
            std::fs::read_to_string(certs.join("quay.io/ca.crt")).unwrap(),
            "a CA\n"
        );
        let untouched = certs.join("example.org/hosts.toml");
        assert_eq!(
            std::fs::read_to_string(&untouched).unwrap(),
            "server = \"https://example.org\"\n"
        );

        // Killed without a chance to clean up, then started again: the saved file stays.
        node.signal(libc::SIGKILL);
        assert!(!node.wait().success());
        let node = NodeHosts::start(&shell, dir.path());
        assert_eq!(std::fs::read_to_string(&saved).unwrap(), own, "{shell:?}");
        assert_eq!(written("docker.io"), "https://registry-1.docker.io");

        // The DaemonSet deleted: SIGTERM to the container's shell.
        node.signal(libc::SIGTERM);
        let status = node.wait();
        assert!(status.success(), "{shell:?}: {status}");
        assert_eq!(
            tree(&certs),
            before,
            "{shell:?}: the node's certs.d differs"
        );
    }
}
