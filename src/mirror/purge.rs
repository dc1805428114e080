//! Purges and refreshes on an operator's request (`pullthrough cache purge|refresh`, over the
//! admin API or on a storage directory at rest): what the mirror forgets, here and in the fleet.
//!
//! - A tag's record is forgotten (here, and the fleet's shared record): the next pull fetches
//!   the tag again. The manifest it pointed to stays (content is named by its digest).
//! - A repository: every tag record this replica holds for it.
//! - `repo@digest`: the manifest (or blob) with that digest is removed (from this disk and the
//!   shared tier) and unlinked from the repository; other repositories that had it fetch it
//!   again from their upstream when next asked.
//! - A digest: the blob or manifest, and its links to every repository.
//!
//! The other replicas hear of it through a log in the coordinator (a sorted set, `purges`,
//! scored by time), which each replica reads every [`APPLY_EVERY`] ([`Mirror::apply_fleet_purges`])
//! and applies to what it holds itself: its tag records, files and links, and the fleet's
//! records of its tags. What was fetched again after the purge (a tag record learned since, a
//! file written since) is kept, so reading the log again, as a restarted replica does, undoes
//! nothing. The log keeps a day of purges.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::manifests::{Resolved, TagKey};
use super::{Error, Mirror, Target};
use crate::clock::{from_unix_millis, unix_millis};
use crate::image::ImageRef;
use crate::oci::{Digest, Reference, RepoName, Tag};
use crate::outcome::CacheStatus;
use crate::store::index::Key;
use crate::store::tier::Kind;
use crate::sync::lock;

/// How often a replica reads the fleet's purge log.
pub const APPLY_EVERY: Duration = Duration::from_secs(2);
/// How long the fleet's purge log keeps a purge.
const RETENTION: Duration = Duration::from_secs(24 * 3600);
/// The coordinator's sorted set of purges.
const LOG: &str = "purges";
/// Purges the status page lists, the latest first.
const RECENT: usize = 20;

/// What a purge or a refresh names, as an operator writes it (see [`Subject::from_str`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// `alpine:3.20`, `ghcr.io/org/app:1.0`: one tag.
    Tag {
        registry: String,
        repo: RepoName,
        tag: Tag,
    },
    /// `alpine@sha256:…`: the content with that digest, and its link to the repository.
    Content {
        registry: String,
        repo: RepoName,
        digest: Digest,
    },
    /// `alpine`, `ghcr.io/org/app`: every tag of the repository.
    Repository { registry: String, repo: RepoName },
    /// `sha256:…`: the blob or manifest, and its links to every repository.
    Digest(Digest),
}

impl FromStr for Subject {
    type Err = String;

    /// A digest alone, or an image reference as `docker pull` takes it, except that a name
    /// without a tag is the repository (every tag of it), not `:latest`.
    fn from_str(s: &str) -> Result<Subject, String> {
        if let Ok(digest) = s.parse::<Digest>() {
            return Ok(Subject::Digest(digest));
        }
        if s.starts_with("sha256:") || s.starts_with("sha512:") {
            return Err(format!(
                "invalid digest {s:?}: expected sha256:<64 lowercase hex digits>"
            ));
        }
        let image: ImageRef = s
            .parse()
            .map_err(|e: crate::image::ParseError| e.to_string())?;
        let (registry, repo) = (image.registry().to_owned(), image.repo().clone());
        // As `ImageRef` reads it: a tag follows the last `:` after the last `/`.
        let name = s.split('@').next().unwrap_or(s);
        let tagged = name
            .rsplit('/')
            .next()
            .is_some_and(|last| last.contains(':'));
        Ok(match image.reference() {
            Reference::Digest(digest) => Subject::Content {
                registry,
                repo,
                digest: digest.clone(),
            },
            Reference::Tag(tag) if tagged => Subject::Tag {
                registry,
                repo,
                tag: tag.clone(),
            },
            Reference::Tag(_) => Subject::Repository { registry, repo },
        })
    }
}

impl Subject {
    /// The tag, or the repository (`None`: every tag of it), that a refresh revalidates;
    /// `None` for content named by its digest, which never changes.
    pub fn tags(&self) -> Option<(&str, &RepoName, Option<&Tag>)> {
        match self {
            Subject::Tag {
                registry,
                repo,
                tag,
            } => Some((registry, repo, Some(tag))),
            Subject::Repository { registry, repo } => Some((registry, repo, None)),
            Subject::Content { .. } | Subject::Digest(_) => None,
        }
    }
}

