//! Tag records: which digest a tag pointed to when it was last fetched or revalidated.
//! Written through to disk so a restarted mirror still knows its tags, and kept in memory so a
//! tag within its TTL costs no I/O.

use std::io;
use std::path::PathBuf;
use std::time::SystemTime;

use moka::sync::Cache;
use serde::{Deserialize, Serialize};

use super::{blocking, write_atomic};
use crate::oci::{Digest, RepoName, Tag};

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct TagKey {
    pub registry: String,
    pub repo: RepoName,
    pub tag: Tag,
}

/// What a tag pointed to, as kept on disk (JSON) and shared with the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    #[serde(with = "crate::clock::as_unix_secs")]
    pub fetched_at: SystemTime,
}

pub struct Tags {
    dir: PathBuf,
    tmp: PathBuf,
    memory: Cache<TagKey, TagRecord, crate::hashing::State>,
}

impl Tags {
    pub(super) fn new(dir: PathBuf, tmp: PathBuf) -> Tags {
        Tags {
            dir,
            tmp,
            memory: Cache::builder()
                .max_capacity(100_000)
                .build_with_hasher(crate::hashing::State::default()),
        }
    }

    fn path(&self, key: &TagKey) -> PathBuf {
        // `_tags` cannot collide with a repository component, which never starts with `_`.
        self.dir
            .join(&key.registry)
            .join(key.repo.as_str())
            .join("_tags")
            .join(key.tag.as_str())
    }

    pub async fn get(&self, key: &TagKey) -> io::Result<Option<TagRecord>> {
        if let Some(r) = self.memory.get(key) {
            return Ok(Some(r));
        }
        let path = self.path(key);
        let raw = blocking(move || match std::fs::read(&path) {
            Ok(raw) => Ok(Some(raw)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await?;
        let Some(raw) = raw else { return Ok(None) };
        match serde_json::from_slice::<TagRecord>(&raw).ok() {
            Some(r) => {
                self.memory.insert(key.clone(), r.clone());
                Ok(Some(r))
            }
            None => {
                tracing::warn!(registry = %key.registry, repo = %key.repo, tag = %key.tag, "unreadable tag record; ignoring it");
                Ok(None)
            }
        }
    }

    /// The repositories of `registry` that hold at least one tag record, sorted: what
    /// `_catalog` lists. Only directories whose names are valid repository names count.
    pub async fn repositories(&self, registry: &str) -> io::Result<Vec<RepoName>> {
        let root = self.dir.join(registry);
        blocking(move || repositories_under(&root)).await
    }

    /// The tag records of `registry`/`repo` on disk, by tag, unreadable ones left out.
    /// Blocking.
    pub(super) fn records_on_disk(
        &self,
        registry: &str,
        repo: &RepoName,
    ) -> io::Result<Vec<(Tag, TagRecord)>> {
        let dir = self.dir.join(registry).join(repo.as_str()).join("_tags");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let Some(tag) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            let record = std::fs::read(entry.path())
                .ok()
                .and_then(|raw| serde_json::from_slice(&raw).ok());
            found.extend(record.map(|r| (tag, r)));
        }
        Ok(found)
    }

    /// The tag record on disk, if any. Blocking.
    pub(super) fn record_on_disk(&self, key: &TagKey) -> Option<TagRecord> {
        let raw = std::fs::read(self.path(key)).ok()?;
        serde_json::from_slice(&raw).ok()
    }

    /// The repositories of `registry` with a tag record, sorted. Blocking.
    pub(super) fn repositories_on_disk(&self, registry: &str) -> io::Result<Vec<RepoName>> {
        repositories_under(&self.dir.join(registry))
    }

    /// Forgets the tag's record, in memory and on disk (a purge); whether there was one.
    pub async fn remove(&self, key: &TagKey) -> io::Result<bool> {
        let in_memory = self.memory.remove(key).is_some();
        let path = self.path(key);
        let on_disk = blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        })
        .await?;
        Ok(in_memory || on_disk)
    }

    /// The tags of the repository that have a record on disk, sorted (only valid tag names).
    pub async fn list(&self, registry: &str, repo: &RepoName) -> io::Result<Vec<Tag>> {
        let dir = self.dir.join(registry).join(repo.as_str()).join("_tags");
        blocking(move || {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            let mut tags = Vec::new();
            for entry in entries {
                let name = entry?.file_name();
                tags.extend(name.to_str().and_then(|n| n.parse::<Tag>().ok()));
            }
            tags.sort();
            Ok(tags)
        })
        .await
    }

    pub async fn put(&self, key: &TagKey, record: TagRecord) -> io::Result<()> {
        let raw = serde_json::to_vec(&record).map_err(io::Error::other)?;
        let path = self.path(key);
        let tmp = self.tmp.clone();
        self.memory.insert(key.clone(), record);
        blocking(move || write_atomic(&tmp, &path, &raw)).await
    }
}

/// The repositories with a `_tags` directory under `root` (one registry's), sorted.
fn repositories_under(root: &std::path::Path) -> io::Result<Vec<RepoName>> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            let path = entry.path();
            if entry.file_name() == "_tags" {
                let name = dir
                    .strip_prefix(root)
                    .ok()
                    .and_then(|rel| rel.to_str())
                    .and_then(|rel| rel.parse::<RepoName>().ok());
                found.extend(name);
            } else {
                pending.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_record_written_by_an_earlier_version_is_read_as_it_was() {
        let hex = "ab".repeat(32);
        let on_disk = format!(
            r#"{{"digest":"sha256:{hex}","media_type":"application/vnd.oci.image.index.v1+json","size":1234,"fetched_at":1700000000}}"#
        );
        let record: TagRecord = serde_json::from_str(&on_disk).unwrap();
        assert_eq!(record.digest.hex(), hex);
        assert_eq!(record.size, 1234);
        assert_eq!(
            record.fetched_at,
            crate::clock::from_unix_secs(1_700_000_000)
        );
        assert_eq!(serde_json::to_string(&record).unwrap(), on_disk);
    }

    #[test]
    fn a_tag_record_with_a_digest_of_another_algorithm_is_unreadable() {
        let on_disk = r#"{"digest":"sha512:abc","media_type":"x","size":1,"fetched_at":1}"#;
        assert!(serde_json::from_str::<TagRecord>(on_disk).is_err());
    }
}
