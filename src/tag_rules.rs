//! Tag freshness: how long a cached tag of an upstream is answered without asking it. An
//! upstream's `tag_rules` are tried in order against the repository (as the upstream names it)
//! and the tag; the first that matches decides: a TTL, `immutable` (never revalidated once
//! cached) or `always` (a `HEAD` on every request). Then its deprecated `immutable_tags`, as
//! `immutable` rules over the tag alone; a tag nothing matches gets the upstream's `tag_ttl`.
//!
//! The patterns are compiled when the configuration is read, so a bad rule is a config error
//! and a request only runs matchers: none at all for an upstream without rules.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::oci::{RepoName, Tag};

/// What a cached tag gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Answered from the cache for this long after it was fetched or revalidated.
    Ttl(Duration),
    /// Answered from the cache for ever once cached.
    Immutable,
    /// Revalidated with a `HEAD` on every request (a `GET` only when the digest moved).
    Always,
}

impl Freshness {
    /// Whether a tag record this old is answered without asking the upstream.
    pub fn is_fresh(self, age: Duration) -> bool {
        match self {
            Freshness::Ttl(ttl) => age < ttl,
            Freshness::Immutable => true,
            Freshness::Always => false,
        }
    }
}

/// As `config check --explain` prints it.
impl fmt::Display for Freshness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Freshness::Ttl(d) => write!(
                f,
                "ttl {} (then revalidated with a HEAD)",
                humantime::format_duration(*d)
            ),
            Freshness::Immutable => f.write_str("immutable (never revalidated once cached)"),
            Freshness::Always => f.write_str("always (a HEAD on every request)"),
        }
    }
}

/// Regexes over tag names, anchored as written (`^v?[0-9]+\.[0-9]+\.[0-9]+$`; `1.0` alone
/// matches any tag containing `1` + any character + `0`): `immutable_tags`, the deprecated
/// form of `immutable` tag rules.
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

    pub fn is_empty(&self) -> bool {
        self.regexes.is_empty()
    }
}

impl<'de> Deserialize<'de> for TagPatterns {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TagPatterns, D::Error> {
        let sources = Vec::<String>::deserialize(d)?;
        TagPatterns::new(&sources).map_err(<D::Error as serde::de::Error>::custom)
    }
}

impl Serialize for TagPatterns {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.sources.serialize(s)
    }
}

impl fmt::Debug for TagPatterns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.sources).finish()
    }
}

impl PartialEq for TagPatterns {
    fn eq(&self, other: &TagPatterns) -> bool {
        self.sources == other.sources
    }
}

/// One side of a `REPOSITORY-GLOB:TAG-GLOB` match.
#[derive(Clone)]
enum Part {
    /// `*` or `**`: no matcher to run.
    Any,
    /// No glob characters: a string comparison.
    Literal(String),
    Pattern(globset::GlobMatcher),
}

impl Part {
    fn new(glob: &str) -> Result<Part, String> {
        if matches!(glob, "*" | "**") {
            return Ok(Part::Any);
        }
        if !glob.contains(['*', '?', '[', '{', '\\']) {
            return Ok(Part::Literal(glob.to_owned()));
        }
        globset::Glob::new(glob)
            .map(|g| Part::Pattern(g.compile_matcher()))
            .map_err(|e| format!("invalid glob {glob:?}: {e}"))
    }

    fn matches(&self, s: &str) -> bool {
        match self {
            Part::Any => true,
            Part::Literal(l) => l == s,
            Part::Pattern(g) => g.is_match(s),
        }
    }
}

#[derive(Clone)]
enum Matcher {
    /// Repository and tag globs; `*` also matches `/`, as in `allow_repositories`.
    Globs { repo: Part, tag: Part },
    /// `re:<regex>`, over `repository:tag`, anchored as written.
    Regex(regex::Regex),
    /// An `immutable_tags` regex, over the tag alone.
    TagRegex(regex::Regex),
}

impl Matcher {
    fn parse(source: &str) -> Result<Matcher, String> {
        if let Some(re) = source.strip_prefix("re:") {
            return regex::Regex::new(re)
                .map(Matcher::Regex)
                .map_err(|e| format!("invalid regular expression {re:?}: {e}"));
        }
        match source.split_once(':') {
            Some((repo, tag)) if !repo.is_empty() && !tag.is_empty() && !tag.contains(':') => {
                Ok(Matcher::Globs {
                    repo: Part::new(repo)?,
                    tag: Part::new(tag)?,
                })
            }
            _ => Err(
                "expected REPOSITORY-GLOB:TAG-GLOB (e.g. \"*:latest\", \"library/*:3.*\") or \
                 \"re:<regex>\" over repository:tag"
                    .to_owned(),
            ),
        }
    }

