//! Which repositories each cached digest belongs to. Content is stored once, by digest; a link
//! records that the upstream served (or confirmed) that digest for one (registry,
//! repository), so that the mirror never answers a repository with content the upstream would
//! refuse it.
//!
//! All links are held in memory (a lookup is a hash probe, no disk read) and persisted in
//! `links`, one line per link appended as it is made: `<registry> <repository> <digest>`. A
//! crash can cut only the last line, which is skipped on load; a lost link costs one upstream
//! `HEAD` to make again, never a wrong answer. Links of evicted content are kept: the upstream
//! confirmed them, and they are small. A purge unlinks with a line of its own,
//! `<registry> <repository> <digest> unlinked`, read in order on load (a version without
//! purges skips such a line).

use crate::hashing::{Map, Set};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::oci::{Digest, RepoName};

const FILE: &str = "links";

/// registry → repository → digests.
type Table = Map<String, Map<RepoName, Set<Digest>>>;

pub struct Links {
    path: PathBuf,
    table: Mutex<Table>,
}

impl Links {
    /// Loads the links of the storage directory `root` (none when there is no file yet: a
    /// cache from before links existed, whose content is confirmed once per repository), and
    /// ends a cut last line, so the next link starts on a line of its own. Without `load` (an
    /// operator command inspecting the directory) nothing is read or written. Blocking.
    pub fn open(root: &Path, load: bool) -> io::Result<Links> {
        let path = root.join(FILE);
        let mut table = Table::default();
        let text = if load {
            std::fs::read_to_string(&path)
        } else {
            Ok(String::new())
        };
        match text {
            Ok(text) => {
                for line in text.lines() {
                    match parse(line) {
                        Some((registry, repo, digest, false)) => {
                            insert(&mut table, registry, repo, digest)
                        }
                        Some((registry, repo, digest, true)) => {
                            if let Some(digests) =
                                table.get_mut(registry).and_then(|r| r.get_mut(&repo))
                            {
                                digests.remove(&digest);
                            }
                        }
                        None => {}
                    }
                }
                if !text.is_empty() && !text.ends_with('\n') {
                    append(&path, b"\n")?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(Links {
            path,
            table: Mutex::new(table),
        })
    }

    pub fn contains(&self, registry: &str, repo: &RepoName, digest: &Digest) -> bool {
        contains(&crate::sync::lock(&self.table), registry, repo, digest)
    }

    /// Links `digest` to the repository, in memory at once and on disk off the async workers.
    /// A link that cannot be written is kept in memory (and made again after a restart).
    /// Returns whether the link is new.
    pub async fn add(&self, registry: &str, repo: &RepoName, digest: &Digest) -> bool {
        {
            let mut table = crate::sync::lock(&self.table);
            // Most calls find the link made (a tag's manifest is linked on every request):
            // look before allocating the key.
            if contains(&table, registry, repo, digest) {
                return false;
            }
            insert(&mut table, registry, repo.clone(), digest.clone());
        }
        let line = format!("{registry} {repo} {digest}\n");
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || append(&path, line.as_bytes())).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot persist a repository link"),
            Err(e) => tracing::warn!(error = %e, "cannot persist a repository link"),
        }
        true
    }
}

impl Links {
    /// Unlinks `digest` from every repository (a purge), in memory and on disk; the
    /// repositories it was linked to, by registry.
    pub async fn remove_digest(&self, digest: &Digest) -> Vec<(String, RepoName)> {
        let mut removed = Vec::new();
        {
            let mut table = crate::sync::lock(&self.table);
            for (registry, repos) in table.iter_mut() {
                for (repo, digests) in repos.iter_mut() {
                    if digests.remove(digest) {
                        removed.push((registry.clone(), repo.clone()));
                    }
                }
            }
        }
        removed.sort();
        self.persist_unlinked(&removed, digest).await;
        removed
    }

    /// Unlinks `digest` from one repository (a purge); whether it was linked.
    pub async fn remove(&self, registry: &str, repo: &RepoName, digest: &Digest) -> bool {
        let removed = crate::sync::lock(&self.table)
            .get_mut(registry)
            .and_then(|repos| repos.get_mut(repo))
            .is_some_and(|digests| digests.remove(digest));
        if removed {
            self.persist_unlinked(&[(registry.to_owned(), repo.clone())], digest)
                .await;
        }
        removed
    }

