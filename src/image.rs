//! Image references and platforms as users write them (`alpine:3.19`, `ghcr.io/org/app:1.0`,
//! `linux/arm64/v8`), parsed once: by the command line and the config, for `warm`; and what an
//! image's manifests list ([`Listing`]: an index's platforms, an image's config and layers),
//! for `warm` and the pull layer's prefetch.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use crate::oci::{media, Digest, Reference, RepoName, Tag};

/// Docker Hub's registry name as clients spell it in `?ns=`; images without a registry are
/// there.
pub const DOCKER_HUB: &str = "docker.io";

/// Why an image reference or a platform was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("invalid image reference {input:?}: {reason}")]
    Image { input: String, reason: String },
    #[error("invalid platform {0:?}: expected os/architecture[/variant], e.g. linux/amd64")]
    Platform(String),
}

/// An image: the registry it belongs to, the repository as that registry names it, and a tag
/// or digest. Docker's rules: a first component with a `.` or a `:`, or `localhost`, is the
/// registry; without one it is Docker Hub, where `alpine` is `library/alpine`; without a tag
/// or digest the tag is `latest`; `name:tag@digest` is the digest.
#[derive(Clone, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageRef {
    registry: String,
    repo: RepoName,
    reference: Reference,
}

impl ImageRef {
    /// The registry (`docker.io`, `ghcr.io`, `localhost:5000`): containerd's `ns`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    pub fn repo(&self) -> &RepoName {
        &self.repo
    }

    pub fn reference(&self) -> &Reference {
        &self.reference
    }
}

impl FromStr for ImageRef {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<ImageRef, ParseError> {
        let bad = |reason: &str| ParseError::Image {
            input: s.to_owned(),
            reason: reason.to_owned(),
        };
        let (name, digest) = match s.split_once('@') {
            Some((name, digest)) => (name, Some(digest)),
            None => (s, None),
        };
        // A tag follows the last `:` after the last `/` (a `:` before it is a registry port).
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
            None => (name, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains(['.', ':']) || first == "localhost" || first == "LOCALHOST" =>
            {
                (first.to_ascii_lowercase(), rest)
            }
            _ => (DOCKER_HUB.to_owned(), name),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_owned(),
            _ => registry,
        };
        let repo: RepoName = path.parse().map_err(|_| {
            bad("the repository must be lowercase letters, digits and separators (. _ -), components joined by /")
        })?;
        let repo = if registry == DOCKER_HUB {
            repo.with_library_prefix()
        } else {
            repo
        };
        let reference = match (digest, tag) {
            (Some(d), _) => Reference::Digest(
                d.parse()
                    .map_err(|_| bad("the digest must be sha256:<64 hex digits>"))?,
            ),
            (None, Some(t)) => Reference::Tag(t.parse().map_err(|_| {
                bad("a tag is up to 128 letters, digits, _ . and -, not starting with . or -")
            })?),
            (None, None) => {
                Reference::Tag(Tag::from_str("latest").map_err(|e| bad(&e.to_string()))?)
            }
        };
        Ok(ImageRef {
            registry,
            repo,
            reference,
        })
    }
}

impl TryFrom<String> for ImageRef {
    type Error = ParseError;

    fn try_from(s: String) -> Result<ImageRef, ParseError> {
        s.parse()
    }
}

impl From<ImageRef> for String {
    fn from(image: ImageRef) -> String {
        image.to_string()
    }
}

/// `docker.io/library/alpine:3.19`, `ghcr.io/org/app@sha256:…`: the full form, which parses
/// back to the same value.
impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = match self.reference {
            Reference::Tag(_) => ':',
            Reference::Digest(_) => '@',
        };
        write!(f, "{}/{}{sep}{}", self.registry, self.repo, self.reference)
    }
}

impl fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A platform of a multi-platform image, as in an index's descriptors: `os/architecture` with
/// an optional variant (`linux/arm/v7`).
#[derive(Clone, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Platform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

impl Platform {
    /// Whether an index entry for `os`/`architecture`/`variant` is this platform. Without a
    /// variant here, any variant matches; `arm64` without a variant is `arm64/v8`, as in
    /// containerd's matcher.
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        if self.os != os || self.architecture != architecture {
            return false;
        }
        let normal = |v: Option<&str>| match (architecture, v) {
            ("arm64", None) => Some("v8".to_owned()),
            (_, v) => v.map(str::to_owned),
        };
        match &self.variant {
            None => true,
            Some(want) => normal(Some(want)) == normal(variant),
        }
    }
}