    fn matches(&self, repo: &RepoName, tag: &Tag) -> bool {
        match self {
            Matcher::Globs { repo: r, tag: t } => {
                t.matches(tag.as_str()) && r.matches(repo.as_str())
            }
            Matcher::Regex(re) => re.is_match(&format!("{repo}:{tag}")),
            Matcher::TagRegex(re) => re.is_match(tag.as_str()),
        }
    }
}

/// Where a rule came from, for `config check --explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The n-th (from 1) of the upstream's `tag_rules`.
    TagRules(usize),
    /// The n-th (from 1) of the upstream's `immutable_tags`.
    ImmutableTags(usize),
}

/// One `[[upstreams."…".tag_rules]]` entry, compiled: its `match` and what a tag it matches
/// gets.
#[derive(Clone)]
pub struct TagRule {
    source: String,
    matcher: Matcher,
    freshness: Freshness,
    origin: Origin,
}

impl TagRule {
    /// The `match` string as written (an `immutable_tags` regex for those).
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn freshness(&self) -> Freshness {
        self.freshness
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }
}

/// `tag_rules #2 match = "*:latest"`.
impl fmt::Display for TagRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = Quoted(&self.source);
        match self.origin {
            Origin::TagRules(n) => write!(f, "tag_rules #{n} match = {source}"),
            Origin::ImmutableTags(n) => write!(f, "immutable_tags #{n} {source} (deprecated)"),
        }
    }
}

/// A pattern as TOML would have it: a literal string ('…') when it has backslashes, so that a
/// regex reads as written rather than with each backslash doubled.
struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s.contains(['\\', '"']) && !s.contains(['\'', '\n']) {
            write!(f, "'{s}'")
        } else {
            write!(f, "{s:?}")
        }
    }
}

impl fmt::Debug for TagRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self} => {:?}", self.freshness)
    }
}

impl PartialEq for TagRule {
    fn eq(&self, other: &TagRule) -> bool {
        (&self.source, self.freshness) == (&other.source, other.freshness)
    }
}

/// A rule as written in the file.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Written {
    #[serde(rename = "match")]
    source: String,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    ttl: Option<Duration>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    immutable: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    always: bool,
}

impl Written {
    /// The `n`-th (from 1) rule of a `tag_rules` list, compiled.
    fn compile(self, n: usize) -> Result<TagRule, String> {
        let what = |reason: &str| {
            format!(
                "tag_rules #{n} (match = {}): {reason}",
                Quoted(&self.source)
            )
        };
        let matcher = Matcher::parse(&self.source).map_err(|e| what(&e))?;
        let freshness = match (self.ttl, self.immutable, self.always) {
            (Some(ttl), false, false) => Freshness::Ttl(ttl),
            (None, true, false) => Freshness::Immutable,
            (None, false, true) => Freshness::Always,
            (None, false, false) => {
                return Err(what(
                    "no action: set one of ttl = \"…\", immutable = true or always = true",
                ))
            }
            (ttl, immutable, always) => {
                let set: Vec<&str> = [
                    ttl.map(|_| "ttl"),
                    immutable.then_some("immutable"),
                    always.then_some("always"),
                ]
                .into_iter()
                .flatten()
                .collect();
                return Err(what(&format!(
                    "{} are set: a rule has exactly one of ttl, immutable and always",
                    set.join(" and ")
                )));
            }
        };
        Ok(TagRule {
            source: self.source,
            matcher,
            freshness,
            origin: Origin::TagRules(n),
        })
    }
}

/// Reads a `tag_rules` list; an error names the rule by its place in the list (the file
/// position a parser reports is the list's).
pub fn deserialize_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<TagRule>, D::Error> {
    let tables = Vec::<toml::Table>::deserialize(d)?;
    tables
        .into_iter()
        .enumerate()
        .map(|(i, table)| {
            let n = i + 1;
            Written::deserialize(table)
                .map_err(|e| format!("tag_rules #{n}: {}", e.message()))
                .and_then(|w| w.compile(n))
        })
        .collect::<Result<_, _>>()
        .map_err(<D::Error as serde::de::Error>::custom)
}

