//! The documentation, checked against the code and against itself:
//!
//! - the configuration reference in `docs/configuration.md` is generated from the `///` doc
//!   comments of the config structs (`src/config.rs` and any `src/config/*.rs`), so the two
//!   cannot drift; `UPDATE_DOCS=1 cargo test --test docs` rewrites it;
//! - every relative link in the Markdown documents points at a file that exists, and every
//!   `#anchor` at a heading of its target.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const CONFIG_DOC: &str = "docs/configuration.md";
const BEGIN: &str = "<!-- BEGIN GENERATED: config reference -->";
const END: &str = "<!-- END GENERATED -->";
/// The struct deserialized from the whole file: the top level of the TOML.
const ROOT: &str = "Config";
/// What a map-valued field's keys are called in the reference (`[upstreams."<registry>"]`).
const MAP_KEYS: &[(&str, &str)] = &[("upstreams", "registry")];

// ---------------------------------------------------------------------------------------------
// The config structs, read from the source.

#[derive(Debug)]
struct Field {
    name: String,
    ty: String,
    doc: String,
    /// `#[serde(skip)]`: not a key of the file (set from the environment).
    skipped: bool,
    /// `#[serde(with = "size")]` and the like, which decide how the value is written.
    with: Option<String>,
}

#[derive(Debug)]
struct Struct {
    name: String,
    file: String,
    doc: String,
    fields: Vec<Field>,
}

/// `src/config.rs` and every `.rs` file under `src/config/`, sorted, as (path, text).
fn config_sources() -> Vec<(String, String)> {
    let mut paths = Vec::new();
    if Path::new("src/config.rs").is_file() {
        paths.push(PathBuf::from("src/config.rs"));
    }
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    walk(Path::new("src/config"), &mut paths);
    paths.sort();
    assert!(
        !paths.is_empty(),
        "neither src/config.rs nor src/config/*.rs exists"
    );
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p.to_string_lossy().replace('\\', "/"), text)
        })
        .collect()
}

/// Joins `///` lines into one paragraph (a blank `///` line starts a new one).
fn join_doc(lines: &[String]) -> String {
    let mut out = String::new();
    for line in lines {
        if line.is_empty() {
            if !out.is_empty() && !out.ends_with("<br><br>") {
                out.push_str("<br><br>");
            }
            continue;
        }
        if !out.is_empty() && !out.ends_with("<br><br>") {
            out.push(' ');
        }
        out.push_str(line);
    }
    out.trim_end_matches("<br><br>").to_owned()
}

/// An attribute that may span several lines, read until its brackets balance.
fn read_attribute<'a>(first: &'a str, lines: &mut impl Iterator<Item = &'a str>) -> String {
    let mut attr = first.trim().to_owned();
    let depth = |s: &str| s.matches('[').count() as i64 - s.matches(']').count() as i64;
    while depth(&attr) > 0 {
        match lines.next() {
            Some(next) => {
                attr.push(' ');
                attr.push_str(next.trim());
            }
            None => break,
        }
    }
    attr
}

/// The parts of the `#[serde(…)]` attributes, split at commas: `default`, `with = "size"`.
fn serde_parts(attrs: &[String]) -> impl Iterator<Item = &str> {
    attrs
        .iter()
        .filter_map(|a| a.strip_prefix("#[serde(")?.strip_suffix(")]"))
        .flat_map(|inner| inner.split(','))
        .map(str::trim)
}

/// The value of `key = "…"` in a `#[serde(…)]` attribute.
fn serde_value(attrs: &[String], key: &str) -> Option<String> {
    serde_parts(attrs).find_map(|part| {
        let (k, v) = part.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
    })
}

fn serde_flag(attrs: &[String], flag: &str) -> bool {
    serde_parts(attrs).any(|part| part == flag)
}

