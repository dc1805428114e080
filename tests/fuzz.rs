//! Property tests over everything a client or an upstream controls that the mirror parses:
//! routes, names, references, digests, `Accept`, and config files. Each property must hold
//! for any input (no panic, and the parsed value means what the text said).
//!
//! CI runs them with `PROPTEST_CASES=4000`; by hand, raise it for a longer run
//! (`PROPTEST_CASES=200000 cargo test --release --test fuzz`). A failing case is saved under
//! `proptest-regressions/` and replayed first on every later run: commit that file, and add
//! the case as a named regression test.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

use proptest::prelude::*;
use pullthrough::config::Config;
use pullthrough::oci::{Accept, Digest, Reference, RepoName};
use pullthrough::routes::{self, Route};

/// Names per the distribution grammar: components of [a-z0-9] with separators.
fn name() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z0-9]{1,8}([._-][a-z0-9]{1,8})?", 1..4).prop_map(|c| c.join("/"))
}

fn tag() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_][A-Za-z0-9_.-]{0,40}"
}

fn method() -> impl Strategy<Value = http::Method> {
    prop_oneof![
        Just(http::Method::GET),
        Just(http::Method::HEAD),
        Just(http::Method::PUT),
        Just(http::Method::DELETE),
        Just(http::Method::POST),
    ]
}

proptest! {
    #[test]
    fn any_path_routes_without_panicking(m in method(), path in "\\PC{0,200}") {
        let _ = routes::parse(&m, &path);
    }

    #[test]
    fn any_path_of_slashes_and_keywords_routes(m in method(), parts in prop::collection::vec(
        prop_oneof![Just("v2"), Just("manifests"), Just("blobs"), Just("tags"), Just("list"),
                    Just(".."), Just("."), Just(""), Just("sha256:"), Just("%2e%2e"), Just("a")],
        0..10)) {
        let _ = routes::parse(&m, &format!("/{}", parts.join("/")));
    }

    #[test]
    fn a_manifest_path_routes_to_its_name_and_tag(n in name(), t in tag()) {
        let route = routes::parse(&http::Method::GET, &format!("/v2/{n}/manifests/{t}"));
        match route {
            Route::Manifest { name, reference: Reference::Tag(tag), head } => {
                prop_assert_eq!(name.as_str(), n.as_str());
                prop_assert_eq!(tag.as_str(), t.as_str());
                prop_assert!(!head);
            }
            other => prop_assert!(false, "{other:?}"),
        }
    }

    #[test]
    fn a_blob_path_routes_to_its_digest(n in name(), hex in "[0-9a-f]{64}") {
        let route = routes::parse(&http::Method::HEAD, &format!("/v2/{n}/blobs/sha256:{hex}"));
        match route {
            Route::Blob { digest, head, .. } => {
                prop_assert_eq!(digest.hex(), hex.as_str());
                prop_assert!(head);
            }
            other => prop_assert!(false, "{other:?}"),
        }
    }

    #[test]
    fn names_references_and_digests_parse_any_text_or_refuse_it(s in "\\PC{0,300}") {
        if let Ok(n) = s.parse::<RepoName>() {
            // Nothing that could leave the cache directory survives parsing.
            prop_assert!(!n.as_str().split('/').any(|c| c == ".." || c == "." || c.is_empty()));
        }
        let _ = s.parse::<Reference>();
        if let Ok(d) = s.parse::<Digest>() {
            prop_assert_eq!(d.to_string(), s);
        }
    }

    #[test]
    fn accept_headers_parse_and_never_allow_an_unlisted_type(values in prop::collection::vec("\\PC{0,120}", 0..4)) {
        let accept = Accept::parse(values.iter().map(String::as_str));
        let joined = values.join(",");
        let t = "application/vnd.oci.image.manifest.v1+json";
        if !joined.contains(t) && !joined.contains("*/*") && !joined.trim().is_empty()
            && accept.header_value().is_some()
        {
            prop_assert!(!accept.allows(t) || joined.contains("application/*"), "{joined:?}");
        }
    }

    #[test]
    fn config_files_never_panic_and_never_echo_a_secret(body in "\\PC{0,200}") {
        let text = format!("[upstreams.\"docker.io\"]\nusername = \"u\"\npassword = \"SECRET-4242\"\n{body}");
        if let Err(e) = Config::from_toml(&text) {
            prop_assert!(!e.contains("SECRET-4242"), "{e}");
        }
    }
}
