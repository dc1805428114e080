//! Per-upstream repository policy: which repositories an upstream is mirrored for
//! (`allow_repositories` / `deny_repositories`, globs), which tags never move
//! (`immutable_tags`, regexes), and how long its other tags are trusted (`tag_ttl`).
//!
//! The patterns are compiled once, when the configuration is read ([`TagPatterns`] and
//! [`RepoGlobs`] are the config fields' types), so a bad pattern is a config error and a
//! request only asks a [`Policy`] questions.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::oci::{RepoName, Tag};

/// Regexes over tag names, anchored as written (`^v?[0-9]+\.[0-9]+\.[0-9]+$`; `1.0` alone
/// matches any tag containing `1` + any character + `0`).
#[derive(Clone, Default)]
pub struct TagPatterns {
    sources: Vec<String>,
    regexes: Vec<regex::Regex>,
}

impl TagPatterns {
    /// Compiles `patterns`; the error names the first one that is not a valid regex.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<TagPatterns, String> {
        let mut out = TagPatterns::default();
        for p in patterns {
            let p = p.as_ref();
            let re = regex::Regex::new(p)
                .map_err(|e| format!("invalid regular expression {p:?}: {e}"))?;
            out.sources.push(p.to_owned());
            out.regexes.push(re);
        }
        Ok(out)
    }

    pub fn matches(&self, tag: &str) -> bool {
        self.regexes.iter().any(|re| re.is_match(tag))
    }
}

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

/// Both pattern lists read and print as the list of strings they were written as.
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

patterns_serde!(TagPatterns);
patterns_serde!(RepoGlobs);

/// One upstream's policy, built from its config once at start.
#[derive(Debug, Clone)]
pub struct Policy {
    tag_ttl: Duration,
    immutable_tags: TagPatterns,
    allow: Option<RepoGlobs>,
    deny: RepoGlobs,
}

impl Policy {
    /// `allow` of `None` admits every repository the deny list does not refuse.
    pub fn new(
        tag_ttl: Duration,
        immutable_tags: TagPatterns,
        allow: Option<RepoGlobs>,
        deny: RepoGlobs,
    ) -> Policy {
        Policy {
            tag_ttl,
            immutable_tags,
            allow,
            deny,
        }
    }

    /// Whether `repo` (named as the upstream knows it) is mirrored: the deny list wins, and
    /// with an allow list, only what it names is.
    pub fn admits(&self, repo: &RepoName) -> bool {
        !self.deny.matches(repo) && self.allow.as_ref().is_none_or(|a| a.matches(repo))
    }

    /// A cached tag matching `immutable_tags` is answered from the cache for ever.
    pub fn is_immutable(&self, tag: &Tag) -> bool {
        self.immutable_tags.matches(tag.as_str())
    }

    /// How long a cached tag (and a referrers list) is answered without asking the upstream.
    pub fn tag_ttl(&self) -> Duration {
        self.tag_ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(s: &str) -> RepoName {
        s.parse().unwrap()
    }

    fn policy(allow: Option<&[&str]>, deny: &[&str]) -> Policy {
        Policy::new(
            Duration::from_secs(1),
            TagPatterns::default(),
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
    fn immutable_tags_are_anchored_as_written() {
        let p = Policy::new(
            Duration::from_secs(1),
            TagPatterns::new(&[r"^v?[0-9]+\.[0-9]+\.[0-9]+$"]).unwrap(),
            None,
            RepoGlobs::default(),
        );
        let tag = |s: &str| s.parse::<Tag>().unwrap();
        assert!(p.is_immutable(&tag("1.2.3")));
        assert!(p.is_immutable(&tag("v10.0.1")));
        assert!(!p.is_immutable(&tag("1.2")));
        assert!(!p.is_immutable(&tag("1.2.3-rc1")));
        assert!(!p.is_immutable(&tag("latest")));
        let loose = TagPatterns::new(&["1\\.0"]).unwrap();
        assert!(loose.matches("x1.0y"), "no implicit anchors");
    }

    #[test]
    fn bad_patterns_are_named() {
        let e = TagPatterns::new(&["^ok$", "v(["]).unwrap_err();
        assert!(e.contains("\"v([\""), "{e}");
        let e = RepoGlobs::new(&["a/[", "b"]).unwrap_err();
        assert!(e.contains("\"a/[\""), "{e}");
    }
}
