//! What the CLI prints while a job runs: cargo's own lines on stdout (with cargo's colours when
//! stdout is a terminal, `--color` decides otherwise), a progress bar on stderr when it is a
//! terminal, and a summary at the end.
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

/// Draws the progress bar and the summary; lines go through [`Terminal::line`].
#[derive(Debug)]
pub struct Terminal {
    interactive: bool,
    colours: bool,
    bar_shown: bool,
    last: (u32, u32),
}

impl Terminal {
    /// `interactive`: stderr is a terminal (draw the bar); `colours`: keep cargo's escape
    /// sequences in the lines.
    pub fn new(interactive: bool, colours: bool) -> Self {
        Terminal {
            interactive,
            colours,
            bar_shown: false,
            last: (u32::MAX, u32::MAX),
        }
    }

    /// For this process: the bar when stderr is a terminal, colours as `color` says.
    pub fn for_stdio(color: ColorChoice) -> Self {
        Terminal::new(std::io::stderr().is_terminal(), color.keeps_colours())
    }

    fn clear_bar(&mut self) {
        if self.bar_shown {
            eprint!("\r\x1b[2K");
            self.bar_shown = false;
        }
    }

    /// Prints one of cargo's lines on stdout.
    pub fn line(&mut self, line: &str) {
        self.clear_bar();
        let mut stdout = std::io::stdout().lock();
        if self.colours {
            let _ = writeln!(stdout, "{line}");
        } else {
            let _ = writeln!(stdout, "{}", strip_ansi(line));
        }
        let _ = stdout.flush();
        if self.interactive && self.last.0 != u32::MAX {
            self.draw(self.last.0, self.last.1);
        }
    }

    /// Updates the bar from cargo's JSON progress (units done / expected).
    pub fn progress(&mut self, done: u32, total: u32) {
        if !self.interactive || (done, total) == self.last {
            return;
        }
        self.last = (done, total);
        self.draw(done, total);
    }

    fn draw(&mut self, done: u32, total: u32) {
        eprint!("\r\x1b[2K{}", progress_bar(done, total, 30));
        self.bar_shown = true;
    }

    /// Clears the bar before the summary.
    pub fn finish(&mut self) {
        self.clear_bar();
    }
}

/// `[=========>          ] 12/40 units` (total 0: unknown).
pub fn progress_bar(done: u32, total: u32, width: usize) -> String {
    if total == 0 {
        return format!("[{}] {done}/? units", " ".repeat(width));
    }
    let filled = ((done.min(total) as usize) * width) / total as usize;
    let mut bar = "=".repeat(filled);
    if filled < width {
        bar.push('>');
        bar.push_str(&" ".repeat(width - filled - 1));
    }
    format!("[{bar}] {done}/{total} units")
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
    fn bars_and_codes() {
        assert_eq!(progress_bar(0, 4, 8), "[>       ] 0/4 units");
        assert_eq!(progress_bar(2, 4, 8), "[====>   ] 2/4 units");
        assert_eq!(progress_bar(4, 4, 8), "[========] 4/4 units");
        assert_eq!(progress_bar(9, 4, 8), "[========] 9/4 units");
        assert_eq!(progress_bar(3, 0, 2), "[  ] 3/? units");
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
