//! The command line. Flags override the config file and the environment. The global flags
//! (`--config`, `--storage-dir`, …) are accepted before or after a subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::config::{parse_size, Config, ConfigError, LogFormat, Overrides, Secret};
use crate::image::{ImageRef, Platform};
use crate::mirror::purge::Subject;

/// A pull-through caching mirror for Docker Hub and other OCI registries.
#[derive(Debug, Parser)]
#[command(name = "pullthrough", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The flags that choose and override the configuration; every command takes them.
#[derive(Debug, Clone, Default, Args)]
pub struct GlobalArgs {
    /// Config file (TOML). Without it, built-in defaults apply (Docker Hub, ./data, :5000).
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        env = "PULLTHROUGH_CONFIG",
        global = true,
        help_heading = "Global options"
    )]
    pub config: Option<PathBuf>,
    /// Listen address, e.g. 0.0.0.0:5000 (server.listen).
    #[arg(
        long,
        value_name = "ADDR",
        global = true,
        help_heading = "Global options"
    )]
    pub listen: Option<SocketAddr>,
    /// Cache directory (storage.dir).
    #[arg(
        long,
        value_name = "DIR",
        global = true,
        help_heading = "Global options"
    )]
    pub storage_dir: Option<PathBuf>,
    /// Bound on cached bytes, e.g. 50GiB (storage.max_size).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, global = true,
        help_heading = "Global options")]
    pub max_size: Option<bytesize::ByteSize>,
    /// URL of the default upstream registry, e.g. https://registry-1.docker.io.
    #[arg(
        long,
        value_name = "URL",
        global = true,
        help_heading = "Global options"
    )]
    pub upstream: Option<String>,
    /// How long a cached tag is served without asking the upstream, e.g. 1s, 5m (cache.tag_ttl).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, global = true,
        help_heading = "Global options")]
    pub tag_ttl: Option<Duration>,
    /// Log format (log.format).
    #[arg(
        long,
        value_enum,
        value_name = "FORMAT",
        global = true,
        help_heading = "Global options"
    )]
    pub log_format: Option<LogFormat>,
}

/// Operator commands. Without a command, the mirror runs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect or trim the cache (of a stopped or running mirror).
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Re-hash every cached blob and manifest and report (or remove) those that fail.
    ///
    /// Shows a progress bar on a terminal and a progress line every few seconds otherwise
    /// (on stderr). Exit status 1 when something is corrupt and not repaired.
    Verify {
        /// Remove corrupt files (the mirror fetches them again when asked).
        #[arg(long)]
        repair: bool,
        /// Print the report as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Check the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script to stdout.
    ///
    /// bash: `pullthrough completions bash > /etc/bash_completion.d/pullthrough`;
    /// zsh: `pullthrough completions zsh > "${fpath[1]}/_pullthrough"`;
    /// fish: `pullthrough completions fish > ~/.config/fish/completions/pullthrough.fish`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout: `pullthrough man | man -l -`.
    Man,
    /// Pull every manifest and blob of images through the cache, so they are hot before
    /// clients ask.
    ///
    /// With --mirror, through a running mirror's API; without, directly into the configured
    /// storage directory (refused while a mirror serves it: use --mirror then). Cached content
    /// costs nothing upstream, a tag past its TTL is checked with a HEAD (not a counted pull),
    /// and the run stops when an upstream's pull budget is at its reserve (budget_reserve).
    /// Without IMAGE or --file, warms the config's [warm] images. Progress on stderr, the
    /// summary on stdout. Exit status 1 when something was not warmed, 2 when it could not
    /// start.
    Warm(WarmArgs),
    /// Exit 0 when the mirror's health endpoint answers 200 (for container health checks).
    ///
    /// A plain HTTP/1.1 GET, so that an image needs no curl.
    Healthcheck {
        /// The URL to ask (http:// only).
        #[arg(
            long,
            value_name = "URL",
            default_value = "http://127.0.0.1:5000/healthz"
        )]
        url: String,
        /// Give up after this long.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "5s")]
        timeout: Duration,
    },
}

#[derive(Debug, Clone, Args)]
pub struct WarmArgs {
    /// Images as you would pull them: alpine:3.19, ghcr.io/org/app:1.0,
    /// library/alpine@sha256:…
    #[arg(value_name = "IMAGE")]
    pub images: Vec<ImageRef>,
    /// Also the images in this file, one per line (blank lines and # comments ignored).
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// A running mirror to pull through, e.g. http://127.0.0.1:5000.
    #[arg(long, value_name = "URL")]
    pub mirror: Option<url::Url>,
    /// Bearer token for a --mirror that asks for one (server.tokens).
    #[arg(long, value_name = "TOKEN", env = "PULLTHROUGH_MIRROR_TOKEN", hide_env_values = true,
        value_parser = parse_secret)]
    pub mirror_token: Option<Secret>,
    /// Only these platforms of multi-platform images, comma-separated
    /// (linux/amd64,linux/arm64/v8). Default: [warm] platforms, else every platform.
    #[arg(long, value_name = "PLATFORMS", value_delimiter = ',')]
    pub platform: Vec<Platform>,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

