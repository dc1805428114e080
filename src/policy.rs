//! Per-upstream repository policy: which repositories an upstream is mirrored for
//! (`allow_repositories` / `deny_repositories`, globs), and how long its tags are trusted
//! ([`TagRules`]: `tag_rules`, `immutable_tags`, `tag_ttl`).
//!
//! The patterns are compiled once, when the configuration is read ([`RepoGlobs`] is the
//! config fields' type), so a bad pattern is a config error and a request only asks a
//! [`Policy`] questions.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::oci::{RepoName, Tag};
use crate::tag_rules::{Freshness, TagRules};

/// Shell-style globs over repository names (`library/*`, `myorg/**`, `team/{api,web}`);
/// `*` matches across `/` too, so `myorg/*` covers `myorg/team/app`.
#[derive(Clone, Default)]
pub struct RepoGlobs {
    sources: Vec<String>,
    set: globset::GlobSet,
}

impl RepoGlobs {
    /// Compiles `globs`; the error names the first one that is not a valid glob.
    pub fn new<S: AsRef<str>>(globs: &[S]) -> Result<RepoGlobs, String> {
        let mut builder = globset::GlobSetBuilder::new();
        let mut sources = Vec::new();
        for g in globs {
            let g = g.as_ref();
            let glob = globset::Glob::new(g).map_err(|e| format!("invalid glob {g:?}: {e}"))?;
            builder.add(glob);
            sources.push(g.to_owned());
        }
        let set = builder.build().map_err(|e| format!("invalid globs: {e}"))?;
        Ok(RepoGlobs { sources, set })
    }

    pub fn matches(&self, repo: &RepoName) -> bool {
        // An empty set matches nothing, without building the candidate path a match needs
        // (a per-request cost for every upstream without such a list).
        !self.set.is_empty() && self.set.is_match(repo.as_str())
    }
}

/// The glob list reads and prints as the list of strings it was written as.
macro_rules! patterns_serde {
    ($ty:ident) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
                let sources = Vec::<String>::deserialize(d)?;
                $ty::new(&sources).map_err(<D::Error as serde::de::Error>::custom)
            }
        }

        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.sources.serialize(s)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list().entries(&self.sources).finish()
            }
        }

        impl PartialEq for $ty {
            fn eq(&self, other: &$ty) -> bool {
                self.sources == other.sources
            }
        }
    };
}

patterns_serde!(RepoGlobs);

/// One upstream's policy, built from its config once at start.
#[derive(Debug, Clone)]
pub struct Policy {
    tags: TagRules,
    allow: Option<RepoGlobs>,
    deny: RepoGlobs,
}

impl Policy {
    /// `allow` of `None` admits every repository the deny list does not refuse.
    pub fn new(tags: TagRules, allow: Option<RepoGlobs>, deny: RepoGlobs) -> Policy {
        Policy { tags, allow, deny }
    }

    /// Whether `repo` (named as the upstream knows it) is mirrored: the deny list wins, and
    /// with an allow list, only what it names is.
    pub fn admits(&self, repo: &RepoName) -> bool {
        !self.deny.matches(repo) && self.allow.as_ref().is_none_or(|a| a.matches(repo))
    }

    /// How long a cached `repo:tag` is answered without asking the upstream.
    pub fn freshness(&self, repo: &RepoName, tag: &Tag) -> Freshness {
        self.tags.freshness(repo, tag)
    }

    /// The tag rules behind [`Policy::freshness`], for `config check --explain`.
    pub fn tag_rules(&self) -> &TagRules {
        &self.tags
    }

    /// How long a cached referrers list is answered without asking the upstream: the
    /// upstream's `tag_ttl`, whatever its tag rules say.
    pub fn referrers_ttl(&self) -> Duration {
        self.tags.default_ttl()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tag_rules::TagPatterns;

    fn repo(s: &str) -> RepoName {
        s.parse().unwrap()
    }

    fn policy(allow: Option<&[&str]>, deny: &[&str]) -> Policy {
        Policy::new(
            TagRules::new(&[], &TagPatterns::default(), Duration::from_secs(1)),
            allow.map(|a| RepoGlobs::new(a).unwrap()),
            RepoGlobs::new(deny).unwrap(),
        )
    }

    #[test]
    fn without_lists_every_repository_is_admitted() {
        assert!(policy(None, &[]).admits(&repo("anything/at/all")));
    }

    #[test]
    fn an_allow_list_refuses_what_it_does_not_name() {
        let p = policy(Some(&["library/*", "myorg/*"]), &[]);
        assert!(p.admits(&repo("library/alpine")));
        assert!(p.admits(&repo("myorg/team/app")), "* crosses /");
        assert!(!p.admits(&repo("evil/miner")));
        assert!(!p.admits(&repo("library")));
        assert!(!policy(Some(&[]), &[]).admits(&repo("library/alpine")));
    }

    #[test]
    fn the_deny_list_wins_over_the_allow_list() {
        let p = policy(Some(&["myorg/*"]), &["myorg/secret-*"]);
        assert!(p.admits(&repo("myorg/app")));
        assert!(!p.admits(&repo("myorg/secret-keys")));
        let p = policy(None, &["evil/**", "{a,b}/x"]);
        assert!(!p.admits(&repo("evil/a/b")));
        assert!(!p.admits(&repo("b/x")));
        assert!(p.admits(&repo("c/x")));
    }

    #[test]
    fn bad_globs_are_named() {
        let e = RepoGlobs::new(&["a/[", "b"]).unwrap_err();
        assert!(e.contains("\"a/[\""), "{e}");
    }
}
