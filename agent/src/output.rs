//! What the CLI prints while a job runs: the job's lines on the stream cargo would use (program
//! output on stdout, cargo's human output on stderr), with cargo's colours when stdout is a
//! terminal (`--color` decides otherwise), progress bars (indicatif) for hashing, uploading and
//! build units on stderr when it is a terminal, and a summary at the end.
//!
//! Why a module: the embedded and remote modes print exactly the same way.

use std::io::{IsTerminal, Write};

use rba_executor::logstream::strip_ansi;

/// Whether cargo's colours reach stdout, as cargo's own `--color` flag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// Colours when stdout is a terminal and `NO_COLOR` is not set.
    #[default]
    Auto,
    /// Always keep cargo's colours.
    Always,
    /// Never: escape sequences are removed from every line.
    Never,
}

impl ColorChoice {
    /// Resolves `Auto` against this process's stdout and environment.
    pub fn keeps_colours(self) -> bool {
        match self {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::io::stdout().is_terminal()
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
            }
        }
    }
}

/// Whether rba's own status lines on stderr are coloured: `Auto` asks about stderr.
pub fn stderr_colours(color: ColorChoice) -> bool {
    match color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        }
    }
}

/// A cargo-style status line, `   Fetched target/debug/hello (1.2 MiB)`: the verb right-aligned
/// in 12 columns, bold green when `colours`.
pub fn status_line(colours: bool, verb: &str, rest: &str) -> String {
    if colours {
        format!("\x1b[1m\x1b[32m{verb:>12}\x1b[0m {rest}")
    } else {
        format!("{verb:>12} {rest}")
    }
}

/// Which of the client's streams a job's line goes to: as cargo does it, program output
/// (the test harness, a `run`'s stdout, rustfmt's diff) on stdout, cargo's own human output
/// and rba's messages on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineStream {
    /// The job's stdout.
    Stdout,
    /// The job's stderr, or a message of the node.
    Stderr,
}

impl LineStream {
    /// From the session protocol's `LogStreamKind` (`stream` field of a `LogLine`).
    pub fn from_wire(kind: i32) -> LineStream {
        if kind == rba_proto::rba::v1::LogStreamKind::Stdout as i32 {
            LineStream::Stdout
        } else {
            LineStream::Stderr
        }
    }

    /// From the executor's own kind (the embedded node).
    pub fn from_kind(kind: rba_executor::logstream::LogStreamKind) -> LineStream {
        match kind {
            rba_executor::logstream::LogStreamKind::Stdout => LineStream::Stdout,
            _ => LineStream::Stderr,
        }
    }
}

/// Prints a job's lines, with a progress bar of build units (indicatif) on stderr when it is a
/// terminal; lines are printed above the bar.
#[derive(Debug)]
pub struct Terminal {
    bar: indicatif::ProgressBar,
    stdout_colours: bool,
    stderr_colours: bool,
}

/// The style of every rba bar: `[=====>    ] 12/40 units`.
fn bar_style(template: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(template)
        .expect("a valid indicatif template")
        .progress_chars("=> ")
}

/// A bar on stderr, hidden when stderr is not a terminal (indicatif's rule), or always when
/// `interactive` is false.
pub fn stderr_bar(interactive: bool, template: &str) -> indicatif::ProgressBar {
    let bar = if interactive {
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr())
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(bar_style(template));
    bar
}

/// A counter of files hashed, for `rba build`'s hashing phase.
pub fn hashing_bar() -> indicatif::ProgressBar {
    let bar = stderr_bar(true, "{spinner} hashing {pos} files {elapsed}");
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    bar
}

/// Bytes uploaded of `total`, for the upload phase of `rba build --remote`.
pub fn upload_bar(total: u64) -> indicatif::ProgressBar {
    let bar = stderr_bar(
        true,
        "   uploading [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
    );
    bar.set_length(total);
    bar
}

impl Terminal {
    /// `interactive`: stderr is a terminal (draw the bar); `colours`: keep cargo's escape
    /// sequences in the lines.
    pub fn new(interactive: bool, colours: bool) -> Self {
        Terminal {
            bar: stderr_bar(interactive, "    building [{bar:30}] {pos}/{len} units"),
            stdout_colours: colours,
            stderr_colours: colours,
        }
    }

    /// For this process: the bar when stderr is a terminal, colours as `color` says for each
    /// stream (`auto`: when that stream is a terminal).
    pub fn for_stdio(color: ColorChoice) -> Self {
        Terminal {
            stdout_colours: color.keeps_colours(),
            stderr_colours: stderr_colours(color),
            ..Terminal::new(std::io::stderr().is_terminal(), false)
        }
    }

    /// Prints one of the job's lines on the stream cargo would have used.
    pub fn line(&mut self, stream: LineStream, line: &str) {
        let colours = match stream {
            LineStream::Stdout => self.stdout_colours,
            LineStream::Stderr => self.stderr_colours,
        };
        let text = if colours {
            std::borrow::Cow::Borrowed(line)
        } else {
            strip_ansi(line)
        };
        self.bar.suspend(|| {
            let _ = match stream {
                LineStream::Stdout => {
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{text}").and_then(|_| out.flush())
                }
                LineStream::Stderr => writeln!(std::io::stderr().lock(), "{text}"),
            };
        });
    }

    /// Updates the bar from cargo's JSON progress (units done / expected, 0: unknown).
    pub fn progress(&mut self, done: u32, total: u32) {
        self.bar.set_length(u64::from(total.max(done)));
        self.bar.set_position(u64::from(done));
    }

    /// Clears the bar before the summary.
    pub fn finish(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// The process exit code for a job: 0 on success, cargo's code when it has one, else 1.
pub fn exit_code(success: bool, code: i32) -> u8 {
    if success {
        0
    } else {
        u8::try_from(code).ok().filter(|c| *c != 0).unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_status_lines() {
        assert_eq!(exit_code(true, 0), 0);
        assert_eq!(exit_code(false, 101), 101);
        assert_eq!(exit_code(false, -1), 1);
        assert_eq!(exit_code(false, 0), 1);
        assert_eq!(
            status_line(false, "Fetched", "target/debug/hello (1.2 MiB)"),
            "     Fetched target/debug/hello (1.2 MiB)"
        );
        assert!(status_line(true, "Fetched", "x").starts_with("\x1b[1m\x1b[32m     Fetched"));
    }
}