impl Serialize for TagRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Written {
            source: self.source.clone(),
            ttl: match self.freshness {
                Freshness::Ttl(d) => Some(d),
                _ => None,
            },
            immutable: self.freshness == Freshness::Immutable,
            always: self.freshness == Freshness::Always,
        }
        .serialize(s)
    }
}

/// An upstream's tag freshness, built once at start: its `tag_rules`, then its
/// `immutable_tags` as `immutable` rules, then its default TTL.
#[derive(Debug, Clone)]
pub struct TagRules {
    rules: Vec<TagRule>,
    default_ttl: Duration,
}

impl TagRules {
    pub fn new(rules: &[TagRule], immutable_tags: &TagPatterns, default_ttl: Duration) -> TagRules {
        let legacy = immutable_tags
            .sources
            .iter()
            .zip(&immutable_tags.regexes)
            .enumerate()
            .map(|(i, (source, re))| TagRule {
                source: source.clone(),
                matcher: Matcher::TagRegex(re.clone()),
                freshness: Freshness::Immutable,
                origin: Origin::ImmutableTags(i + 1),
            });
        TagRules {
            rules: rules.iter().cloned().chain(legacy).collect(),
            default_ttl,
        }
    }

    /// What a cached `repo:tag` gets: the first matching rule's freshness, else the TTL.
    pub fn freshness(&self, repo: &RepoName, tag: &Tag) -> Freshness {
        self.explain(repo, tag).1
    }

    /// The rule that decides for `repo:tag` (`None`: the default TTL), and what it decides.
    pub fn explain(&self, repo: &RepoName, tag: &Tag) -> (Option<&TagRule>, Freshness) {
        match self.rules.iter().find(|r| r.matcher.matches(repo, tag)) {
            Some(rule) => (Some(rule), rule.freshness),
            None => (None, Freshness::Ttl(self.default_ttl)),
        }
    }

    /// What tags of `repo` get, for the status page: each rule that can match one of them,
    /// in order (`tag_rules #1 match = "*:latest": ttl 1m`), then the default.
    pub fn for_repository(&self, repo: &RepoName) -> Vec<String> {
        self.rules
            .iter()
            .filter(|r| match &r.matcher {
                Matcher::Globs { repo: part, .. } => part.matches(repo.as_str()),
                // A regex over `repository:tag` or the tag alone: any repository may match.
                Matcher::Regex(_) | Matcher::TagRegex(_) => true,
            })
            .map(|r| format!("{r}: {}", r.freshness))
            .chain(std::iter::once(format!(
                "otherwise: {}",
                Freshness::Ttl(self.default_ttl)
            )))
            .collect()
    }

