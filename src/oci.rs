//! OCI names parsed once at the edge: `RepoName`, `Reference`, `Digest`, and media types.
//!
//! Every value of these types satisfies the grammar in the distribution spec, so code past the
//! router never re-checks them, and a path built from a `Digest` can never leave the cache
//! directory.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

/// Why a name, tag or digest was rejected; mapped to `NAME_INVALID` / `TAG_INVALID` /
/// `DIGEST_INVALID` by the API error layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("invalid repository name: {0}")]
    Name(String),
    #[error("invalid tag: {0}")]
    Tag(String),
    #[error("invalid digest: {0}")]
    Digest(String),
    /// A well-formed digest of another algorithm than sha256, which the mirror does not mirror.
    #[error("only sha256 digests are mirrored: {0}")]
    UnsupportedDigest(String),
}

const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A sha256 content digest: the only algorithm the mirror mirrors, so past the edge no code
/// asks which algorithm a digest uses. A well-formed digest of another algorithm is its own
/// parse error ([`ParseError::UnsupportedDigest`]), answered `404` as content the mirror does
/// not hold.
///
/// Kept as the one string clients and upstreams exchange (`sha256:<hex>`), so printing it into
/// a header or a log costs a copy, not a format; shared, since a request's digest is handed to
/// the index, the caches and the answer (a copy each cost an allocation per hit).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    text: Arc<str>,
}

/// The one algorithm a [`Digest`] has, as written before its colon.
pub const ALGORITHM: &str = "sha256";

impl Digest {
    /// The digest of `bytes`, as sha256.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        Digest::from_sha256(Sha256::digest(bytes).into())
    }

    /// The sha256 of everything `r` yields, read 1 MiB at a time. Blocking.
    pub fn sha256_of_reader(mut r: impl std::io::Read) -> std::io::Result<Digest> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1024 * 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return Ok(Digest::from_sha256(hasher.finalize().into())),
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    pub fn from_sha256(raw: [u8; 32]) -> Digest {
        Digest {
            text: format!("{ALGORITHM}:{}", hex::encode(raw)).into(),
        }
    }

    /// `algorithm:encoded`, as written on the wire.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The 64 lowercase hex characters after the colon.
    pub fn hex(&self) -> &str {
        &self.text[ALGORITHM.len() + 1..]
    }
}

impl FromStr for Digest {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseError::Digest(truncate(s));
        let (algorithm, encoded) = s.split_once(':').ok_or_else(bad)?;
        if algorithm == ALGORITHM {
            if encoded.len() != 64
                || !encoded
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                return Err(bad());
            }
            return Ok(Digest { text: s.into() });
        }
        // Any other algorithm by the spec's grammar: algorithm [a-z0-9]+ (separated by
        // [+._-]), encoded [a-zA-Z0-9=_-]+. Well-formed is "not mirrored", not "invalid".
        let alg_ok = !algorithm.is_empty()
            && algorithm.len() <= 32
            && algorithm.split(['+', '.', '_', '-']).all(|c| {
                !c.is_empty()
                    && c.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            });
        let enc_ok = !encoded.is_empty()
            && encoded.len() <= 256
            && encoded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'));
        if alg_ok && enc_ok {
            Err(ParseError::UnsupportedDigest(truncate(s)))
        } else {
            Err(bad())
        }
    }
}

/// Serialized as its wire string and parsed back, so a stored digest is checked as one from a
/// client is.
impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `ETag` for content named by `digest`: the quoted digest.
pub fn etag(digest: &Digest) -> Option<http::HeaderValue> {
    let mut etag = String::with_capacity(digest.as_str().len() + 2);
    etag.push('"');
    etag.push_str(digest.as_str());
    etag.push('"');
    http::HeaderValue::try_from(etag).ok()
}

/// A manifest's `Content-Type`, `Docker-Content-Digest` and `ETag` values, made once when the
/// manifest is cached rather than on each hit (each made value is a copy and a check).
#[derive(Clone, Debug)]
pub struct ManifestHeaders {
    pub content_type: Option<http::HeaderValue>,
    pub digest: Option<http::HeaderValue>,
    pub etag: Option<http::HeaderValue>,
}