/// The full form, which parses back to the same subject: `docker.io/library/alpine:3.20`.
impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Tag {
                registry,
                repo,
                tag,
            } => write!(f, "{registry}/{repo}:{tag}"),
            Subject::Content {
                registry,
                repo,
                digest,
            } => write!(f, "{registry}/{repo}@{digest}"),
            Subject::Repository { registry, repo } => write!(f, "{registry}/{repo}"),
            Subject::Digest(digest) => write!(f, "{digest}"),
        }
    }
}

/// What a purge removed from this replica and the shared tier.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Purged {
    /// What was purged, in full form (`docker.io/library/alpine:3.20`).
    pub subject: String,
    /// Whether anything was found to purge here or in the shared tier.
    pub found: bool,
    /// Tags whose record was forgotten.
    pub tags: Vec<String>,
    /// Manifests removed from this replica's disk or memory.
    pub manifests: Vec<Digest>,
    /// Blobs removed from this replica's disk.
    pub blobs: Vec<Digest>,
    /// Repositories the content was unlinked from (`docker.io/library/alpine`).
    pub unlinked: Vec<String>,
    /// Objects deleted from the shared tier (`blobs/sha256/…`).
    pub shared: Vec<String>,
    /// With `[cluster]`: whether the other replicas were told (they apply it within
    /// [`APPLY_EVERY`]); `false` while the coordinator cannot be reached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<bool>,
}

/// What a refresh of one tag found.
#[derive(Debug, Clone, Serialize)]
pub struct Refreshed {
    /// The tag, in full form.
    pub reference: String,
    /// The digest the tag pointed to before, if the mirror had it.
    pub before: Option<Digest>,
    /// The digest it points to now.
    pub after: Option<Digest>,
    pub changed: bool,
    /// `REVALIDATED` (the upstream's HEAD named the same digest, or a new one, fetched),
    /// `MISS` (a tag the mirror did not hold, fetched), `STALE` (the upstream did not answer;
    /// nothing changed), `PASSTHROUGH` (a manifest of a type the mirror does not store).
    pub status: &'static str,
    /// Why the tag could not be refreshed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Purge,
    Refresh,
}

/// A purge or refresh as the fleet's log and the status page keep it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Notice {
    /// Unique in the log: the replica, its clock and a counter.
    id: String,
    pub action: Action,
    pub subject: String,
    /// Who asked: the client address and credential, or the local user.
    pub by: String,
    /// The replica that did it (`local` without `[cluster]`).
    pub replica: String,
    pub at_ms: u64,
}

/// The fleet log's reading position, and the purges the status page lists.
#[derive(Default)]
pub(super) struct Purges {
    recent: Mutex<VecDeque<Notice>>,
    /// The highest score read from the fleet's log, and the ids read at that score.
    read: Mutex<(u64, HashSet<String>)>,
    issued: std::sync::atomic::AtomicU64,
}

impl Purges {
    fn remember(&self, notice: Notice) {
        let mut recent = lock(&self.recent);
        recent.push_front(notice);
        recent.truncate(RECENT);
    }

    /// The latest purges and refreshes, here and (with `[cluster]`) in the fleet.
    pub(super) fn recent(&self) -> Vec<Notice> {
        lock(&self.recent).iter().cloned().collect()
    }
}

impl Mirror {
    /// The target `registry`/`repo` names, whether or not the upstream's policy admits it (a
    /// purge of a repository the policy refuses now must still be possible).
    fn purge_target(&self, registry: &str, repo: &RepoName) -> Result<Target, Error> {
        self.resolve(Some(registry), repo)
    }

    fn tag_key(target: &Target, tag: &Tag) -> TagKey {
        TagKey {
            registry: target.upstream.name.clone(),
            repo: target.repo.clone(),
            tag: tag.clone(),
        }
    }

    /// Purges `subject` here, in the shared tier and in the fleet's records, and tells the
    /// other replicas; logged with `by`, who asked.
    pub async fn purge(self: &Arc<Self>, subject: &Subject, by: &str) -> Result<Purged, Error> {
        let (subject, mut purged) = self.purge_here(subject, None).await?;
        purged.subject = subject.to_string();
        if let Subject::Content { digest, .. } | Subject::Digest(digest) = &subject {
            for kind in [Kind::Manifest, Kind::Blob] {
                if self.tiers.purge_shared(kind, digest).await {
                    purged
                        .shared
                        .push(crate::store::tier::object_name(kind, digest));
                }
            }
        }
        purged.found = !(purged.tags.is_empty()
            && purged.manifests.is_empty()
            && purged.blobs.is_empty()
            && purged.unlinked.is_empty()
            && purged.shared.is_empty());
        purged.fleet = self.tell_fleet(Action::Purge, &subject, by).await;
        tracing::info!(
            subject = %subject, by, found = purged.found, tags = purged.tags.len(),
            manifests = purged.manifests.len(), blobs = purged.blobs.len(),
            unlinked = purged.unlinked.len(), shared = purged.shared.len(),
            fleet = match purged.fleet {
                None => "no cluster",
                Some(true) => "told",
                Some(false) => "not told: the coordinator is down",
            },
            "purged"
        );
        Ok(purged)
    }