/// The structs that derive `Deserialize` and are tables of the file (not values that
/// deserialize through another type, such as `#[serde(try_from = "String")]`).
fn config_structs(sources: &[(String, String)]) -> Vec<Struct> {
    let mut structs = Vec::new();
    for (file, text) in sources {
        let file = file.clone();
        let mut lines = text.lines();
        let mut doc: Vec<String> = Vec::new();
        let mut attrs: Vec<String> = Vec::new();
        while let Some(line) = lines.next() {
            let t = line.trim();
            if let Some(d) = t.strip_prefix("///") {
                doc.push(d.trim().to_owned());
                continue;
            }
            if t.starts_with("#[") {
                attrs.push(read_attribute(t, &mut lines));
                continue;
            }
            let decl = t
                .strip_prefix("pub(crate) ")
                .or_else(|| t.strip_prefix("pub "))
                .unwrap_or(t);
            let derives_deserialize = attrs
                .iter()
                .any(|a| a.starts_with("#[derive(") && a.contains("Deserialize"));
            let is_value = ["try_from", "from", "into", "transparent"]
                .iter()
                .any(|k| serde_value(&attrs, k).is_some() || serde_flag(&attrs, k));
            if let Some(rest) = decl.strip_prefix("struct ") {
                if derives_deserialize && !is_value {
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    assert!(
                        rest.trim_end().ends_with('{'),
                        "{file}: config struct {name} must have named fields"
                    );
                    let fields = read_fields(&file, &name, &mut lines);
                    structs.push(Struct {
                        name,
                        file: file.clone(),
                        doc: join_doc(&doc),
                        fields,
                    });
                }
            }
            if !t.is_empty() {
                doc.clear();
                attrs.clear();
            }
        }
    }
    structs
}

/// The fields of a struct whose `{` has been read, up to its `}`.
fn read_fields<'a>(
    file: &str,
    strukt: &str,
    lines: &mut impl Iterator<Item = &'a str>,
) -> Vec<Field> {
    let mut fields = Vec::new();
    let mut doc: Vec<String> = Vec::new();
    let mut attrs: Vec<String> = Vec::new();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if t == "}" {
            return fields;
        }
        if let Some(d) = t.strip_prefix("///") {
            doc.push(d.trim().to_owned());
            continue;
        }
        if t.starts_with("//") || t.is_empty() {
            continue;
        }
        if t.starts_with("#[") {
            attrs.push(read_attribute(t, lines));
            continue;
        }
        // `pub name: Type,`, the type possibly wrapped over several lines.
        let mut decl = t.to_owned();
        while !decl.ends_with(',') {
            match lines.next() {
                Some(next) if next.trim() != "}" => decl.push_str(next.trim()),
                _ => panic!("{file}: {strukt}: cannot read the field `{decl}`"),
            }
        }
        let decl = decl.trim_end_matches(',');
        let decl = decl
            .strip_prefix("pub(crate) ")
            .or_else(|| decl.strip_prefix("pub "))
            .unwrap_or(decl);
        let (name, ty) = decl
            .split_once(':')
            .unwrap_or_else(|| panic!("{file}: {strukt}: cannot read the field `{decl}`"));
        let name = name.trim().trim_start_matches("r#").to_owned();
        assert!(
            !serde_flag(&attrs, "flatten"),
            "{file}: {strukt}.{name}: #[serde(flatten)] is not understood by tests/docs.rs"
        );
        fields.push(Field {
            name: serde_value(&attrs, "rename").unwrap_or(name),
            ty: ty.trim().to_owned(),
            doc: join_doc(&doc),
            skipped: serde_flag(&attrs, "skip") || serde_flag(&attrs, "skip_deserializing"),
            with: serde_value(&attrs, "with"),
        });
        doc.clear();
        attrs.clear();
    }
    panic!("{file}: {strukt}: no closing brace");
}

// ---------------------------------------------------------------------------------------------
// The reference, rendered from them.

/// `Option<T>` → `T`, `Box<T>` → `T`.
fn unwrap_type(ty: &str) -> &str {
    for wrapper in ["Option<", "Box<"] {
        if let Some(inner) = ty.strip_prefix(wrapper).and_then(|r| r.strip_suffix('>')) {
            return unwrap_type(inner.trim());
        }
    }
    ty
}

/// `BTreeMap<String, T>` (or `HashMap`) → `T`.
fn map_value(ty: &str) -> Option<&str> {
    let inner = ["BTreeMap<", "HashMap<", "std::collections::BTreeMap<"]
        .iter()
        .find_map(|p| ty.strip_prefix(p))?
        .strip_suffix('>')?;
    let (_, value) = inner.split_once(',')?;
    Some(value.trim())
}

fn last_segment(ty: &str) -> &str {
    ty.rsplit("::").next().unwrap_or(ty)
}