fn parse_secret(s: &str) -> Result<Secret, String> {
    Ok(Secret::new(s))
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Entries, bytes, oldest and newest access.
    Stats,
    /// Delete least recently used content until the cache holds at most SIZE.
    Prune {
        /// Target size, e.g. 20GiB.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        to: bytesize::ByteSize,
    },
    /// Forget tags, or remove content, so that the next pull fetches it from the upstream.
    ///
    /// REFERENCE is a tag (alpine:3.20: its record is forgotten), a digest reference
    /// (alpine@sha256:…: that manifest is removed and unlinked from the repository) or a
    /// repository (alpine, ghcr.io/org/app: every tag of it). --digest removes a blob or
    /// manifest and unlinks it from every repository. With replicas, the shared tier and the
    /// fleet's records forget it too, and the other replicas within seconds. With --mirror,
    /// through a running mirror's admin API; without, on the configured storage directory
    /// (refused while a mirror serves it: use --mirror then). Exit status 1 when a purge
    /// failed; finding nothing to purge is not a failure.
    Purge(PurgeArgs),
    /// Revalidate tags now, whatever their TTL: a HEAD to the upstream, and the manifest
    /// fetched if the tag moved.
    ///
    /// REFERENCE is a tag (alpine:3.20), or a repository (alpine: every tag the mirror holds
    /// of it). With replicas, the others drop their own copy of the tag and read the new one.
    /// With --mirror, through a running mirror's admin API; without, on the configured storage
    /// directory. Exit status 1 when a tag could not be refreshed (the upstream did not
    /// answer, or has no such tag).
    Refresh(RefreshArgs),
    /// Pin images: their manifests and blobs are never evicted (kept in the storage dir's
    /// `pins` file, so a restart keeps them).
    ///
    /// With --mirror, through a running mirror's API; without, on the configured storage
    /// directory (refused while a mirror serves it). Refused, with the figures, when the
    /// pinned images would take more than storage.max_size. Exit status 1 when refused.
    Pin(PinArgs),
    /// Unpin images pinned with `cache pin` (config pins stay: change the config).
    Unpin(PinArgs),
}

/// A running mirror to ask, for the commands that can also work on a storage dir.
#[derive(Debug, Clone, Args)]
pub struct MirrorArgs {
    /// A running mirror to ask, e.g. http://127.0.0.1:5000 (its admin API).
    #[arg(long, value_name = "URL")]
    pub mirror: Option<url::Url>,
    /// Bearer token for a --mirror that asks for one (server.tokens).
    #[arg(long, value_name = "TOKEN", env = "PULLTHROUGH_MIRROR_TOKEN", hide_env_values = true,
        value_parser = parse_secret)]
    pub mirror_token: Option<Secret>,
    /// Print the results as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct PurgeArgs {
    /// What to purge: alpine:3.20, ghcr.io/org/app@sha256:…, or a repository (alpine).
    #[arg(value_name = "REFERENCE", value_parser = parse_subject,
        required_unless_present = "digest")]
    pub references: Vec<Subject>,
    /// A blob or manifest to remove, with its links to every repository.
    #[arg(long, value_name = "DIGEST")]
    pub digest: Vec<crate::oci::Digest>,
    #[command(flatten)]
    pub mirror: MirrorArgs,
}

#[derive(Debug, Clone, Args)]
pub struct RefreshArgs {
    /// What to revalidate: a tag (alpine:3.20) or a repository (alpine).
    #[arg(value_name = "REFERENCE", value_parser = parse_refreshable, required = true)]
    pub references: Vec<Subject>,
    #[command(flatten)]
    pub mirror: MirrorArgs,
}

fn parse_subject(s: &str) -> Result<Subject, String> {
    s.parse()
}

fn parse_refreshable(s: &str) -> Result<Subject, String> {
    let subject: Subject = s.parse()?;
    match subject.tags() {
        Some(_) => Ok(subject),
        None => Err(format!(
            "{s:?} is named by its digest, which never changes: refresh a tag or a repository"
        )),
    }
}