    async fn persist_unlinked(&self, repos: &[(String, RepoName)], digest: &Digest) {
        if repos.is_empty() {
            return;
        }
        let lines: String = repos
            .iter()
            .map(|(registry, repo)| format!("{registry} {repo} {digest} {UNLINKED}\n"))
            .collect();
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || append(&path, lines.as_bytes())).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot persist a repository unlink"),
            Err(e) => tracing::warn!(error = %e, "cannot persist a repository unlink"),
        }
    }
}

/// The fourth field of a line that removes a link.
const UNLINKED: &str = "unlinked";

/// One write per line with `O_APPEND`: concurrent appends never interleave within a line.
fn append(path: &Path, line: &[u8]) -> io::Result<()> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(line)
}

fn contains(table: &Table, registry: &str, repo: &RepoName, digest: &Digest) -> bool {
    table
        .get(registry)
        .and_then(|repos| repos.get(repo))
        .is_some_and(|digests| digests.contains(digest))
}

fn insert(table: &mut Table, registry: &str, repo: RepoName, digest: Digest) {
    table
        .entry(registry.to_owned())
        .or_default()
        .entry(repo)
        .or_default()
        .insert(digest);
}

/// A link line, and whether it unlinks.
fn parse(line: &str) -> Option<(&str, RepoName, Digest, bool)> {
    let mut parts = line.split(' ');
    let registry = parts.next().filter(|r| !r.is_empty())?;
    let repo = parts.next()?.parse().ok()?;
    let digest = parts.next()?.parse().ok()?;
    let unlinks = match parts.next() {
        None => false,
        Some(UNLINKED) => true,
        Some(_) => return None,
    };
    parts
        .next()
        .is_none()
        .then_some((registry, repo, digest, unlinks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn links_are_kept_across_opens_and_a_cut_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let repo: RepoName = "library/alpine".parse().unwrap();
        let other: RepoName = "library/beta".parse().unwrap();
        let digest = Digest::sha256_of(b"layer");
        let links = Links::open(dir.path(), true).unwrap();
        assert!(!links.contains("docker.io", &repo, &digest));
        assert!(links.add("docker.io", &repo, &digest).await, "a new link");
        assert!(!Links::open(dir.path(), false)
            .unwrap()
            .contains("docker.io", &repo, &digest));
        assert!(
            !links.add("docker.io", &repo, &digest).await,
            "made already"
        );
        links.add("docker.io", &repo, &digest).await;
        assert!(links.contains("docker.io", &repo, &digest));
        assert!(!links.contains("docker.io", &other, &digest));
        assert!(!links.contains("ghcr.io", &repo, &digest));

        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap();
        file.write_all(b"docker.io library/beta sha256:ab").unwrap();
        let again = Links::open(dir.path(), true).unwrap();
        assert!(again.contains("docker.io", &repo, &digest));
        assert!(!again.contains("docker.io", &other, &digest));
        again.add("docker.io", &other, &digest).await;
        let third = Links::open(dir.path(), true).unwrap();
        assert!(
            third.contains("docker.io", &other, &digest),
            "the cut line was ended"
        );
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert_eq!(text.matches("library/alpine").count(), 1, "{text}");
    }

    #[tokio::test]
    async fn an_unlink_is_kept_across_opens_and_a_later_link_wins() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b): (RepoName, RepoName) = ("library/a".parse().unwrap(), "x/b".parse().unwrap());
        let digest = Digest::sha256_of(b"layer");
        let links = Links::open(dir.path(), true).unwrap();
        links.add("docker.io", &a, &digest).await;
        links.add("ghcr.io", &b, &digest).await;
        assert!(links.remove("docker.io", &a, &digest).await);
        assert!(
            !links.remove("docker.io", &a, &digest).await,
            "gone already"
        );
        let again = Links::open(dir.path(), true).unwrap();
        assert!(!again.contains("docker.io", &a, &digest));
        assert!(again.contains("ghcr.io", &b, &digest));
        again.add("docker.io", &a, &digest).await;
        assert_eq!(
            again.remove_digest(&digest).await,
            vec![
                ("docker.io".to_owned(), a.clone()),
                ("ghcr.io".to_owned(), b.clone())
            ]
        );
        again.add("ghcr.io", &b, &digest).await;
        let third = Links::open(dir.path(), true).unwrap();
        assert!(!third.contains("docker.io", &a, &digest));
        assert!(
            third.contains("ghcr.io", &b, &digest),
            "linked after the unlink"
        );
    }
}
