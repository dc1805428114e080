//! Progress of `verify` on stderr: a bar on a terminal, otherwise a plain line every few
//! seconds (for logs of cron jobs and CI), so that stdout keeps only the report.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::HumanBytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::Progress;

/// How often a plain progress line is written when stderr is not a terminal.
pub const LINE_EVERY: Duration = Duration::from_secs(5);

pub enum Reporter {
    Bar(Option<ProgressBar>),
    Lines(Lines),
}

impl Reporter {
    /// A bar when stderr is a terminal, plain lines otherwise.
    pub fn for_stderr() -> Reporter {
        if std::io::stderr().is_terminal() {
            Reporter::Bar(None)
        } else {
            Reporter::Lines(Lines::new(Box::new(std::io::stderr()), LINE_EVERY))
        }
    }

    pub fn update(&mut self, p: &Progress) {
        match self {
            Reporter::Bar(bar) => {
                let bar = bar.get_or_insert_with(|| new_bar(p.bytes_total));
                bar.set_position(p.bytes_done.min(p.bytes_total));
                bar.set_message(format!("{}/{} files", p.files_done, p.files_total));
            }
            Reporter::Lines(lines) => lines.update_at(p, Instant::now()),
        }
    }

    /// Clears the bar, so that the report follows on a clean line.
    pub fn finish(&mut self) {
        if let Reporter::Bar(Some(bar)) = self {
            bar.finish_and_clear();
        }
    }
}

fn new_bar(bytes_total: u64) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "verify {bar:30.cyan/blue} {binary_bytes}/{binary_total_bytes} {msg} \
         ({binary_bytes_per_sec}, {eta} left)",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    ProgressBar::with_draw_target(Some(bytes_total), ProgressDrawTarget::stderr()).with_style(style)
}

/// Plain progress lines, at most one per `every`.
pub struct Lines {
    out: Box<dyn Write>,
    every: Duration,
    started: Option<Instant>,
    last: Option<Instant>,
}

impl Lines {
    pub fn new(out: Box<dyn Write>, every: Duration) -> Lines {
        Lines {
            out,
            every,
            started: None,
            last: None,
        }
    }

    /// Writes a line if `every` has passed since the last one (or since the start).
    pub fn update_at(&mut self, p: &Progress, now: Instant) {
        let since = *self.last.get_or_insert(now);
        let started = *self.started.get_or_insert(now);
        if now.duration_since(since) < self.every {
            return;
        }
        self.last = Some(now);
        let _ = writeln!(self.out, "{}", line(p, now.duration_since(started)));
    }
}

/// `verify: 120/5000 files, 1.2 GiB of 40.0 GiB (3%), 35 s`
fn line(p: &Progress, elapsed: Duration) -> String {
    let percent = if p.bytes_total == 0 {
        100
    } else {
        (p.bytes_done.min(p.bytes_total) as u128 * 100 / p.bytes_total as u128) as u64
    };
    format!(
        "verify: {}/{} files, {} of {} ({percent}%), {} s",
        p.files_done,
        p.files_total,
        HumanBytes(p.bytes_done),
        HumanBytes(p.bytes_total),
        elapsed.as_secs(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer whose bytes the test can read afterwards.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn plain_progress_is_one_line_per_interval() {
        let out = Shared::default();
        let mut lines = Lines::new(Box::new(out.clone()), Duration::from_secs(5));
        let t0 = Instant::now();
        let mut p = Progress {
            files_total: 4,
            bytes_total: 4096,
            ..Progress::default()
        };
        lines.update_at(&p, t0);
        p.files_done = 1;
        p.bytes_done = 1024;
        lines.update_at(&p, t0 + Duration::from_secs(2));
        assert!(out.0.lock().unwrap().is_empty(), "nothing before 5 s");
        p.files_done = 2;
        p.bytes_done = 2048;
        lines.update_at(&p, t0 + Duration::from_secs(6));
        lines.update_at(&p, t0 + Duration::from_secs(7));
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.starts_with("verify: 2/4 files, "), "{text}");
        assert!(text.contains("(50%), 6 s"), "{text}");
    }

    #[test]
    fn an_empty_cache_is_complete() {
        assert!(line(&Progress::default(), Duration::ZERO).contains("(100%)"));
    }
}