/// How a value is written in the file.
fn value_type(ty: &str, with: Option<&str>) -> String {
    let ty = unwrap_type(ty);
    if let Some(inner) = ty.strip_prefix("Vec<").and_then(|r| r.strip_suffix('>')) {
        return format!("array of {}", value_type(inner, None));
    }
    if with == Some("humantime_serde") {
        return "duration".to_owned();
    }
    if with == Some("size") {
        return "size".to_owned();
    }
    match last_segment(ty) {
        "String" => "string",
        "bool" => "boolean",
        "u8" | "u16" | "u32" | "u64" | "usize" | "i32" | "i64" => "integer",
        "f32" | "f64" => "float",
        "Duration" => "duration",
        "ByteSize" => "size",
        "PathBuf" => "path",
        "SocketAddr" => "address",
        "Secret" => "string (secret)",
        "IpNet" => "CIDR",
        "TagPatterns" => "array of regexes",
        "TagRule" => "tag rule tables",
        "RepoGlobs" => "array of globs",
        "RepoPattern" => "glob",
        "ImageRef" => "image",
        "Platform" => "platform",
        "TimeOfDay" => "time of day",
        "LogFormat" => "string",
        "UpstreamUrl" => "URL or table",
        other => return format!("`{other}`"),
    }
    .to_owned()
}

/// GitHub's anchor for a heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

struct Table<'a> {
    /// `server`, `storage.shared`, `upstreams."<registry>"`; empty for the top level.
    path: String,
    strukt: &'a Struct,
}

impl Table<'_> {
    fn heading(&self) -> String {
        if self.path.is_empty() {
            "Top level".to_owned()
        } else if let Some(array) = self.path.strip_suffix("[]") {
            format!("`[[{array}]]`")
        } else {
            format!("`[{}]`", self.path)
        }
    }
}

/// The tables of the file, top level first, each followed by its own sub-tables, by walking
/// the types of the fields from the root struct.
fn tables<'a>(structs: &'a BTreeMap<&str, &'a Struct>) -> Vec<Table<'a>> {
    fn walk<'a>(
        path: String,
        strukt: &'a Struct,
        structs: &'a BTreeMap<&str, &'a Struct>,
        out: &mut Vec<Table<'a>>,
    ) {
        let at = out.len();
        out.push(Table { path, strukt });
        for field in &strukt.fields {
            if let Some((child_path, child)) = child_table(&out[at].path, field, structs) {
                assert!(
                    !out.iter().any(|t| t.strukt.name == child.name),
                    "{} appears twice in the config: tests/docs.rs names each table once",
                    child.name
                );
                walk(child_path, child, structs, out);
            }
        }
    }
    let root = structs
        .get(ROOT)
        .unwrap_or_else(|| panic!("no struct {ROOT} in the config sources"));
    let mut out = Vec::new();
    walk(String::new(), root, structs, &mut out);
    out
}

/// The table a field opens, if its type (inside `Option` or a map) is a config struct; a
/// `Vec` of one is an array of tables, its path ending in `[]`.
fn child_table<'a>(
    parent: &str,
    field: &Field,
    structs: &'a BTreeMap<&str, &'a Struct>,
) -> Option<(String, &'a Struct)> {
    let ty = unwrap_type(&field.ty);
    let prefix = if parent.is_empty() {
        field.name.clone()
    } else {
        format!("{parent}.{}", field.name)
    };
    if let Some(value) = map_value(ty) {
        let child = structs.get(last_segment(unwrap_type(value)))?;
        let key = MAP_KEYS
            .iter()
            .find(|(f, _)| *f == field.name)
            .map_or("name", |(_, k)| k);
        return Some((format!("{prefix}.\"<{key}>\""), child));
    }
    if let Some(element) = ty.strip_prefix("Vec<").and_then(|r| r.strip_suffix('>')) {
        let child = structs.get(last_segment(element.trim()))?;
        return Some((format!("{prefix}[]"), child));
    }
    let child = structs.get(last_segment(ty))?;
    Some((prefix, child))
}