    /// The TTL of a tag no rule matches (and of a referrers list).
    pub fn default_ttl(&self) -> Duration {
        self.default_ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(list: &[(&str, &str)], legacy: &[&str]) -> TagRules {
        let list: Vec<TagRule> = list
            .iter()
            .enumerate()
            .map(|(i, (source, freshness))| {
                let text = format!("match = {source:?}\n{freshness}\n");
                toml::from_str::<Written>(&text)
                    .unwrap()
                    .compile(i + 1)
                    .unwrap()
            })
            .collect();
        TagRules::new(
            &list,
            &TagPatterns::new(legacy).unwrap(),
            Duration::from_secs(300),
        )
    }

    fn fresh(r: &TagRules, reference: &str) -> Freshness {
        let (repo, tag) = reference.rsplit_once(':').unwrap();
        r.freshness(&repo.parse().unwrap(), &tag.parse().unwrap())
    }

    #[test]
    fn the_first_matching_rule_wins_and_the_default_ttl_is_last() {
        let r = rules(
            &[
                ("library/*:{latest,main}", "always = true"),
                ("*:latest", "ttl = \"1m\""),
                ("*:v[0-9]*", "immutable = true"),
                ("re:^myorg/.*:nightly-[0-9]+$", "ttl = \"10s\""),
                ("*:*", "ttl = \"1h\""),
            ],
            &[],
        );
        let min = Duration::from_secs(60);
        assert_eq!(fresh(&r, "library/alpine:latest"), Freshness::Always);
        assert_eq!(fresh(&r, "library/alpine:main"), Freshness::Always);
        assert_eq!(fresh(&r, "org/team/app:latest"), Freshness::Ttl(min));
        assert_eq!(fresh(&r, "org/app:v1.2.3"), Freshness::Immutable);
        assert_eq!(
            fresh(&r, "myorg/a/b:nightly-20"),
            Freshness::Ttl(Duration::from_secs(10))
        );
        assert_eq!(
            fresh(&r, "other/x:nightly-20"),
            Freshness::Ttl(Duration::from_secs(3600))
        );
        let none = rules(&[("library/*:latest", "ttl = \"1m\"")], &[]);
        assert_eq!(
            fresh(&none, "org/app:latest"),
            Freshness::Ttl(Duration::from_secs(300)),
            "no match: the default"
        );
    }

    #[test]
    fn immutable_tags_come_after_the_rules_and_match_the_tag_alone() {
        let r = rules(
            &[("risky/*:*", "always = true")],
            &[r"^v?[0-9]+\.[0-9]+\.[0-9]+$"],
        );
        assert_eq!(fresh(&r, "org/app:1.2.3"), Freshness::Immutable);
        assert_eq!(fresh(&r, "risky/app:1.2.3"), Freshness::Always);
        assert_eq!(
            fresh(&r, "org/app:1.2"),
            Freshness::Ttl(Duration::from_secs(300))
        );
        let (rule, _) = r.explain(&"org/app".parse().unwrap(), &"v2.0.0".parse().unwrap());
        assert_eq!(rule.unwrap().origin(), Origin::ImmutableTags(1));
        let (rule, _) = r.explain(&"risky/app".parse().unwrap(), &"x".parse().unwrap());
        assert_eq!(
            rule.unwrap().to_string(),
            "tag_rules #1 match = \"risky/*:*\""
        );
    }

    #[test]
    fn immutable_tags_are_anchored_as_written() {
        let r = rules(&[], &[r"^v?[0-9]+\.[0-9]+\.[0-9]+$"]);
        let ttl = Freshness::Ttl(Duration::from_secs(300));
        assert_eq!(fresh(&r, "a:1.2.3"), Freshness::Immutable);
        assert_eq!(fresh(&r, "a:v10.0.1"), Freshness::Immutable);
        assert_eq!(fresh(&r, "a:1.2"), ttl);
        assert_eq!(fresh(&r, "a:1.2.3-rc1"), ttl);
        assert_eq!(fresh(&r, "a:latest"), ttl);
        let loose = TagPatterns::new(&["1\\.0"]).unwrap();
        assert!(loose.matches("x1.0y"), "no implicit anchors");
        let e = TagPatterns::new(&["^ok$", "v(["]).unwrap_err();
        assert!(e.contains("\"v([\""), "{e}");
    }

    #[test]
    fn a_rule_has_one_action_and_a_valid_match() {
        let err = |text: &str| {
            let w: Written = toml::from_str(text).unwrap();
            w.compile(3).unwrap_err()
        };
        let e = err("match = \"*:latest\"\nttl = \"1m\"\nimmutable = true\n");
        assert!(
            e.contains("tag_rules #3 (match = \"*:latest\")")
                && e.contains("ttl and immutable are set"),
            "{e}"
        );
        let e = err("match = \"*:latest\"\n");
        assert!(e.contains("\"*:latest\"") && e.contains("no action"), "{e}");
        let e = err("match = \"a/[:x\"\nalways = true\n");
        assert!(e.contains("invalid glob \"a/[\""), "{e}");
        let e = err("match = \"re:v([\"\nalways = true\n");
        assert!(e.contains("invalid regular expression \"v([\""), "{e}");
        for bad in ["latest", ":latest", "*:", "a:b:c"] {
            let e = err(&format!("match = {bad:?}\nalways = true\n"));
            assert!(e.contains("REPOSITORY-GLOB:TAG-GLOB"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_rule_prints_back_as_written() {
        for text in [
            "match = \"*:latest\"\nttl = \"1m\"\n",
            "match = \"*:v*\"\nimmutable = true\n",
            "match = \"re:^a:b$\"\nalways = true\n",
        ] {
            let r = toml::from_str::<Written>(text).unwrap().compile(1).unwrap();
            assert_eq!(toml::to_string(&r).unwrap(), text);
        }
    }
}