    /// What a purge does to this replica's own state and the fleet's records of it. With
    /// `before` (a purge read from the fleet's log), what was fetched again since is kept.
    /// Returns the subject in full form, as the upstream names it.
    async fn purge_here(
        &self,
        subject: &Subject,
        before: Option<SystemTime>,
    ) -> Result<(Subject, Purged), Error> {
        let mut purged = Purged::default();
        let subject = match subject {
            Subject::Tag {
                registry,
                repo,
                tag,
            } => {
                let target = self.purge_target(registry, repo)?;
                let key = Self::tag_key(&target, tag);
                if self.forget_tag(&key, before, true).await? {
                    purged.tags.push(tag.to_string());
                }
                Subject::Tag {
                    registry: key.registry,
                    repo: key.repo,
                    tag: key.tag,
                }
            }
            Subject::Repository { registry, repo } => {
                let target = self.purge_target(registry, repo)?;
                for tag in self.held_tags(&target).await? {
                    if self
                        .forget_tag(&Self::tag_key(&target, &tag), before, true)
                        .await?
                    {
                        purged.tags.push(tag.to_string());
                    }
                }
                Subject::Repository {
                    registry: target.registry().to_owned(),
                    repo: target.repo,
                }
            }
            Subject::Content {
                registry,
                repo,
                digest,
            } => {
                let target = self.purge_target(registry, repo)?;
                self.remove_content(digest, before, &mut purged).await?;
                let (registry, repo) = (target.registry().to_owned(), target.repo);
                if self
                    .tiers
                    .local
                    .links
                    .remove(&registry, &repo, digest)
                    .await
                {
                    purged.unlinked.push(format!("{registry}/{repo}"));
                }
                self.unshare_link(&registry, &repo, digest).await;
                Subject::Content {
                    registry,
                    repo,
                    digest: digest.clone(),
                }
            }
            Subject::Digest(digest) => {
                self.remove_content(digest, before, &mut purged).await?;
                for (registry, repo) in self.tiers.local.links.remove_digest(digest).await {
                    self.unshare_link(&registry, &repo, digest).await;
                    purged.unlinked.push(format!("{registry}/{repo}"));
                }
                Subject::Digest(digest.clone())
            }
        };
        Ok((subject, purged))
    }

    /// The tags of `target`'s repository that this replica holds a record of.
    async fn held_tags(&self, target: &Target) -> Result<Vec<Tag>, Error> {
        self.tiers
            .local
            .tags
            .list(target.registry(), &target.repo)
            .await
            .map_err(Error::storage("listing tag records"))
    }

    /// Forgets the tag's record here (and what the mirror remembers of the tag in memory),
    /// and, with `fleet`, the fleet's shared record; with `before`, only a record learned
    /// before then. Whether this replica had a record.
    async fn forget_tag(
        &self,
        key: &TagKey,
        before: Option<SystemTime>,
        fleet: bool,
    ) -> Result<bool, Error> {
        let older = |r: &crate::store::tags::TagRecord| before.is_none_or(|at| r.fetched_at <= at);
        let tags = &self.tiers.local.tags;
        let held = tags
            .get(key)
            .await
            .map_err(Error::storage("reading a tag record"))?;
        let forgotten = match &held {
            Some(record) if older(record) => tags
                .remove(key)
                .await
                .map_err(Error::storage("removing a tag record"))?,
            _ => false,
        };
        self.missing_tags.invalidate(key);
        self.unbacked_tags.invalidate(key);
        self.unverified_tags.invalidate(key);
        if fleet {
            self.unshare_tag(key, before).await;
        }
        Ok(forgotten)
    }

    /// Removes the blob or manifest `digest` from this replica (disk, memory, index).
    async fn remove_content(
        &self,
        digest: &Digest,
        before: Option<SystemTime>,
        purged: &mut Purged,
    ) -> Result<(), Error> {
        let store = self.tiers.local.clone();
        let d = digest.clone();
        let removed = tokio::task::spawn_blocking(move || {
            let manifest = store.purge(&Key::manifest(&d), before)?;
            let blob = store.purge(&Key::blob(&d), before)?;
            Ok::<_, std::io::Error>((manifest, blob))
        })
        .await
        .map_err(|e| Error::storage("removing purged content")(std::io::Error::other(e)))?
        .map_err(Error::storage("removing purged content"))?;
        if removed.0 {
            purged.manifests.push(digest.clone());
        }
        if removed.1 {
            purged.blobs.push(digest.clone());
        }
        Ok(())
    }