#[derive(Debug, Clone, Args)]
pub struct PinArgs {
    /// Images as you would pull them: alpine:3.20, ghcr.io/org/app:1.0,
    /// library/alpine@sha256:…
    #[arg(value_name = "REFERENCE", required = true)]
    pub images: Vec<ImageRef>,
    /// A running mirror to ask, e.g. http://127.0.0.1:5000.
    #[arg(long, value_name = "URL")]
    pub mirror: Option<url::Url>,
    /// Bearer token for a --mirror that asks for one (server.tokens).
    #[arg(long, value_name = "TOKEN", env = "PULLTHROUGH_MIRROR_TOKEN", hide_env_values = true,
        value_parser = parse_secret)]
    pub mirror_token: Option<Secret>,
    /// Only these platforms of multi-platform images, comma-separated (linux/amd64).
    /// Default: every platform. (pin only)
    #[arg(long, value_name = "PLATFORMS", value_delimiter = ',')]
    pub platform: Vec<Platform>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Load the configuration as the server would (file, environment, flags), validate it and
    /// print the effective values as TOML, secrets redacted. Exit status 1 when it is invalid.
    Check {
        /// Instead of the values, print which tag rule a reference gets and how long its
        /// cached tag is trusted (alpine:latest, ghcr.io/org/app:v1.2.3). Repeatable.
        #[arg(long, value_name = "REFERENCE")]
        explain: Vec<ImageRef>,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 1s, 90s, 5m, 1h)"))
}

impl GlobalArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen,
            storage_dir: self.storage_dir.clone(),
            max_size: self.max_size,
            upstream: self.upstream.clone(),
            tag_ttl: self.tag_ttl,
            log_format: self.log_format,
        }
    }

    /// The configuration exactly as the server loads it: the file (or the defaults), then the
    /// environment, then these flags, then [`Config::validate`].
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        Config::load(
            self.config.as_deref(),
            |k| std::env::var(k).ok(),
            &self.overrides(),
        )
    }
}

/// Writes the completion script for `shell`, generated from the CLI definition.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "pullthrough", out);
}

/// Writes the man page (roff), generated from the CLI definition, with a page section for
/// every subcommand appended.
pub fn man(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let command = Cli::command();
    let man = clap_mangen::Man::new(command.clone());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    render_subcommands(&command, "", out)?;
    man.render_version_section(out)?;
    Ok(())
}

