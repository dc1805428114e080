//! Loading: the TOML file (or the defaults), then the environment, then the command line,
//! then [`Config::validate`]; and the configuration printed back as TOML.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Config, ConfigError, LogFormat, UpstreamConfig, DOCKER_HUB_URL};
use crate::secret::Secret;

/// Overrides from the command line; `None` leaves the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub storage_dir: Option<PathBuf>,
    pub max_size: Option<bytesize::ByteSize>,
    pub upstream: Option<String>,
    pub tag_ttl: Option<Duration>,
    pub log_format: Option<LogFormat>,
}

impl Config {
    /// Reads `path` (or the defaults when `None`), then applies the environment and the CLI
    /// overrides, then validates.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        cli: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Config::from_toml(&text).map_err(|message| ConfigError::Parse {
                    path: path.to_owned(),
                    message,
                })?
            }
            None => Config::default(),
        };
        config.apply_env(env);
        config.apply_overrides(cli);
        config.validate()?;
        Ok(config)
    }

    /// Parses a config file. The error names the line and column and says what is wrong,
    /// but never quotes the file: the offending line may hold a password.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let message = e.message().trim_end();
            match e.span() {
                Some(span) => {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
                    let column = before.len() - line_start + 1;
                    // The key is safe to show; what follows `=` may be a secret.
                    let key = text[line_start..]
                        .lines()
                        .next()
                        .and_then(|l| l.split_once('='))
                        .map(|(k, _)| k.trim())
                        .filter(|k| !k.is_empty());
                    match key {
                        Some(key) => format!("line {line}, column {column}, key {key}: {message}"),
                        None => format!("line {line}, column {column}: {message}"),
                    }
                }
                None => message.to_owned(),
            }
        })?;
        // Spelled out, so that a printed config shows where an upstream without either goes.
        for up in config.upstreams.values_mut() {
            if up.url.is_empty() && up.urls.is_empty() {
                up.url = DOCKER_HUB_URL.to_owned();
            }
        }
        Ok(config)
    }

    fn default_upstream_mut(&mut self) -> &mut UpstreamConfig {
        self.upstreams
            .entry(self.server.default_registry.clone())
            .or_default()
    }

    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        // An empty variable means "not set", so `VAR=` in a compose file stays anonymous.
        let env = |k: &str| env(k).filter(|v| !v.is_empty());
        if let Some(user) = env("PULLTHROUGH_UPSTREAM_USERNAME") {
            self.default_upstream_mut().username = Some(user);
        }
        if let Some(pass) = env("PULLTHROUGH_UPSTREAM_PASSWORD") {
            self.default_upstream_mut().password = Some(Secret::new(pass));
        }
        if let Some(shared) = &mut self.storage.shared {
            shared.access_key_id = env("PULLTHROUGH_S3_ACCESS_KEY_ID").map(Secret::new);
            shared.secret_access_key = env("PULLTHROUGH_S3_SECRET_ACCESS_KEY").map(Secret::new);
        }
        if let Some(cluster) = &mut self.cluster {
            cluster.secret = env("PULLTHROUGH_CLUSTER_SECRET").map(Secret::new);
            if let Some(advertise) = env("PULLTHROUGH_CLUSTER_ADVERTISE") {
                cluster.advertise = advertise;
            }
        }
    }

    pub fn apply_overrides(&mut self, cli: &Overrides) {
        if let Some(listen) = cli.listen {
            self.server.listen = listen;
        }
        if let Some(dir) = &cli.storage_dir {
            self.storage.dir = dir.clone();
        }
        if let Some(max) = cli.max_size {
            self.storage.max_size = Some(max);
        }
        if let Some(url) = &cli.upstream {
            let up = self.default_upstream_mut();
            up.url = url.clone();
            up.urls.clear();
        }
        if let Some(ttl) = cli.tag_ttl {
            self.cache.tag_ttl = ttl;
        }
        if let Some(format) = cli.log_format {
            self.log.format = format;
        }
    }

    /// The configuration as TOML that [`Config::from_toml`] reads back, secrets as
    /// `[REDACTED]`.
    pub fn to_redacted_toml(&self) -> Result<String, String> {
        toml::to_string_pretty(self).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DOCKER_HUB;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn a_parse_error_never_quotes_the_file() {
        let text = "[upstreams.\"docker.io\"]\nusername = \"me\"\npasword = \"PWsecret-123\"\n";
        let e = Config::from_toml(text).unwrap_err();
        assert!(!e.contains("PWsecret"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("pasword"), "names the unknown field: {e}");
        let e = Config::from_toml("[upstreams.\"docker.io\"]\npassword = 987654321\n").unwrap_err();
        assert!(!e.contains("987654321"), "{e}");
    }

    #[test]
    fn defaults_mirror_docker_hub() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:5000");
        assert_eq!(c.upstreams[DOCKER_HUB].base_urls(), [DOCKER_HUB_URL]);
        assert_eq!(c.cache.tag_ttl, Duration::from_secs(300));
        c.validate().unwrap();
    }

    #[test]
    fn tracing_settings_are_checked() {
        let c = Config::from_toml(
            "[tracing]\notlp_endpoint = \"http://collector:4318\"\nsample_ratio = 0.25\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.tracing.sample_ratio, 0.25);
        let err = Config::from_toml("[tracing]\nsample_ratio = 1.5\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tracing.sample_ratio") && err.contains("1.5"),
            "{err}"
        );
        let err = Config::from_toml("[tracing]\notlp_endpoint = \"grpc://c:4317\"\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("tracing.otlp_endpoint"), "{err}");
        let err = Config::from_toml("[tracing]\nendpoint = \"http://c\"\n").unwrap_err();
        assert!(err.contains("endpoint"), "{err}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("[server]\nlisten_addr = \"x\"\n").unwrap_err();
        assert!(err.contains("listen_addr"), "{err}");
        let err = Config::from_toml("bogus = 1\n").unwrap_err();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn bad_values_name_key_and_value() {
        let err = Config::from_toml("[cache]\ntag_ttl = \"soon\"\n").unwrap_err();
        assert!(err.contains("tag_ttl") && err.contains("soon"), "{err}");
        let mut c = Config::default();
        c.upstreams.get_mut(DOCKER_HUB).unwrap().url = "ftp://x".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("upstreams.\"docker.io\".url") && err.contains("ftp://x"),
            "{err}"
        );
    }

    #[test]
    fn env_then_cli_override_file() {
        let file = "[upstreams.\"docker.io\"]\nurl = \"http://127.0.0.1:1\"\nusername = \"a\"\n";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.toml");
        std::fs::write(&path, file).unwrap();
        let env = |k: &str| match k {
            "PULLTHROUGH_UPSTREAM_USERNAME" => Some("envuser".to_string()),
            "PULLTHROUGH_UPSTREAM_PASSWORD" => Some("hunter2".to_string()),
            _ => None,
        };
        let cli = Overrides {
            upstream: Some("http://127.0.0.1:2".into()),
            tag_ttl: Some(Duration::from_secs(1)),
            ..Overrides::default()
        };
        let c = Config::load(Some(&path), env, &cli).unwrap();
        let up = &c.upstreams[DOCKER_HUB];
        assert_eq!(up.url, "http://127.0.0.1:2");
        assert_eq!(up.username.as_deref(), Some("envuser"));
        assert_eq!(up.password.as_ref().map(Secret::expose), Some("hunter2"));
        assert_eq!(c.cache.tag_ttl, Duration::from_secs(1));
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2") && debug.contains("[REDACTED]"));
    }

    #[test]
    fn repository_mirror_toml_is_valid() {
        let text = include_str!("../../mirror.toml");
        let c = Config::from_toml(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:5000");
        assert_eq!(c.storage.dir, PathBuf::from("./data"));
        let _ = Config::load(None, no_env, &Overrides::default()).unwrap();
    }

    #[test]
    fn printed_config_reads_back_the_same_and_hides_secrets() {
        let mut c = Config::default();
        c.storage.max_size = Some(bytesize::ByteSize::gib(20));
        c.server.tokens = vec![Secret::new("tok-123")];
        c.server.allow = vec!["10.0.0.0/8".parse().unwrap()];
        let up = c.upstreams.get_mut(DOCKER_HUB).unwrap();
        up.username = Some("me".into());
        up.password = Some(Secret::new("hunter2"));
        let text = c.to_redacted_toml().unwrap();
        assert!(
            !text.contains("hunter2") && !text.contains("tok-123"),
            "{text}"
        );
        assert!(text.contains("password = \"[REDACTED]\""), "{text}");
        let back = Config::from_toml(&text).unwrap();
        assert_eq!(back.storage.max_size, c.storage.max_size);
        assert_eq!(back.cache.tag_ttl, c.cache.tag_ttl);
        assert_eq!(back.server.allow, c.server.allow);
        assert_eq!(back.upstreams[DOCKER_HUB].base_urls(), [DOCKER_HUB_URL]);
        assert_eq!(back.upstreams[DOCKER_HUB].username.as_deref(), Some("me"));
        back.validate().unwrap();
    }
}
