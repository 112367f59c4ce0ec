//! What the CLI prints while a job runs: cargo's own lines on stdout (colours kept, as cargo
//! rendered them), a progress bar on stderr when it is a terminal, and a summary at the end.
//!
//! Why a module: the embedded and remote modes print exactly the same way.

use std::io::Write;

/// Draws the progress bar and the summary; lines go through [`Terminal::line`].
#[derive(Debug)]
pub struct Terminal {
    interactive: bool,
    bar_shown: bool,
    last: (u32, u32),
}

impl Terminal {
    /// `interactive`: stderr is a terminal (draw the bar).
    pub fn new(interactive: bool) -> Self {
        Terminal {
            interactive,
            bar_shown: false,
            last: (u32::MAX, u32::MAX),
        }
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
        let _ = writeln!(stdout, "{line}");
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
    }
}