/// One `.SH` section per subcommand (nested ones as `cache prune`), with its about text and
/// options: clap_mangen's own subcommand section lists only the names.
fn render_subcommands(
    command: &clap::Command,
    prefix: &str,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    for sub in command.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        let name = format!("{prefix}{}", sub.get_name());
        if sub.has_subcommands() {
            render_subcommands(sub, &format!("{name} "), out)?;
            continue;
        }
        let sub = sub.clone().bin_name(format!("pullthrough {name}"));
        writeln!(out, ".SH \"COMMAND: {}\"", name.to_uppercase())?;
        let man = clap_mangen::Man::new(sub);
        // The synopsis and description of the subcommand, then its own options.
        let mut section = Vec::new();
        man.render_synopsis_section(&mut section)?;
        man.render_description_section(&mut section)?;
        man.render_options_section(&mut section)?;
        // Demote the subcommand's sections to subsections of this one.
        let text = String::from_utf8_lossy(&section).replace(".SH ", ".SS ");
        out.write_all(text.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("pullthrough").chain(args.iter().copied()))
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_are_accepted_after_the_subcommand() {
        let cli = parse(&[
            "verify",
            "--storage-dir",
            "/srv/cache",
            "--config",
            "m.toml",
        ])
        .unwrap();
        assert_eq!(cli.global.storage_dir, Some(PathBuf::from("/srv/cache")));
        assert_eq!(cli.global.config, Some(PathBuf::from("m.toml")));
        assert!(matches!(
            cli.command,
            Some(Command::Verify {
                repair: false,
                json: false
            })
        ));

        let cli = parse(&["cache", "prune", "--to", "1GiB", "--storage-dir", "d"]).unwrap();
        assert_eq!(cli.global.storage_dir, Some(PathBuf::from("d")));
        let cli = parse(&["cache", "--max-size", "2GiB", "stats"]).unwrap();
        assert_eq!(cli.global.max_size, Some(bytesize::ByteSize::gib(2)));
        let cli = parse(&["config", "check", "-c", "x.toml", "--tag-ttl", "1m"]).unwrap();
        assert_eq!(cli.global.config, Some(PathBuf::from("x.toml")));
        assert_eq!(cli.global.tag_ttl, Some(Duration::from_secs(60)));
    }

    #[test]
    fn global_flags_are_still_accepted_before_the_subcommand() {
        let cli = parse(&[
            "--storage-dir",
            "d",
            "--log-format",
            "json",
            "verify",
            "--json",
        ])
        .unwrap();
        assert_eq!(cli.global.storage_dir, Some(PathBuf::from("d")));
        assert_eq!(cli.global.log_format, Some(LogFormat::Json));
        assert!(matches!(
            cli.command,
            Some(Command::Verify { json: true, .. })
        ));
    }

    #[test]
    fn flags_alone_run_the_server() {
        let cli = parse(&["--listen", "127.0.0.1:5001", "--upstream", "http://x"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.global.overrides().upstream.as_deref(), Some("http://x"));
    }

    #[test]
    fn bad_size_flag_shows_the_accepted_forms() {
        let err = parse(&["--max-size", "lots"]).unwrap_err().to_string();
        assert!(
            err.contains(
                "invalid size \"lots\": expected a number with an optional unit, e.g. 500MiB, 20GiB, 2TiB"
            ),
            "{err}"
        );
        let err = parse(&["cache", "prune", "--to", "half"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid size \"half\""), "{err}");
    }

    #[test]
    fn warm_takes_images_a_file_a_mirror_and_platforms() {
        let cli = parse(&[
            "warm",
            "alpine:3.19",
            "ghcr.io/org/app:1.0",
            "--mirror",
            "http://127.0.0.1:5000",
            "--platform",
            "linux/amd64,linux/arm64/v8",
            "-f",
            "images.txt",
        ])
        .unwrap();
        let Some(Command::Warm(args)) = cli.command else {
            panic!("{:?}", cli.command);
        };
        assert_eq!(args.images.len(), 2);
        assert_eq!(args.images[1].registry(), "ghcr.io");
        assert_eq!(args.platform.len(), 2);
        assert_eq!(args.file, Some(PathBuf::from("images.txt")));
        assert_eq!(args.mirror.unwrap().as_str(), "http://127.0.0.1:5000/");
        let err = parse(&["warm", "Alpine"]).unwrap_err().to_string();
        assert!(err.contains("invalid image reference \"Alpine\""), "{err}");
        let err = parse(&["warm", "--platform", "amd64", "x"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("os/architecture"), "{err}");
    }

    #[test]
    fn purge_and_refresh_take_references_digests_and_a_mirror() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let cli = parse(&[
            "cache",
            "purge",
            "alpine:3.20",
            "ghcr.io/org/app",
            "--digest",
            &d,
            "--mirror",
            "http://127.0.0.1:5000",
        ])
        .unwrap();
        let Some(Command::Cache(CacheCommand::Purge(args))) = cli.command else {
            panic!("{:?}", cli.command);
        };
        assert_eq!(args.references.len(), 2);
        assert!(matches!(args.references[1], Subject::Repository { .. }));
        assert_eq!(args.digest[0].to_string(), d);
        assert!(args.mirror.mirror.is_some());
        assert!(parse(&["cache", "purge", "--digest", &d]).is_ok());
        assert!(parse(&["cache", "purge"]).is_err(), "something to purge");
        let err = parse(&["cache", "purge", "--digest", "sha256:12"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("sha256:12"), "{err}");
        let err = parse(&["cache", "refresh", &format!("alpine@{d}")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("never changes"), "{err}");
        assert!(parse(&["cache", "refresh", "alpine", "alpine:3.20"]).is_ok());
    }

    #[test]
    fn pin_takes_references_a_mirror_and_platforms() {
        let cli = parse(&[
            "cache",
            "pin",
            "alpine:3.20",
            "--platform",
            "linux/amd64",
            "--mirror",
            "http://127.0.0.1:5000",
        ])
        .unwrap();
        let Some(Command::Cache(CacheCommand::Pin(args))) = cli.command else {
            panic!("{:?}", cli.command);
        };
        assert_eq!(args.images[0].to_string(), "docker.io/library/alpine:3.20");
        assert_eq!(args.platform.len(), 1);
        assert!(args.mirror.is_some());
        assert!(
            parse(&["cache", "unpin"]).is_err(),
            "a reference is required"
        );
    }

    #[test]
    fn healthcheck_defaults_to_the_local_healthz() {
        let cli = parse(&["healthcheck"]).unwrap();
        match cli.command {
            Some(Command::Healthcheck { url, timeout }) => {
                assert_eq!(url, "http://127.0.0.1:5000/healthz");
                assert_eq!(timeout, Duration::from_secs(5));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn completions_are_generated_for_bash_zsh_and_fish() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            completions(shell, &mut out);
            let text = String::from_utf8(out).unwrap();
            for word in ["verify", "healthcheck", "storage-dir"] {
                assert!(text.contains(word), "{shell}: no {word} in\n{text}");
            }
        }
    }

    #[test]
    fn man_page_documents_every_command_and_global_flag() {
        let mut out = Vec::new();
        man(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with(".ie") || text.contains(".TH pullthrough"),
            "{text}"
        );
        for word in [
            "COMMAND: VERIFY",
            "COMMAND: CACHE PRUNE",
            "COMMAND: CACHE PURGE",
            "COMMAND: CACHE REFRESH",
            "COMMAND: CONFIG CHECK",
            "COMMAND: HEALTHCHECK",
            "COMMAND: WARM",
            "storage\\-dir",
            "repair",
        ] {
            assert!(text.contains(word), "no {word} in\n{text}");
        }
    }
}
