//! How the binaries log: one place for the format both `cache-server` and `rba` use.
//!
//! Why: operators feed logs to collectors that want one JSON object per line (`--log-format
//! json`, or `RBA_LOG_FORMAT=json`), people at a terminal want text; the filter is
//! tracing-subscriber's (`RBA_LOG`). Logs go to stderr: stdout belongs to the program's own
//! output (`rba build` prints cargo's there).

use tracing_subscriber::EnvFilter;

/// The log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

/// Installs the global subscriber writing to stderr.
pub fn init(filter: EnvFilter, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
