//! The layering of ARCHITECTURE.md, checked: every module under `src/` belongs to one layer,
//! no module imports from a layer above its own, and the modules' imports form no cycle.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top to bottom. A module may use modules of its own layer (without a cycle) or below.
const LAYERS: &[(&str, &[&str])] = &[
    ("entry", &["main", "lib", "cli", "admin"]),
    ("server", &["server"]),
    ("routes", &["routes"]),
    ("handlers", &["handlers"]),
    ("pull", &["mirror", "warm"]),
    (
        "services",
        &[
            "download",
            "verify",
            "store",
            "upstream",
            "cluster",
            "singleflight",
        ],
    ),
    (
        "foundations",
        &[
            "config",
            "image",
            "oci",
            "policy",
            "outcome",
            "metrics",
            "logging",
            "clock",
            "sync",
            "hashing",
            "platform",
            "sendfile",
            "ranges",
            "idle",
            "secret",
            "size",
            "peer_api",
            "tag_rules",
            "identity",
            "trace",
        ],
    ),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

/// The top-level module a file under `src/` belongs to: `src/store/blobs.rs` → `store`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a source text names through `crate::…` paths (in `use` items and
/// inline paths alike, braces included); the binary names the library `pullthrough::…`.
fn imports(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for prefix in ["crate::", "pullthrough::"] {
        for (i, _) in text.match_indices(prefix) {
            let before = text[..i].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let rest = &text[i + prefix.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        found.insert(name);
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        }
    }
    found
}

/// Drops comments, so prose that mentions `crate::x` does not count as an import.
fn code_only(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// module → the other top-level modules it imports.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let module = module_of(src, &file);
        let text = code_only(&std::fs::read_to_string(&file).unwrap());
        let deps = graph.entry(module.clone()).or_default();
        for dep in imports(&text) {
            // Re-exports and items of the crate root (`crate::Config`) are not modules.
            if dep != module && dep.chars().next().is_some_and(|c| c.is_lowercase()) {
                deps.insert(dep);
            }
        }
    }
    graph
}

/// Upward imports and cycles, as messages.
fn violations(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut problems = Vec::new();
    for (module, deps) in graph {
        let Some(own) = layer_of(module) else {
            problems.push(format!(
                "module `{module}` is in no layer of ARCHITECTURE.md"
            ));
            continue;
        };
        for dep in deps {
            match layer_of(dep) {
                Some(l) if l < own => problems.push(format!(
                    "`{module}` ({}) imports `{dep}` ({}), a layer above it",
                    LAYERS[own].0, LAYERS[l].0
                )),
                _ => {}
            }
        }
    }
    // Cycles: a depth-first search that finds a module already on the current path.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        problems: &mut Vec<String>,
    ) {
        if done.contains(node) {
            return;
        }
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            problems.push(format!("import cycle: {}", cycle.join(" → ")));
            return;
        }
        path.push(node.to_owned());
        for dep in graph.get(node).into_iter().flatten() {
            visit(dep, graph, path, done, problems);
        }
        path.pop();
        done.insert(node.to_owned());
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        visit(module, graph, &mut Vec::new(), &mut done, &mut problems);
    }
    problems
}

#[test]
fn imports_point_down_the_layers_without_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let problems = violations(&graph(&src));
    assert!(
        problems.is_empty(),
        "the layering in ARCHITECTURE.md is broken:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_checker_catches_an_upward_import_and_a_cycle() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("store".into()).or_default().insert("mirror".into());
    g.entry("mirror".into()).or_default().insert("store".into());
    let problems = violations(&g);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("`store` (services) imports `mirror` (pull)")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.starts_with("import cycle")),
        "{problems:?}"
    );
}

#[test]
fn imports_are_read_from_paths_groups_and_the_binary() {
    let found = imports(
        "use crate::{config::Config, oci};\nlet x = crate::store::Store::open();\n\
         use pullthrough::cli::Cli;\nmycrate::nothing",
    );
    let want: BTreeSet<String> = ["config", "oci", "store", "cli"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(found, want);
}

/// What a module's code says about the S3 backend: the paths that reach it directly.
fn backend_uses(text: &str) -> Vec<&'static str> {
    ["store::s3", "s3::S3", "object_store::"]
        .into_iter()
        .filter(|needle| text.contains(needle))
        .collect()
}

/// What a module's code says about the shared tier itself, which downloads and the pull layer
/// reach only through the seam of both tiers (`store::tiers::Tiers`).
fn shared_tier_uses(text: &str) -> Vec<&'static str> {
    ["store::shared", "SharedTier"]
        .into_iter()
        .filter(|needle| text.contains(needle))
        .collect()
}

/// Files under `src/` that reach the S3 backend directly although their module must go
/// through the storage seam (`store::tiers::Tiers`, over a `store::tier::Backend`), and files
/// of downloads and the pull layer that reach the shared tier around it.
fn backend_leaks(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut leaks = Vec::new();
    for file in files {
        let module = module_of(src, &file);
        if !["download", "mirror", "cluster"].contains(&module.as_str()) {
            continue;
        }
        let text = code_only(&std::fs::read_to_string(&file).unwrap());
        let mut used = backend_uses(&text);
        if module != "cluster" {
            used.extend(shared_tier_uses(&text));
        }
        for used in used {
            leaks.push(format!("{} uses `{used}`", file.display()));
        }
    }
    leaks
}

#[test]
fn download_the_pull_layer_and_the_cluster_reach_storage_only_through_the_seam() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let leaks = backend_leaks(&src);
    assert!(
        leaks.is_empty(),
        "the S3 backend or the shared tier is reached around the storage seam:\n  {}",
        leaks.join("\n  ")
    );
}

#[test]
fn the_seam_checker_sees_a_direct_use_of_the_backend() {
    assert_eq!(
        backend_uses("let t = crate::store::s3::S3::over(store);"),
        ["store::s3", "s3::S3"]
    );
    assert_eq!(
        backend_uses("fn f(s: Arc<dyn object_store::ObjectStore>) {}"),
        ["object_store::"]
    );
    assert!(backend_uses("use crate::store::tiers::Tiers;").is_empty());
    assert_eq!(
        shared_tier_uses("use crate::store::shared::SharedTier;"),
        ["store::shared", "SharedTier"]
    );
    assert!(shared_tier_uses("use crate::store::tiers::Tiers;").is_empty());
}