fn render_reference(structs: &[Struct]) -> String {
    let by_name: BTreeMap<&str, &Struct> = structs.iter().map(|s| (s.name.as_str(), s)).collect();
    assert_eq!(
        by_name.len(),
        structs.len(),
        "two config structs share a name"
    );
    let tables = tables(&by_name);

    let reached: BTreeSet<&str> = tables.iter().map(|t| t.strukt.name.as_str()).collect();
    let unreached: Vec<String> = structs
        .iter()
        .filter(|s| !reached.contains(s.name.as_str()))
        .map(|s| format!("{} ({})", s.name, s.file))
        .collect();
    assert!(
        unreached.is_empty(),
        "config structs that derive Deserialize but are not a table reachable from {ROOT}: {}. \
         Reach them from a field of {ROOT} (or of one of its tables), or, if they are a value \
         rather than a table, deserialize them with #[serde(try_from/from/transparent)]",
        unreached.join(", ")
    );

    let undocumented: Vec<String> = structs
        .iter()
        .flat_map(|s| {
            s.fields
                .iter()
                .filter(|f| f.doc.is_empty())
                .map(move |f| format!("{}.{} ({})", s.name, f.name, s.file))
        })
        .collect();
    assert!(
        undocumented.is_empty(),
        "config fields without a /// doc comment (it is their entry in {CONFIG_DOC}, and says \
         the default): {}",
        undocumented.join(", ")
    );

    let no_default: Vec<String> = tables
        .iter()
        .flat_map(|t| {
            t.strukt
                .fields
                .iter()
                .filter(|f| child_table(&t.path, f, &by_name).is_none())
                .filter(|f| {
                    let doc = f.doc.to_lowercase();
                    !f.doc.is_empty() && !doc.contains("default") && !doc.contains("required")
                })
                .map(move |f| format!("{}.{} ({})", t.strukt.name, f.name, t.strukt.file))
        })
        .collect();
    assert!(
        no_default.is_empty(),
        "config fields whose doc comment says neither its default (`Default …`) nor that it is \
         `Required`: {}",
        no_default.join(", ")
    );

    let mut out = String::new();
    out.push_str(
        "<!-- Generated by tests/docs.rs from the doc comments of the config structs. \
         Do not edit: edit the comments, then run `UPDATE_DOCS=1 cargo test --test docs`. -->\n",
    );
    for table in &tables {
        out.push_str(&format!("\n### {}\n\n", table.heading()));
        if !table.strukt.doc.is_empty() {
            out.push_str(&table.strukt.doc);
            out.push_str("\n\n");
        }
        out.push_str(&format!(
            "Source: `{}` in `{}`.\n\n",
            table.strukt.name, table.strukt.file
        ));
        out.push_str("| Key | Type | Meaning and default |\n| --- | --- | --- |\n");
        for field in &table.strukt.fields {
            let (key, ty, mut doc) = if field.skipped {
                (
                    "*(environment)*".to_owned(),
                    value_type(&field.ty, field.with.as_deref()),
                    field.doc.clone(),
                )
            } else if let Some((path, _)) = child_table(&table.path, field, &by_name) {
                let heading = match path.strip_suffix("[]") {
                    Some(array) => format!("`[[{array}]]`"),
                    None => format!("`[{path}]`"),
                };
                let is_map = map_value(unwrap_type(&field.ty)).is_some();
                (
                    format!("`{}`", field.name),
                    if is_map {
                        "tables, one per key"
                    } else if path.ends_with("[]") {
                        "array of tables"
                    } else {
                        "table"
                    }
                    .to_owned(),
                    format!("{} See [{heading}](#{}).", field.doc, slug(&heading)),
                )
            } else {
                (
                    format!("`{}`", field.name),
                    value_type(&field.ty, field.with.as_deref()),
                    field.doc.clone(),
                )
            };
            doc = cell(&doc);
            out.push_str(&format!("| {key} | {} | {doc} |\n", cell(&ty)));
        }
    }
    out
}

#[test]
fn configuration_reference_matches_the_config_structs() {
    let generated = render_reference(&config_structs(&config_sources()));
    let doc = std::fs::read_to_string(CONFIG_DOC)
        .unwrap_or_else(|e| panic!("cannot read {CONFIG_DOC}: {e}"));
    let (Some(begin), Some(end)) = (doc.find(BEGIN), doc.find(END)) else {
        panic!("{CONFIG_DOC} must hold a block between `{BEGIN}` and `{END}`");
    };
    assert!(begin < end, "{CONFIG_DOC}: `{END}` comes before `{BEGIN}`");
    let current = doc[begin + BEGIN.len()..end].trim();
    if current == generated.trim() {
        return;
    }
    if std::env::var_os("UPDATE_DOCS").is_some_and(|v| !v.is_empty() && v != "0") {
        let updated = format!(
            "{}{BEGIN}\n{}\n{}",
            &doc[..begin],
            generated.trim(),
            &doc[end..]
        );
        std::fs::write(CONFIG_DOC, updated).unwrap();
        eprintln!("{CONFIG_DOC}: configuration reference rewritten");
        return;
    }
    let first_difference = current
        .lines()
        .zip(generated.trim().lines())
        .position(|(a, b)| a != b)
        .map_or_else(
            || "one is longer than the other".to_owned(),
            |i| {
                format!(
                    "first difference at line {} of the block:\n  in the doc:  {}\n  generated:   {}",
                    i + 1,
                    current.lines().nth(i).unwrap_or(""),
                    generated.trim().lines().nth(i).unwrap_or("")
                )
            },
        );
    panic!(
        "{CONFIG_DOC}: the configuration reference differs from the doc comments of the config \
         structs ({first_difference}).\nRun `UPDATE_DOCS=1 cargo test --test docs` to rewrite it, \
         then review the diff."
    );
}