impl FromStr for Platform {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Platform, ParseError> {
        let parts: Vec<&str> = s.trim().split('/').collect();
        let ok =
            |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(ok) {
            return Err(ParseError::Platform(s.to_owned()));
        }
        let lower = |p: &str| p.to_ascii_lowercase();
        Ok(Platform {
            os: lower(parts[0]),
            architecture: lower(parts[1]),
            variant: parts.get(2).map(|v| lower(v)),
        })
    }
}

impl TryFrom<String> for Platform {
    type Error = ParseError;

    fn try_from(s: String) -> Result<Platform, ParseError> {
        s.parse()
    }
}

impl From<Platform> for String {
    fn from(p: Platform) -> String {
        p.to_string()
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(v) => write!(f, "/{v}"),
            None => Ok(()),
        }
    }
}

impl fmt::Debug for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a manifest lists: an index's entries (one per platform, attestations too), or an image
/// manifest's config and layers (an OCI image manifest or a Docker schema 2 one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listing {
    Index(Vec<Entry>),
    Image(Vec<Blob>),
}

/// An entry of an index: a manifest, and the platform it is for when it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub digest: Digest,
    platform: Option<(String, String, Option<String>)>,
}

impl Entry {
    /// Whether it is for one of `platforms`, or for any when none is named (an entry without a
    /// platform, such as an attestation, is for none).
    pub fn is_for(&self, platforms: &[Platform]) -> bool {
        if platforms.is_empty() {
            return true;
        }
        let Some((os, arch, variant)) = &self.platform else {
            return false;
        };
        platforms
            .iter()
            .any(|p| p.matches(os, arch, variant.as_deref()))
    }
}

/// A config or layer blob of an image manifest, with the size the manifest gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub digest: Digest,
    pub size: u64,
}

/// Why a manifest's JSON lists nothing usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidListing(String);

#[derive(Deserialize)]
struct ListingJson {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<Vec<DescriptorJson>>,
    config: Option<DescriptorJson>,
    #[serde(default)]
    layers: Vec<DescriptorJson>,
}

#[derive(Deserialize)]
struct DescriptorJson {
    digest: String,
    size: u64,
    platform: Option<PlatformJson>,
}

#[derive(Deserialize)]
struct PlatformJson {
    os: String,
    architecture: String,
    variant: Option<String>,
}

