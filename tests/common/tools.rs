//! The external programs a few tests run: `redis-server` (cluster_redis), Garage (shared_s3),
//! `docker-registry` and `skopeo` (e2e_skopeo), `curl` (ops).
//!
//! Locally, a test whose program is missing passes with a notice on stderr, so that
//! `cargo test` works on any machine. CI installs them first (tests/clients/run.sh --install,
//! tests/cluster/run.sh --install) and runs `cargo test` with `PULLTHROUGH_REQUIRE_TOOLS=1`:
//! then a missing program fails the test instead of letting it pass unrun. (promtool keeps
//! its own variable, as operator.rs reads it: `PROMTOOL` set to its path makes that one test
//! required; .ci/lint-packaging sets it, since promtool is installed after `cargo test`.)

use std::io::Write as _;
use std::path::PathBuf;

/// Set to `1`, every program this module looks for must be there.
pub const REQUIRE_TOOLS: &str = "PULLTHROUGH_REQUIRE_TOOLS";

/// Whether the environment makes a missing program a failure.
pub fn tools_required() -> bool {
    std::env::var_os(REQUIRE_TOOLS).is_some_and(|v| v == "1")
}

/// `program` found on the `PATH`, or `None` (the caller skips its test) after a notice on
/// stderr; with [`REQUIRE_TOOLS`] set, a panic instead. `install` says where it comes from.
pub fn require_tool(program: &str, install: &str) -> Option<PathBuf> {
    find_on_path(program).or_else(|| missing(&format!("`{program}` is not on the PATH"), install))
}

/// What a test does without something it needs: `None` after a notice on stderr naming the
/// test, or, with [`REQUIRE_TOOLS`] set, a panic.
pub fn missing<T>(what: &str, install: &str) -> Option<T> {
    assert!(
        !tools_required(),
        "{what} ({install}); {REQUIRE_TOOLS}=1 requires it"
    );
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    // Straight to the stderr handle: libtest swallows eprintln! from passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {what} ({install}); {REQUIRE_TOOLS}=1 makes this a failure"
    );
    None
}

/// The first executable file named `name` in a directory of the `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
