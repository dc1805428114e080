//! `[storage]` and `[storage.shared]`: the local cache directory, its bound, and the object
//! store every replica shares.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Cache directory (blobs, manifests, tags, temp files). Default `./data`.
    pub dir: PathBuf,
    /// Bound on the bytes of cached blobs and manifests, e.g. `"50GiB"`; least recently used
    /// content is evicted beyond it. Default: unbounded.
    #[serde(
        with = "crate::size::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_size: Option<bytesize::ByteSize>,
    /// Once `max_size` is crossed, evict down to this, so eviction runs in batches.
    /// Default: `max_size`.
    #[serde(
        with = "crate::size::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub low_watermark: Option<bytesize::ByteSize>,
    /// A tier shared by every replica, in an S3-compatible object store, looked up after the
    /// local disk and before the upstream. Default: none (local disk only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<SharedStorageConfig>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            dir: PathBuf::from("./data"),
            max_size: None,
            low_watermark: None,
            shared: None,
        }
    }
}

/// `[storage.shared]`: the object store all replicas share.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SharedStorageConfig {
    /// The S3 API endpoint (Garage, MinIO, Ceph RGW, AWS S3), e.g. `http://garage:3900`.
    /// Requests are path-style. Required.
    pub endpoint: String,
    /// The bucket, which must exist. Required.
    pub bucket: String,
    /// The store's region (Garage's `s3_region`). Default `us-east-1`.
    #[serde(default = "default_region")]
    pub region: String,
    /// Bound on the bytes in the shared tier; least recently used content, across the
    /// cluster, is deleted beyond it, never an object being read or downloaded. Needs
    /// `[cluster]`, whose Redis keeps the access times. Default: unbounded.
    #[serde(
        with = "crate::size::optional",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub max_size: Option<bytesize::ByteSize>,
    /// Answer a blob found in the shared tier (and not on local disk) with a `307` to a
    /// presigned URL of the object store, so the bytes flow from it directly. For fleets whose
    /// clients reach the object store. Default false.
    #[serde(default)]
    pub redirect: bool,
    /// How long a presigned redirect URL stays valid. Default 10 minutes.
    #[serde(with = "humantime_serde", default = "default_redirect_ttl")]
    pub redirect_ttl: Duration,
    /// The object store's access key ID, from env `PULLTHROUGH_S3_ACCESS_KEY_ID` only (not
    /// a key of the file). Required with `[storage.shared]`.
    #[serde(skip)]
    pub access_key_id: Option<Secret>,
    /// The object store's secret key, from env `PULLTHROUGH_S3_SECRET_ACCESS_KEY` only (not
    /// a key of the file). Required with `[storage.shared]`.
    #[serde(skip)]
    pub secret_access_key: Option<Secret>,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

fn default_redirect_ttl() -> Duration {
    Duration::from_secs(600)
}

#[cfg(test)]
mod tests {
    use crate::config::*;

    #[test]
    fn bad_size_in_toml_shows_the_accepted_forms() {
        let err = Config::from_toml("[storage]\nmax_size = \"lots\"\n").unwrap_err();
        assert!(
            err.contains(
                "invalid size \"lots\": expected a number with an optional unit, e.g. 500MiB, 20GiB, 2TiB"
            ),
            "{err}"
        );
        assert!(err.contains("max_size"), "{err}");
        let err = Config::from_toml("[storage]\nlow_watermark = -5\n").unwrap_err();
        assert!(err.contains("invalid size \"-5\""), "{err}");
        let err = Config::from_toml("[storage]\nmax_size = true\n").unwrap_err();
        assert!(err.contains("500MiB"), "{err}");
    }

    #[test]
    fn sizes_parse_as_strings_or_byte_counts() {
        let c =
            Config::from_toml("[storage]\nmax_size = \"50GiB\"\nlow_watermark = 1000\n").unwrap();
        assert_eq!(c.storage.max_size, Some(bytesize::ByteSize::gib(50)));
        assert_eq!(c.storage.low_watermark, Some(bytesize::ByteSize(1000)));
        assert_eq!(parse_size(" 2TiB ").unwrap(), bytesize::ByteSize::tib(2));
        assert!(parse_size("-1GiB").is_err());
        assert_eq!(format_size(bytesize::ByteSize::gib(50)), "50GiB");
        assert_eq!(format_size(bytesize::ByteSize(1500)), "1500B");
    }

    #[test]
    fn a_shared_tier_bound_needs_a_cluster() {
        let shared = "[storage.shared]\nendpoint = \"http://garage:3900\"\nbucket = \"b\"\nmax_size = \"2TiB\"\n";
        let mut c = Config::from_toml(shared).unwrap();
        let s = c.storage.shared.as_mut().unwrap();
        s.access_key_id = Some(Secret::new("k"));
        s.secret_access_key = Some(Secret::new("s"));
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("storage.shared.max_size") && err.contains("[cluster]"),
            "{err}"
        );
        let mut cluster: ClusterConfig = toml::from_str(
            "redis = \"redis://redis:6379/0\"\nadvertise = \"http://10.0.0.5:5000\"",
        )
        .unwrap();
        cluster.secret = Some(Secret::new("sixteen characters"));
        c.cluster = Some(cluster);
        c.validate().unwrap();
    }
}
