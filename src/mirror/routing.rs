//! Which upstream a request is for, and the repository name as that upstream knows it.
//!
//! Three ways in, one cache:
//! - containerd's `?ns=<registry>` names the registry; the path is the repository as written
//!   (a first segment that names a registry is *not* stripped: `ns` alone decides);
//! - a first path segment that is a configured registry name (`/v2/ghcr.io/org/app`) or one of
//!   its aliases (`/v2/ghcr/org/app`) names it, and the rest of the path is the repository;
//! - any other path is a repository of the default registry (`/v2/library/alpine`,
//!   `/v2/myorg/app`), as dockerd's `registry-mirrors` sends them; except that a first segment
//!   that looks like a registry host (it has a `.`, or is `localhost`: Docker Hub namespaces
//!   never do) and is not configured is refused as not mirrored, without an upstream request.
//!
//! Docker Hub's `library/` rule (`alpine` is `library/alpine`) applies to Docker Hub alone.
//! A registry with a port in its name (`registry.local:5000`) cannot be a path prefix (`:` is
//! not in the name grammar): clients reach it with `ns` or an alias.

use super::Error;
use crate::config::{Config, DOCKER_HUB};
use crate::oci::RepoName;

/// The registry names and aliases of the configured upstreams, and the default registry.
#[derive(Debug, Clone)]
pub(super) struct Routing {
    /// Registry names and aliases → the registry name (the `[upstreams]` key).
    names: crate::hashing::Map<String, String>,
    default: String,
}

impl Routing {
    pub(super) fn new(config: &Config) -> Routing {
        let mut names = crate::hashing::Map::default();
        for (name, up) in &config.upstreams {
            names.insert(name.clone(), name.clone());
            for alias in &up.aliases {
                names.insert(alias.clone(), name.clone());
            }
        }
        Routing {
            names,
            default: config.server.default_registry.clone(),
        }
    }

    /// The configured registry `segment` names (its name or an alias); Docker Hub's API host
    /// names are Docker Hub.
    fn registry(&self, segment: &str) -> Option<&str> {
        let segment = match segment {
            "registry-1.docker.io" | "index.docker.io" => DOCKER_HUB,
            s => s,
        };
        self.names.get(segment).map(String::as_str)
    }

    /// The registry a request for `name` (with containerd's `ns`, if sent) goes to, and the
    /// repository name as that registry knows it.
    pub(super) fn resolve(
        &self,
        ns: Option<&str>,
        name: &RepoName,
    ) -> Result<(&str, RepoName), Error> {
        let (registry, repo) = match ns.filter(|ns| !ns.is_empty()) {
            Some(ns) => {
                let registry = self
                    .registry(ns)
                    .ok_or_else(|| Error::NotMirrored(ns.to_owned()))?;
                (registry, name.clone())
            }
            // The rest of the name is made only when the first component is a registry.
            None => match name.as_str().split_once('/').map(|(first, _)| first) {
                Some(first) => match self.registry(first) {
                    Some(registry) => (
                        registry,
                        name.split_first()
                            .map_or_else(|| name.clone(), |(_, rest)| rest),
                    ),
                    None if looks_like_host(first) => {
                        return Err(Error::NotMirrored(first.to_owned()))
                    }
                    None => (self.default.as_str(), name.clone()),
                },
                None => (self.default.as_str(), name.clone()),
            },
        };
        let repo = if Config::is_docker_hub(registry) {
            repo.with_library_prefix()
        } else {
            repo
        };
        Ok((registry, repo))
    }

    /// The registry `ns` names (or the default registry), for `_catalog`.
    pub(super) fn registry_for(&self, ns: Option<&str>) -> Result<&str, Error> {
        match ns.filter(|ns| !ns.is_empty()) {
            Some(ns) => self
                .registry(ns)
                .ok_or_else(|| Error::NotMirrored(ns.to_owned())),
            None => Ok(self.default.as_str()),
        }
    }

    /// The name a client without `ns` pulls `repo` of `registry` by: as it is for the
    /// default registry, else behind the registry's name; `None` when no path reaches it (a
    /// registry with a port, or a name too long with its prefix).
    pub(super) fn path_name(&self, registry: &str, repo: &RepoName) -> Option<RepoName> {
        let prefixed = format!("{registry}/{repo}").parse().ok();
        let plain = (registry == self.default).then(|| repo.clone());
        [plain, prefixed].into_iter().flatten().find(|candidate| {
            self.resolve(None, candidate)
                .is_ok_and(|(r, back)| r == registry && back == *repo)
        })
    }
}