// ---------------------------------------------------------------------------------------------
// Links.

/// The Markdown documents whose links are checked.
fn documents() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = [
        "README.md",
        "CONTRIBUTING.md",
        "ARCHITECTURE.md",
        "examples/README.md",
        "examples/cluster/README.md",
        "bench/README.md",
    ]
    .iter()
    .map(PathBuf::from)
    .filter(|p| p.is_file())
    .collect();
    let mut in_docs: Vec<PathBuf> = std::fs::read_dir("docs")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    in_docs.sort();
    docs.extend(in_docs);
    docs
}

/// The text outside fenced code blocks, with inline code spans (which may wrap within a
/// paragraph) blanked out, so that neither is read as a link.
fn prose(markdown: &str) -> String {
    let mut out = String::new();
    let mut fence: Option<&str> = None;
    let mut in_code = false;
    for line in markdown.lines() {
        let t = line.trim_start();
        if let Some(f) = fence {
            if t.starts_with(f) {
                fence = None;
            }
            out.push('\n');
            continue;
        }
        if t.starts_with("```") || t.starts_with("~~~") {
            fence = Some(&t[..3]);
            out.push('\n');
            continue;
        }
        if line.trim().is_empty() {
            in_code = false; // a code span ends with its paragraph
        }
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
                out.push('`');
            } else if in_code {
                out.push('x');
            } else {
                out.push(c);
            }
        }
        out.push('\n');
    }
    out
}

