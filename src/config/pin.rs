//! `[[pin]]`: images and repositories whose manifests and blobs are never evicted.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::image::{ImageRef, Platform, DOCKER_HUB};
use crate::oci::{Reference, RepoName, Tag};

/// `[[pin]]`: an image (or every tag of the repositories a glob matches) whose manifests and
/// blobs are never evicted, from the local disk or the shared tier. Pinned content counts
/// towards `storage.max_size`; a pin set larger than it is an error at start. Pins added with
/// `pullthrough cache pin` are kept in the storage directory instead.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PinConfig {
    /// An image as users write it: `library/alpine:3.20`, `ghcr.io/org/app:1.0`,
    /// `alpine@sha256:…` (the registry must be a key of `[upstreams]`); the manifest the tag
    /// points to now is pinned, and follows the tag when it moves. Required unless
    /// `repository` is set (not both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRef>,
    /// A glob over repository names as the registry names them (`library/*`,
    /// `ghcr.io/org/**`; a first component with a `.` or `:` names the registry, else it is
    /// Docker Hub): every cached tag of every matching repository is pinned. Required unless
    /// `image` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<RepoPattern>,
    /// Platforms of multi-platform images to pin (`linux/amd64`); the others may be evicted.
    /// Default: empty, every platform in the index (attestations too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<Platform>,
}

impl PinConfig {
    /// A pin of one image.
    pub fn image(image: ImageRef, platforms: Vec<Platform>) -> PinConfig {
        PinConfig {
            image: Some(image),
            repository: None,
            platforms,
        }
    }

    /// The registry whose content it pins.
    pub fn registry(&self) -> &str {
        match (&self.image, &self.repository) {
            (Some(image), _) => image.registry(),
            (None, Some(pattern)) => &pattern.registry,
            (None, None) => "",
        }
    }

    /// Whether a tag of `registry`/`repo` is one this pin follows.
    pub fn follows(&self, registry: &str, repo: &RepoName, tag: &Tag) -> bool {
        if let Some(image) = &self.image {
            return image.registry() == registry
                && image.repo() == repo
                && matches!(image.reference(), Reference::Tag(t) if t == tag);
        }
        self.repository
            .as_ref()
            .is_some_and(|p| p.matches(registry, repo))
    }
}

/// `ghcr.io/org/*`: a registry (Docker Hub unless the first component names one) and a glob
/// over its repository names; `*` matches across `/` too.
#[derive(Clone)]
pub struct RepoPattern {
    registry: String,
    glob: String,
    matcher: globset::GlobMatcher,
    source: String,
}

impl RepoPattern {
    pub fn registry(&self) -> &str {
        &self.registry
    }

    pub fn matches(&self, registry: &str, repo: &RepoName) -> bool {
        self.registry == registry && self.matcher.is_match(repo.as_str())
    }
}

impl FromStr for RepoPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<RepoPattern, String> {
        let (registry, glob) = match s.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_ascii_lowercase(), rest)
            }
            _ => (DOCKER_HUB.to_owned(), s),
        };
        if glob.is_empty() {
            return Err(format!(
                "invalid repository pattern {s:?}: no repository glob"
            ));
        }
        let matcher = globset::Glob::new(glob)
            .map_err(|e| format!("invalid repository pattern {s:?}: {e}"))?
            .compile_matcher();
        Ok(RepoPattern {
            registry,
            glob: glob.to_owned(),
            matcher,
            source: s.to_owned(),
        })
    }
}

impl fmt::Display for RepoPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.glob)
    }
}

impl fmt::Debug for RepoPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl PartialEq for RepoPattern {
    fn eq(&self, other: &RepoPattern) -> bool {
        self.registry == other.registry && self.glob == other.glob
    }
}

impl Eq for RepoPattern {}

impl<'de> Deserialize<'de> for RepoPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RepoPattern, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(<D::Error as serde::de::Error>::custom)
    }
}

impl Serialize for RepoPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.source.serialize(s)
    }
}

/// `docker.io/library/alpine:3.20 (linux/amd64)`, `docker.io/library/*`: a pin as the status
/// page and the commands name it.
impl fmt::Display for PinConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.image, &self.repository) {
            (Some(image), _) => write!(f, "{image}")?,
            (None, Some(pattern)) => write!(f, "{pattern}")?,
            (None, None) => write!(f, "(nothing)")?,
        }
        if !self.platforms.is_empty() {
            let names: Vec<String> = self.platforms.iter().map(Platform::to_string).collect();
            write!(f, " ({})", names.join(","))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::*;

    #[test]
    fn pins_parse_images_globs_and_platforms() {
        let c = Config::from_toml(
            "[[pin]]\nimage = \"library/alpine:3.20\"\nplatforms = [\"linux/amd64\"]\n\
             [[pin]]\nrepository = \"library/*\"\n\
             [[pin]]\nrepository = \"ghcr.io/org/**\"\n",
        )
        .unwrap();
        assert_eq!(
            c.pin[0].to_string(),
            "docker.io/library/alpine:3.20 (linux/amd64)"
        );
        let lib = c.pin[1].repository.as_ref().unwrap();
        assert!(lib.matches("docker.io", &"library/busybox".parse().unwrap()));
        assert!(!lib.matches("ghcr.io", &"library/busybox".parse().unwrap()));
        assert_eq!(c.pin[2].registry(), "ghcr.io");
        let back = Config::from_toml(&c.to_redacted_toml().unwrap()).unwrap();
        assert_eq!(back.pin, c.pin);
    }

    #[test]
    fn a_pin_names_one_thing_on_a_mirrored_registry() {
        let neither = Config::from_toml("[[pin]]\nplatforms = [\"linux/amd64\"]\n").unwrap();
        let e = neither.validate().unwrap_err().to_string();
        assert!(
            e.contains("pin") && e.contains("image or repository"),
            "{e}"
        );
        let both =
            Config::from_toml("[[pin]]\nimage = \"alpine\"\nrepository = \"library/*\"\n").unwrap();
        assert!(both.validate().is_err());
        let elsewhere = Config::from_toml("[[pin]]\nimage = \"quay.io/x/y:1\"\n").unwrap();
        let e = elsewhere.validate().unwrap_err().to_string();
        assert!(e.contains("quay.io"), "{e}");
        let e = Config::from_toml("[[pin]]\nrepository = \"library/[\"\n").unwrap_err();
        assert!(e.contains("invalid repository pattern"), "{e}");
    }
}