/// A segment Docker Hub never has as a namespace: a host name with a domain, or `localhost`.
/// (A `:port` never reaches here: it fails the name grammar in `routes`.)
fn looks_like_host(segment: &str) -> bool {
    segment.contains('.') || segment == "localhost"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing() -> Routing {
        let mut config = Config::default();
        for (name, aliases) in [("ghcr.io", vec!["ghcr"]), ("quay.io", vec![])] {
            let up = config.upstreams.entry(name.to_owned()).or_default();
            up.aliases = aliases.into_iter().map(str::to_owned).collect();
        }
        config.validate().unwrap();
        Routing::new(&config)
    }

    fn resolve(ns: Option<&str>, path: &str) -> Result<(String, String), String> {
        routing()
            .resolve(ns, &path.parse().unwrap())
            .map(|(r, repo)| (r.to_owned(), repo.to_string()))
            .map_err(|e| e.to_string())
    }

    fn ok(registry: &str, repo: &str) -> Result<(String, String), String> {
        Ok((registry.to_owned(), repo.to_owned()))
    }

    #[test]
    fn a_registry_prefix_or_alias_picks_the_upstream() {
        assert_eq!(resolve(None, "ghcr.io/org/app"), ok("ghcr.io", "org/app"));
        assert_eq!(resolve(None, "ghcr/org/app"), ok("ghcr.io", "org/app"));
        assert_eq!(resolve(None, "quay.io/a/b/c"), ok("quay.io", "a/b/c"));
        assert_eq!(
            resolve(None, "docker.io/library/alpine"),
            ok("docker.io", "library/alpine")
        );
        assert_eq!(
            resolve(None, "index.docker.io/alpine"),
            ok("docker.io", "library/alpine")
        );
    }

    #[test]
    fn other_paths_are_the_default_registry() {
        assert_eq!(resolve(None, "alpine"), ok("docker.io", "library/alpine"));
        assert_eq!(resolve(None, "myorg/app"), ok("docker.io", "myorg/app"));
        // A single segment is a repository, never a bare prefix.
        assert_eq!(resolve(None, "ghcr"), ok("docker.io", "library/ghcr"));
    }

    #[test]
    fn the_library_rule_is_docker_hub_only() {
        assert_eq!(resolve(None, "ghcr.io/alpine"), ok("ghcr.io", "alpine"));
        assert_eq!(
            resolve(None, "docker.io/alpine"),
            ok("docker.io", "library/alpine")
        );
        assert_eq!(resolve(Some("quay.io"), "alpine"), ok("quay.io", "alpine"));
    }

    #[test]
    fn an_unknown_host_prefix_is_not_mirrored() {
        for path in ["gcr.io/x/y", "localhost/x", "my.registry/a"] {
            let e = resolve(None, path).unwrap_err();
            assert!(e.contains("is not mirrored"), "{path}: {e}");
        }
    }

    #[test]
    fn ns_wins_and_the_path_is_kept_whole() {
        assert_eq!(
            resolve(Some("docker.io"), "ghcr.io/org/app"),
            ok("docker.io", "ghcr.io/org/app")
        );
        assert_eq!(
            resolve(Some("ghcr.io"), "org/app"),
            ok("ghcr.io", "org/app")
        );
        assert_eq!(
            resolve(Some("registry-1.docker.io"), "alpine"),
            ok("docker.io", "library/alpine")
        );
        assert_eq!(
            resolve(Some(""), "alpine"),
            ok("docker.io", "library/alpine")
        );
        assert!(resolve(Some("gcr.io"), "x/y").is_err());
    }

    #[test]
    fn path_names_lead_back_to_the_same_repository() {
        let r = routing();
        let name = |registry: &str, repo: &str| {
            r.path_name(registry, &repo.parse().unwrap())
                .map(|n| n.to_string())
        };
        assert_eq!(
            name("docker.io", "library/alpine").as_deref(),
            Some("library/alpine")
        );
        assert_eq!(
            name("ghcr.io", "org/app").as_deref(),
            Some("ghcr.io/org/app")
        );
        // A Docker Hub namespace an alias hides is reached through the registry's name.
        assert_eq!(
            name("docker.io", "ghcr/tool").as_deref(),
            Some("docker.io/ghcr/tool")
        );
    }
}