impl ManifestHeaders {
    pub fn new(digest: &Digest, media_type: &str) -> ManifestHeaders {
        ManifestHeaders {
            content_type: http::HeaderValue::from_str(media_type).ok(),
            digest: http::HeaderValue::from_str(digest.as_str()).ok(),
            etag: etag(digest),
        }
    }
}

/// A repository name: lowercase components joined by `/`, at most 255 characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(Arc<str>);

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first component and the rest, for a name of more than one component
    /// (`ghcr.io/org/app` → `ghcr.io`, `org/app`).
    pub fn split_first(&self) -> Option<(&str, RepoName)> {
        let (first, rest) = self.0.split_once('/')?;
        // The rest of a valid name is one: whole components, and shorter.
        Some((first, RepoName(rest.into())))
    }

    /// Docker Hub's implicit namespace: `alpine` is `library/alpine`.
    pub fn with_library_prefix(self) -> RepoName {
        if self.0.contains('/') {
            self
        } else {
            RepoName(format!("library/{}", self.0).into())
        }
    }
}

fn component_ok(c: &str) -> bool {
    // [a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

impl FromStr for RepoName {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > MAX_NAME_LEN || !s.split('/').all(component_ok) {
            return Err(ParseError::Name(truncate(s)));
        }
        Ok(RepoName(s.into()))
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`. Cannot start with `.`, so never `..`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_TAG_LEN
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..]
                .iter()
                .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'.' | b'_' | b'-'));
        if ok {
            Ok(Tag(s.to_owned()))
        } else {
            Err(ParseError::Tag(truncate(s)))
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A manifest reference: a tag or a digest (anything with a `:` must be a digest).
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            s.parse().map(Reference::Digest)
        } else {
            s.parse().map(Reference::Tag)
        }
    }
}

impl Reference {
    pub fn as_str(&self) -> &str {
        match self {
            Reference::Tag(t) => t.as_str(),
            Reference::Digest(d) => d.as_str(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn truncate(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.escape_debug().to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", s[..end].escape_debug())
}

/// Manifest media types the mirror asks the upstream for and caches.
pub mod media {
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// Docker's retired schema 1, which the mirror passes through but does not store.
    pub const DOCKER_SCHEMA1_SIGNED: &str =
        "application/vnd.docker.distribution.manifest.v1+prettyjws";

    /// The four modern manifest types, as one `Accept` value for upstream requests.
    pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, \
        application/vnd.oci.image.manifest.v1+json, \
        application/vnd.docker.distribution.manifest.list.v2+json, \
        application/vnd.docker.distribution.manifest.v2+json";

    pub fn is_cacheable(media_type: &str) -> bool {
        matches!(
            media_type,
            DOCKER_MANIFEST | DOCKER_LIST | OCI_MANIFEST | OCI_INDEX
        )
    }
}

/// What a client's `Accept` headers allow. Clients send one joined header (containerd) or
/// several separate ones (dockerd, podman); both arrive here as a list of header values.
#[derive(Debug, Clone, Default)]
pub struct Accept {
    any: bool,
    /// The media types named, lowercased, each followed by `,` (one allocation for them all,
    /// rather than one each: this is parsed on every manifest request).
    types: String,
}

impl Accept {
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Accept {
        let mut accept = Accept::default();
        let mut seen = false;
        for value in values {
            accept.types.reserve(value.len() + 1);
            for item in value.split(',') {
                let mt = item.split(';').next().unwrap_or("").trim();
                if mt.is_empty() {
                    continue;
                }
                seen = true;
                if mt == "*/*" {
                    accept.any = true;
                } else {
                    accept
                        .types
                        .extend(mt.chars().map(|c| c.to_ascii_lowercase()));
                    accept.types.push(',');
                }
            }
        }
        // No Accept at all allows everything.
        accept.any |= !seen;
        accept
    }

    fn types(&self) -> impl Iterator<Item = &str> {
        self.types.split_terminator(',')
    }

    pub fn allows(&self, media_type: &str) -> bool {
        self.any || self.types().any(|t| t.eq_ignore_ascii_case(media_type))
    }

    /// The header values to forward upstream when the client's own Accept must be used.
    pub fn header_value(&self) -> Option<String> {
        if self.types.is_empty() && self.any {
            return None;
        }
        let mut parts: Vec<&str> = self.types().collect();
        if self.any {
            parts.push("*/*");
        }
        Some(parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_accepts_sha256_and_rejects_malformed() {
        let hex = "a".repeat(64);
        let d: Digest = format!("sha256:{hex}").parse().unwrap();
        assert_eq!(d.hex(), hex);
        assert_eq!(d.as_str(), format!("sha256:{hex}"));
        for bad in [
            "sha256:".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:../{}", "a".repeat(61)),
            "sha256".into(),
            ":abc".into(),
            format!("SHA256:{hex}"),
            format!("sha256:{}\0", "a".repeat(63)),
        ] {
            assert!(
                matches!(bad.parse::<Digest>(), Err(ParseError::Digest(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn a_well_formed_digest_of_another_algorithm_is_unsupported_not_invalid() {
        for other in ["sha512:abcDEF", "blake3+x:a=b_c-d", "sha384:0"] {
            assert!(
                matches!(
                    other.parse::<Digest>(),
                    Err(ParseError::UnsupportedDigest(_))
                ),
                "{other:?}"
            );
        }
        assert!(matches!(
            "sha512:a/b".parse::<Digest>(),
            Err(ParseError::Digest(_))
        ));
    }

    #[test]
    fn repo_name_follows_grammar() {
        for ok in [
            "alpine",
            "library/alpine",
            "a/b/c",
            "foo-bar",
            "foo__bar",
            "a.b",
            "x--y",
        ] {
            assert!(ok.parse::<RepoName>().is_ok(), "{ok} rejected");
        }
        for bad in [
            "", "Alpine", "..", "a/../b", "/abs", "a//b", "a/", "-a", "a-", "a___b", "a\0b", "a b",
        ] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad:?} accepted");
        }
        assert!("a".repeat(256).parse::<RepoName>().is_err());
        assert!("a".repeat(255).parse::<RepoName>().is_ok());
    }

    #[test]
    fn split_first_takes_off_one_component() {
        let n: RepoName = "ghcr.io/org/app".parse().unwrap();
        let (first, rest) = n.split_first().unwrap();
        assert_eq!((first, rest.as_str()), ("ghcr.io", "org/app"));
        assert!("alpine"
            .parse::<RepoName>()
            .unwrap()
            .split_first()
            .is_none());
    }

    #[test]
    fn library_prefix_only_for_single_component() {
        let n: RepoName = "alpine".parse().unwrap();
        assert_eq!(n.with_library_prefix().as_str(), "library/alpine");
        let n: RepoName = "me/app".parse().unwrap();
        assert_eq!(n.with_library_prefix().as_str(), "me/app");
    }

    #[test]
    fn tag_follows_grammar() {
        for ok in ["latest", "v1.2.3", "_x", "A-b_c.d"] {
            assert!(ok.parse::<Tag>().is_ok(), "{ok} rejected");
        }
        for bad in ["", ".x", "-x", "..", "a/b", "a b"] {
            assert!(bad.parse::<Tag>().is_err(), "{bad:?} accepted");
        }
        assert!("a".repeat(129).parse::<Tag>().is_err());
    }

    #[test]
    fn reference_with_colon_is_a_digest() {
        assert!(matches!(
            "latest".parse::<Reference>(),
            Ok(Reference::Tag(_))
        ));
        let d = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(d.parse::<Reference>(), Ok(Reference::Digest(_))));
        assert_eq!(
            "sha256:xyz".parse::<Reference>(),
            Err(ParseError::Digest("sha256:xyz".into()))
        );
    }

    #[test]
    fn accept_negotiation() {
        let none = Accept::parse([]);
        assert!(none.allows(media::OCI_INDEX));
        let star = Accept::parse(["application/json, */*"]);
        assert!(star.allows(media::OCI_INDEX));
        let docker = Accept::parse([media::DOCKER_MANIFEST, "application/json;q=0.5"]);
        assert!(docker.allows(media::DOCKER_MANIFEST));
        assert!(!docker.allows(media::OCI_INDEX));
        assert_eq!(
            docker.header_value().as_deref(),
            Some("application/vnd.docker.distribution.manifest.v2+json, application/json")
        );
    }
}