    /// Revalidates `subject` now (a tag, or every tag of a repository this replica holds): a
    /// HEAD to the upstream, and the manifest fetched if the tag moved; the other replicas
    /// drop their own records of it, to read the new one from the fleet. Logged with `by`.
    /// `tag` `None` is every tag of the repository.
    pub async fn refresh(
        self: &Arc<Self>,
        registry: &str,
        repo: &RepoName,
        tag: Option<&Tag>,
        by: &str,
    ) -> Result<Vec<Refreshed>, Error> {
        let target = self.purge_target(registry, repo)?;
        let tags = match tag {
            Some(tag) => vec![tag.clone()],
            None => self.held_tags(&target).await?,
        };
        let mut results = Vec::new();
        for tag in &tags {
            let key = Self::tag_key(&target, tag);
            let reference = format!("{}/{}:{}", key.registry, key.repo, key.tag);
            let result = self.refresh_tag(&target, &key).await;
            tracing::info!(
                reference, by, before = ?result.as_ref().ok().and_then(|r| r.before.as_ref()),
                after = ?result.as_ref().ok().and_then(|r| r.after.as_ref()),
                status = result.as_ref().map_or("ERROR", |r| r.status),
                error = result.as_ref().err().map(tracing::field::display),
                "refreshed"
            );
            let refreshed = match result {
                Ok(r) => r,
                // One tag of a single-tag refresh fails the request (a 404 is a 404).
                Err(e) if tags.len() == 1 => return Err(e),
                Err(e) => Refreshed {
                    reference,
                    before: None,
                    after: None,
                    changed: false,
                    status: "ERROR",
                    error: Some(e.to_string()),
                },
            };
            results.push(refreshed);
        }
        let (registry, repo) = (target.registry().to_owned(), target.repo.clone());
        let subject = match tag {
            Some(tag) => Subject::Tag {
                registry,
                repo,
                tag: tag.clone(),
            },
            None => Subject::Repository { registry, repo },
        };
        self.tell_fleet(Action::Refresh, &subject, by).await;
        Ok(results)
    }

    /// One tag revalidated now, whatever its TTL: a HEAD (and a GET of a new digest), or a
    /// GET of a tag the mirror does not hold. A 404 remembered or a digest the upstream did
    /// not back lately is asked again.
    async fn refresh_tag(&self, target: &Target, key: &TagKey) -> Result<Refreshed, Error> {
        self.missing_tags.invalidate(key);
        self.unbacked_tags.invalidate(key);
        self.unverified_tags.invalidate(key);
        let before = self
            .tiers
            .local
            .tags
            .get(key)
            .await
            .map_err(Error::storage("reading a tag record"))?;
        let up = &target.upstream;
        let resolved = match before.clone() {
            Some(record) => {
                self.revalidate_tag(up, &target.caller, key, Some(record), true)
                    .await?
            }
            None => self.fetch_tag(up, &target.caller, key).await?,
        };
        let before = before.map(|r| r.digest);
        let (after, status) = match resolved {
            Resolved::Record(r, status) | Resolved::Unverified(r, status) => (r.digest, status),
            Resolved::Uncacheable(m) => (m.digest.clone(), CacheStatus::Passthrough),
        };
        Ok(Refreshed {
            reference: format!("{}/{}:{}", key.registry, key.repo, key.tag),
            changed: before.as_ref() != Some(&after),
            before,
            after: Some(after),
            status: status.as_str(),
            error: None,
        })
    }

    /// Adds the purge or refresh to the status page's list and, with `[cluster]`, to the
    /// fleet's log; whether the fleet was told (`None` without a cluster).
    async fn tell_fleet(&self, action: Action, subject: &Subject, by: &str) -> Option<bool> {
        let now = self.clock.now();
        let replica = self
            .cluster
            .as_ref()
            .map_or("local".to_owned(), |c| c.advertise().to_owned());
        let n = self
            .purges
            .issued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let notice = Notice {
            id: format!("{replica} {} {n}", unix_millis(now)),
            action,
            subject: subject.to_string(),
            by: by.to_owned(),
            replica,
            at_ms: unix_millis(now),
        };
        self.purges.remember(notice.clone());
        let cluster = self.cluster.as_ref()?;
        let member = serde_json::to_string(&notice).ok()?;
        Some(
            cluster
                .zadd(LOG, vec![(member, notice.at_ms as f64)])
                .await
                .is_some(),
        )
    }

