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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRecord {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub fetched_at: SystemTime,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    digest: String,
    media_type: String,
    size: u64,
    fetched_at: u64,
}

pub struct Tags {
    dir: PathBuf,
    tmp: PathBuf,
    memory: Cache<TagKey, TagRecord>,
}

impl Tags {
    pub(super) fn new(dir: PathBuf, tmp: PathBuf) -> Tags {
        Tags {
            dir,
            tmp,
            memory: Cache::new(100_000),
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
        let record = serde_json::from_slice::<OnDisk>(&raw).ok().and_then(|d| {
            Some(TagRecord {
                digest: d.digest.parse().ok()?,
                media_type: d.media_type,
                size: d.size,
                fetched_at: crate::clock::from_unix_secs(d.fetched_at),
            })
        });
        match record {
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
        blocking(move || {
            let mut found = Vec::new();
            let mut pending = vec![root.clone()];
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
                            .strip_prefix(&root)
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
        })
        .await
    }

    pub async fn put(&self, key: &TagKey, record: TagRecord) -> io::Result<()> {
        let on_disk = OnDisk {
            digest: record.digest.to_string(),
            media_type: record.media_type.clone(),
            size: record.size,
            fetched_at: crate::clock::unix_secs(record.fetched_at),
        };
        let raw = serde_json::to_vec(&on_disk).map_err(io::Error::other)?;
        let path = self.path(key);
        let tmp = self.tmp.clone();
        self.memory.insert(key.clone(), record);
        blocking(move || write_atomic(&tmp, &path, &raw)).await
    }
}