impl Listing {
    /// Parses a manifest's bytes; `media_type` is the one it was served with, used when the
    /// JSON does not say its own.
    pub fn parse(media_type: &str, bytes: &[u8]) -> Result<Listing, InvalidListing> {
        let invalid = |detail: String| InvalidListing(detail);
        let json: ListingJson =
            serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        let digest = |d: &DescriptorJson| {
            d.digest
                .parse::<Digest>()
                .map_err(|e| invalid(e.to_string()))
        };
        let media_type = json.media_type.as_deref().unwrap_or(media_type);
        let is_index = matches!(media_type, media::OCI_INDEX | media::DOCKER_LIST)
            || (json.manifests.is_some() && json.config.is_none());
        if is_index {
            let children = json.manifests.unwrap_or_default();
            return children
                .iter()
                .map(|c| {
                    Ok(Entry {
                        digest: digest(c)?,
                        platform: c
                            .platform
                            .as_ref()
                            .map(|p| (p.os.clone(), p.architecture.clone(), p.variant.clone())),
                    })
                })
                .collect::<Result<_, InvalidListing>>()
                .map(Listing::Index);
        }
        let config = json
            .config
            .as_ref()
            .ok_or_else(|| invalid("no config and no manifests".into()))?;
        std::iter::once(config)
            .chain(&json.layers)
            .map(|d| {
                Ok(Blob {
                    digest: digest(d)?,
                    size: d.size,
                })
            })
            .collect::<Result<_, InvalidListing>>()
            .map(Listing::Image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(s: &str) -> String {
        s.parse::<ImageRef>().unwrap().to_string()
    }

    #[test]
    fn image_references_parse_as_docker_reads_them() {
        let hex = "a".repeat(64);
        assert_eq!(image("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(image("alpine:3.19"), "docker.io/library/alpine:3.19");
        assert_eq!(
            image(&format!("library/alpine@sha256:{hex}")),
            format!("docker.io/library/alpine@sha256:{hex}")
        );
        assert_eq!(image("ghcr.io/org/app:1.0"), "ghcr.io/org/app:1.0");
        assert_eq!(image("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(image("localhost/app:v1"), "localhost/app:v1");
        assert_eq!(
            image("index.docker.io/nginx"),
            "docker.io/library/nginx:latest"
        );
        assert_eq!(
            image("docker.io/bitnami/redis:7"),
            "docker.io/bitnami/redis:7"
        );
        assert_eq!(image("user/app:v2"), "docker.io/user/app:v2");
        assert_eq!(
            image(&format!("app:1@sha256:{hex}")),
            format!("docker.io/library/app@sha256:{hex}")
        );
        let i: ImageRef = "ghcr.io/org/app:1.0".parse().unwrap();
        assert_eq!(i.registry(), "ghcr.io");
        assert_eq!(i.repo().as_str(), "org/app");
        assert_eq!(i.reference().to_string(), "1.0");
    }

    #[test]
    fn bad_image_references_say_what_is_wrong() {
        for (input, says) in [
            ("Alpine", "lowercase"),
            ("alpine:", "tag"),
            ("alpine@sha256:xyz", "digest"),
            ("", "repository"),
            ("ghcr.io/", "repository"),
        ] {
            let e = input.parse::<ImageRef>().unwrap_err().to_string();
            assert!(
                e.contains(&format!("{input:?}")) && e.contains(says),
                "{input}: {e}"
            );
        }
    }

    #[test]
    fn platforms_match_index_entries() {
        let amd64: Platform = "linux/amd64".parse().unwrap();
        assert!(amd64.matches("linux", "amd64", None));
        assert!(!amd64.matches("linux", "arm64", None));
        let arm64: Platform = "linux/arm64/v8".parse().unwrap();
        assert!(arm64.matches("linux", "arm64", None));
        assert!(arm64.matches("linux", "arm64", Some("v8")));
        let armv7: Platform = "linux/arm/v7".parse().unwrap();
        assert!(!armv7.matches("linux", "arm", Some("v6")));
        assert!("linux/arm"
            .parse::<Platform>()
            .unwrap()
            .matches("linux", "arm", Some("v6")));
        assert_eq!(armv7.to_string(), "linux/arm/v7");
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux/amd64/v1/x".parse::<Platform>().is_err());
    }

    #[test]
    fn an_index_lists_its_platforms_and_an_image_its_blobs() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[
            {{"digest":"{a}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}},
            {{"digest":"{b}","size":1,"platform":{{"os":"unknown","architecture":"unknown"}}}}]}}"#
        );
        let Listing::Index(entries) = Listing::parse(media::OCI_INDEX, index.as_bytes()).unwrap()
        else {
            panic!("not an index");
        };
        let amd64: Platform = "linux/amd64".parse().unwrap();
        let wanted: Vec<_> = entries
            .iter()
            .filter(|e| e.is_for(std::slice::from_ref(&amd64)))
            .collect();
        assert_eq!(wanted.len(), 1);
        assert_eq!(wanted[0].digest.to_string(), a);
        assert_eq!(entries.iter().filter(|e| e.is_for(&[])).count(), 2);

        let image = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{a}","size":3}},"layers":[{{"digest":"{b}","size":5}}]}}"#
        );
        let Listing::Image(blobs) = Listing::parse(media::OCI_MANIFEST, image.as_bytes()).unwrap()
        else {
            panic!("not an image");
        };
        assert_eq!(blobs.iter().map(|b| b.size).sum::<u64>(), 8);
        assert_eq!(blobs[0].digest.to_string(), a, "the config comes first");
        // A Docker manifest list without its own mediaType is an index by its served type.
        let list = format!(r#"{{"schemaVersion":2,"manifests":[{{"digest":"{a}","size":1}}]}}"#);
        assert!(matches!(
            Listing::parse(media::DOCKER_LIST, list.as_bytes()),
            Ok(Listing::Index(_))
        ));
        assert!(Listing::parse(media::OCI_MANIFEST, b"<html>").is_err());
    }
}