    /// Reads the purges and refreshes the other replicas logged since the last reading, and
    /// applies each to what this replica holds; drops those older than a day from the log.
    pub(super) async fn apply_fleet_purges(&self) {
        let Some(cluster) = &self.cluster else { return };
        let from = lock(&self.purges.read).0;
        let Some(page) = cluster.zrange(LOG, from as f64, f64::INFINITY, 1000).await else {
            return;
        };
        for (member, score) in page {
            let at = score as u64;
            {
                let mut read = lock(&self.purges.read);
                if at < read.0 || (at == read.0 && read.1.contains(&member)) {
                    continue;
                }
                if at > read.0 {
                    *read = (at, HashSet::new());
                }
                read.1.insert(member.clone());
            }
            let Ok(notice) = serde_json::from_str::<Notice>(&member) else {
                continue;
            };
            if notice.replica == cluster.advertise() {
                continue;
            }
            self.apply(&notice).await;
        }
        let old = unix_millis(self.clock.now()).saturating_sub(RETENTION.as_millis() as u64);
        if let Some(expired) = cluster
            .zrange(LOG, f64::NEG_INFINITY, old as f64, 1000)
            .await
        {
            if !expired.is_empty() {
                cluster
                    .zrem(LOG, expired.into_iter().map(|(m, _)| m).collect())
                    .await;
            }
        }
    }

    /// Applies another replica's purge or refresh to what this one holds.
    async fn apply(&self, notice: &Notice) {
        let Ok(subject) = notice.subject.parse::<Subject>() else {
            return;
        };
        let at = from_unix_millis(notice.at_ms);
        let result = match notice.action {
            Action::Purge => self.purge_here(&subject, Some(at)).await.map(drop),
            // The refreshing replica shared the new record: this one drops its own to read it.
            Action::Refresh => self.forget_refreshed(&subject, at).await,
        };
        match result {
            Ok(()) => {
                tracing::info!(
                    subject = %notice.subject, by = %notice.by, replica = %notice.replica,
                    action = ?notice.action, "applied another replica's purge"
                );
                self.purges.remember(notice.clone());
            }
            Err(e) => tracing::warn!(
                subject = %notice.subject, replica = %notice.replica, error = %e,
                "cannot apply another replica's purge"
            ),
        }
    }

    async fn forget_refreshed(&self, subject: &Subject, at: SystemTime) -> Result<(), Error> {
        let (target, tags) = match subject {
            Subject::Tag {
                registry,
                repo,
                tag,
            } => (self.purge_target(registry, repo)?, vec![tag.clone()]),
            Subject::Repository { registry, repo } => {
                let target = self.purge_target(registry, repo)?;
                let tags = self.held_tags(&target).await?;
                (target, tags)
            }
            _ => return Ok(()),
        };
        for tag in tags {
            self.forget_tag(&Self::tag_key(&target, &tag), Some(at), false)
                .await?;
        }
        Ok(())
    }

    /// The purges and refreshes the status page lists, the latest first.
    pub(super) fn recent_purges(&self) -> Vec<Notice> {
        self.purges.recent()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_read_as_docker_names_them_and_a_bare_name_is_the_repository() {
        let cases = [
            ("alpine:3.20", "docker.io/library/alpine:3.20"),
            ("alpine", "docker.io/library/alpine"),
            ("ghcr.io/org/app", "ghcr.io/org/app"),
            ("localhost:5000/app:1", "localhost:5000/app:1"),
            ("localhost:5000/app", "localhost:5000/app"),
        ];
        for (input, full) in cases {
            let subject: Subject = input.parse().unwrap();
            assert_eq!(subject.to_string(), full, "{input}");
            assert_eq!(full.parse::<Subject>().unwrap(), subject, "{full}");
        }
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            d.parse::<Subject>().unwrap(),
            Subject::Digest(d.parse().unwrap())
        );
        assert!(matches!(
            format!("alpine@{d}").parse::<Subject>().unwrap(),
            Subject::Content { .. }
        ));
        assert!(matches!(
            "alpine:3.20".parse::<Subject>().unwrap(),
            Subject::Tag { .. }
        ));
        for bad in ["Alpine", "sha256:xyz", "alpine@sha256:1", "a:b:c"] {
            assert!(bad.parse::<Subject>().is_err(), "{bad}");
        }
    }
}