/// The anchors of a Markdown file's headings, as GitHub makes them (a repeated heading gets
/// `-1`, `-2`, …), plus explicit `<a name=…>` / `id=…` anchors.
fn anchors(markdown: &str) -> BTreeSet<String> {
    let link = regex::Regex::new(r"\[([^\]]*)\]\([^)]*\)").unwrap();
    let explicit = regex::Regex::new(r#"(?:name|id)="([^"]+)""#).unwrap();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    let mut fence: Option<String> = None;
    for line in markdown.lines() {
        let t = line.trim_start();
        if let Some(f) = &fence {
            if t.starts_with(f.as_str()) {
                fence = None;
            }
            continue;
        }
        if t.starts_with("```") || t.starts_with("~~~") {
            fence = Some(t[..3].to_owned());
            continue;
        }
        for c in explicit.captures_iter(line) {
            out.insert(c[1].to_owned());
        }
        let hashes = t.chars().take_while(|c| *c == '#').count();
        if hashes == 0 || hashes > 6 || !(t.len() == hashes || t[hashes..].starts_with(' ')) {
            continue;
        }
        let text = t[hashes..].trim().trim_end_matches('#').trim();
        let text = link.replace_all(text, "$1");
        let base = slug(&text);
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

/// Relative link targets in a document: inline links and images, and reference definitions.
fn link_targets(markdown: &str) -> Vec<String> {
    let inline = regex::Regex::new(r#"\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)"#).unwrap();
    let reference = regex::Regex::new(r"(?m)^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)").unwrap();
    let text = prose(markdown);
    inline
        .captures_iter(&text)
        .chain(reference.captures_iter(&text))
        .map(|c| c[1].to_owned())
        .filter(|t| {
            let lower = t.to_lowercase();
            !(lower.starts_with("http://")
                || lower.starts_with("https://")
                || lower.starts_with("mailto:")
                || lower.starts_with("//"))
        })
        .collect()
}

#[test]
fn relative_links_resolve() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        let dir = doc.parent().unwrap_or(Path::new(""));
        for target in link_targets(&text) {
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let path = path.split_once('?').map_or(path, |(p, _)| p);
            let file = if path.is_empty() {
                doc.clone()
            } else {
                dir.join(path)
            };
            if !file.exists() {
                broken.push(format!(
                    "{}: `{target}`: {} does not exist",
                    doc.display(),
                    file.display()
                ));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            if file.extension().is_none_or(|e| e != "md") {
                continue;
            }
            let target_text = std::fs::read_to_string(&file).unwrap();
            if !anchors(&target_text).contains(anchor) {
                broken.push(format!(
                    "{}: `{target}`: {} has no heading with the anchor #{anchor}",
                    doc.display(),
                    file.display()
                ));
            }
        }
    }
    assert!(checked > 0, "no links found: is the link reader broken?");
    assert!(
        broken.is_empty(),
        "broken relative links:\n  {}",
        broken.join("\n  ")
    );
}

#[test]
fn slugs_follow_github() {
    assert_eq!(slug("Run it, test it"), "run-it-test-it");
    assert_eq!(slug("`[storage.shared]`"), "storageshared");
    assert_eq!(
        slug("Single-flight: `bench/singleflight.sh`"),
        "single-flight-benchsingleflightsh"
    );
    assert_eq!(
        slug("containerd, nerdctl and Kubernetes"),
        "containerd-nerdctl-and-kubernetes"
    );
    assert_eq!(slug("snake_case and CAPS"), "snake_case-and-caps");
    let a = anchors("# A\n## A\n```\n# not a heading\n```\n### `B` (c)\n");
    assert_eq!(
        a,
        BTreeSet::from(["a".to_owned(), "a-1".to_owned(), "b-c".to_owned()])
    );
}

#[test]
fn links_are_read_outside_code() {
    let md = "[a](x.md) `[b](y.md)`\n```\n[c](z.md)\n```\n[d]: w.md\n[e](https://e.org)\n\
              [f](<g.md> \"title\") `wrapped\ncode [h](h.md)`\n";
    assert_eq!(link_targets(md), vec!["x.md", "g.md", "w.md"]);
}

/// A config tree of two tables, as the source would have it.
const SAMPLE: &str = r#"
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The listener.
    pub server: ServerConfig,
    /// Upstreams by name. Default: none.
    pub upstreams: BTreeMap<String, UpstreamConfig>,
}

/// `[server]`.
#[derive(Debug, Deserialize)]
pub struct ServerConfig {
    /// Where to listen. Default `:5000`.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// Env `SECRET` only. Required.
    #[serde(skip)]
    pub secret: Option<Secret>,
}

#[derive(Debug, Deserialize)]
pub struct UpstreamConfig {
    /// A | pipe. Default 1.
    pub n: u32,
}

#[derive(Deserialize)]
#[serde(try_from = "String")]
pub struct Value {
    minutes: u16,
}
"#;

fn sample(text: &str) -> Vec<(String, String)> {
    vec![("src/config.rs".to_owned(), text.to_owned())]
}

#[test]
fn reference_renders_tables_keys_and_defaults() {
    let out = render_reference(&config_structs(&sample(SAMPLE)));
    assert!(out.contains("### `[server]`"), "{out}");
    assert!(
        out.contains("| `grace` | duration | Where to listen. Default `:5000`. |"),
        "{out}"
    );
    assert!(out.contains("| *(environment)* | string (secret) | Env `SECRET` only. Required. |"));
    assert!(out.contains("### `[upstreams.\"<registry>\"]`"), "{out}");
    assert!(
        out.contains("| `n` | integer | A \\| pipe. Default 1. |"),
        "{out}"
    );
    assert!(out.contains("(#upstreamsregistry)"), "{out}");
}

fn render_fails(text: &str) -> String {
    let structs = config_structs(&sample(text));
    let err = std::panic::catch_unwind(|| render_reference(&structs)).unwrap_err();
    err.downcast_ref::<String>().cloned().unwrap_or_default()
}

#[test]
fn reference_refuses_undocumented_or_unreachable_config() {
    let undocumented = SAMPLE.replace("    /// A | pipe. Default 1.\n", "");
    assert!(render_fails(&undocumented).contains("UpstreamConfig.n"));
    let no_default = SAMPLE.replace("A | pipe. Default 1.", "A pipe.");
    assert!(render_fails(&no_default).contains("neither its default"));
    let orphan = format!("{SAMPLE}\n#[derive(Deserialize)]\npub struct Orphan {{\n    /// x. Default 1.\n    pub x: u32,\n}}\n");
    assert!(render_fails(&orphan).contains("Orphan"));
}
