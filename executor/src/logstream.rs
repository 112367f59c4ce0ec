//! The one log model of a job: an append-only, dense sequence of lines that every transport
//! reads (libp2p sessions, WebSocket, REAPI ByteStream live stdout), stored as one CAS blob at
//! the end.
//!
//! # Why
//!
//! A build can print millions of lines, several clients may watch it live, a client may attach
//! late (or reconnect) and ask for the log from any line, and the log must survive as a blob that
//! the job's end event and the REAPI `ActionResult` point to. This module is the only place that
//! knows how lines are kept; transports only subscribe.
//!
//! # Contract
//!
//! - Lines are numbered from 0 with no gaps ([`LogLine::seq`]). Every reader sees each line at
//!   most once, in order, starting from the sequence number it asked for (past lines are read
//!   back; lines not yet written are waited for).
//! - Memory is bounded, whatever the number of lines: the [`LogWriter`] appends every line to a
//!   spill file on disk and an index file of 8 bytes per line; RAM holds only a ring of the most
//!   recent lines (bounded by [`LogConfig::ring_lines`] and [`LogConfig::ring_bytes`]). Readers
//!   behind the ring read the spill file with their own file handles, in batches, on tokio's
//!   blocking pool.
//! - The writer is never blocked by readers: readers hold the state lock only to copy lines out
//!   of the ring, never during I/O or while waiting, and a reader that stops reading holds
//!   nothing at all. [`LogWriter::push`] is synchronous and cheap (buffered writes to local
//!   files), so it may be called from async code.
//! - Size cap: once the text of the lines (each line's bytes plus one for its newline) would
//!   exceed [`LogConfig::max_bytes`], a single [`LogStreamKind::System`] line
//!   ([`TRUNCATION_NOTICE`] …) is appended and every further line is dropped (and counted in
//!   [`LogEnd::dropped_lines`]).
//! - The end is observable: when the writer finishes (or is dropped without finishing), every
//!   reader's `next()` returns `None` after the last line and [`LogReader::end`] /
//!   [`LogStream::end`] tell how the stream closed ([`LogClose`]) and, when stored, the digests.
//! - [`LogWriter::finish`] stores three blobs and returns their digests ([`LogDigests`]):
//!   - `log`: the whole log as JSON lines, one record per line, in sequence order:
//!     `{"seq":0,"stream":"stdout","line":"text"}` followed by `\n` (`stream` is `stdout`,
//!     `stderr` or `system`; `line` is the text without its terminator, JSON-escaped, so a
//!     record never spans two lines of the blob). [`parse_log_blob`] reads it back.
//!   - `stdout` and `stderr`: the raw bytes of the stdout (resp. stderr) lines, each followed by
//!     `\n`, for the REAPI `ActionResult.stdout_digest` / `stderr_digest`. System lines appear
//!     only in `log`; dropped lines appear nowhere.
//! - [`LogWriter::push`] takes one line without its terminator; a trailing `\n` (or `\r\n`) is
//!   removed. Embedded newlines are kept as they are (the JSON record escapes them). Logs are
//!   shown to other people (session watchers, the Tangle caller, whoever reads a shared
//!   result): every line loses its terminal control sequences except colours
//!   ([`sanitize_terminal`]) before it is numbered, so no transport ever sees them.
//! - The spill files live in a fresh directory under the directory given to [`LogStream::new`];
//!   it is removed when the writer and the last handle and reader are dropped.
//!
//! No registry of streams here: a job's stream is its handle's ([`crate::runner::JobHandle`]),
//! found through the executor's one registry of jobs.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use rba_cas::{BlobStore, CasError, Digest, DigestFunction};
use tokio::sync::Notify;

/// The text of the System line appended when the size cap is reached (followed by details).
pub const TRUNCATION_NOTICE: &str = "log truncated";

/// Lines read from the spill file per batch, at most.
const DISK_BATCH_LINES: u64 = 512;
/// Bytes read from the spill file per batch, at most (a single longer line is still read whole).
const DISK_BATCH_BYTES: u64 = 1 << 20;
/// Lines copied out of the ring per lock acquisition, at most.
const RING_BATCH_LINES: usize = 64;

/// Which output a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogStreamKind {
    /// The job's standard output.
    Stdout,
    /// The job's standard error.
    Stderr,
    /// A message of the executor itself (queueing, cache hit, truncation, exit status…).
    System,
}

impl LogStreamKind {
    /// Lowercase name as used in the log blob: `stdout`, `stderr` or `system`.
    pub fn name(self) -> &'static str {
        match self {
            LogStreamKind::Stdout => "stdout",
            LogStreamKind::Stderr => "stderr",
            LogStreamKind::System => "system",
        }
    }

    /// Parses a name produced by [`LogStreamKind::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "stdout" => Some(LogStreamKind::Stdout),
            "stderr" => Some(LogStreamKind::Stderr),
            "system" => Some(LogStreamKind::System),
            _ => None,
        }
    }

    /// The session protocol's enum.
    pub fn to_proto(self) -> rba_proto::rba::v1::LogStreamKind {
        use rba_proto::rba::v1::LogStreamKind as P;
        match self {
            LogStreamKind::Stdout => P::Stdout,
            LogStreamKind::Stderr => P::Stderr,
            LogStreamKind::System => P::System,
        }
    }

    /// From the session protocol's enum.
    pub fn from_proto(kind: rba_proto::rba::v1::LogStreamKind) -> Self {
        use rba_proto::rba::v1::LogStreamKind as P;
        match kind {
            P::Stdout => LogStreamKind::Stdout,
            P::Stderr => LogStreamKind::Stderr,
            P::System => LogStreamKind::System,
        }
    }
}

/// One line of a job's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// Position in the log: 0 for the first line, no gaps.
    pub seq: u64,
    /// Where the line came from.
    pub stream: LogStreamKind,
    /// The text, without its line terminator (ANSI colour codes kept).
    pub line: String,
}

impl LogLine {
    /// The session protocol's message.
    pub fn to_proto(&self) -> rba_proto::rba::v1::LogLine {
        rba_proto::rba::v1::LogLine {
            seq: self.seq,
            stream: self.stream.to_proto() as i32,
            line: self.line.clone(),
        }
    }
}

/// One record of the log blob and the spill file.
#[derive(serde::Serialize)]
struct RecordRef<'a> {
    seq: u64,
    stream: &'static str,
    line: &'a str,
}

#[derive(serde::Deserialize)]
struct RecordOwned {
    seq: u64,
    stream: String,
    line: String,
}

fn parse_record(bytes: &[u8]) -> io::Result<LogLine> {
    let record: RecordOwned = serde_json::from_slice(bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("log record: {e}")))?;
    let stream = LogStreamKind::from_name(&record.stream).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("log record: unknown stream {:?}", record.stream),
        )
    })?;
    Ok(LogLine {
        seq: record.seq,
        stream,
        line: record.line,
    })
}

/// Parses a log blob written by [`LogWriter::finish`] (JSON lines) back into lines.
pub fn parse_log_blob(bytes: &[u8]) -> io::Result<Vec<LogLine>> {
    bytes
        .split(|&b| b == b'\n')
        .filter(|record| !record.is_empty())
        .map(parse_record)
        .collect()
}

/// A log line without its terminal escape sequences (colours, cursor moves, OSC hyperlinks)
/// and control characters, for readers that print to something that is not a terminal. Cargo
/// runs with `--color always` so that terminals get colours; files and pipes should not.
pub fn strip_ansi(line: &str) -> std::borrow::Cow<'_, str> {
    filter_terminal_controls(line, false)
}

/// A line as it may be shown on another person's terminal: colours (SGR, `ESC[…m`) are kept,
/// every other control sequence is removed: cursor movement and screen clearing (other CSI),
/// OSC (window titles, hyperlinks, clipboard writes), DCS/SOS/PM/APC strings, two-character
/// escapes, C1 controls and bare control characters other than tab and newline (a newline only
/// starts a new line, which every viewer does anyway; embedded newlines are part of
/// [`LogWriter::push`]'s contract). [`LogWriter::push`] applies it to every line, so every
/// reader (libp2p, WebSocket, HTTP, ByteStream, the stored blob and its replay) gets the same
/// sanitised text.
pub fn sanitize_terminal(line: &str) -> std::borrow::Cow<'_, str> {
    filter_terminal_controls(line, true)
}

/// The one scanner behind [`strip_ansi`] and [`sanitize_terminal`] (ECMA-48 syntax): drops
/// every control sequence and control character except tab and newline, and keeps SGR colour
/// sequences when `keep_colours`.
fn filter_terminal_controls(line: &str, keep_colours: bool) -> std::borrow::Cow<'_, str> {
    let is_dropped_control = |c: char| (c.is_control() && c != '\t' && c != '\n') || c == '\u{1b}';
    if !line.chars().any(is_dropped_control) {
        return std::borrow::Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len());
    let mut chars = line.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        if c != '\u{1b}' {
            if !is_dropped_control(c) {
                out.push(c);
            }
            continue;
        }
        match chars.next().map(|(_, c)| c) {
            // CSI: parameters and intermediates, then one final byte in @..~. Kept only when
            // it is SGR (digits, `;` and `:` then `m`) and colours are kept.
            Some('[') => {
                let mut sgr = true;
                let mut end = None;
                for (i, c) in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        sgr &= c == 'm';
                        end = Some(i + c.len_utf8());
                        break;
                    }
                    sgr &= c.is_ascii_digit() || c == ';' || c == ':';
                }
                if let (true, true, Some(end)) = (keep_colours, sgr, end) {
                    out.push_str(&line[start..end]);
                }
            }
            // OSC (hyperlinks, titles) up to BEL or ST; DCS, SOS, PM, APC up to ST.
            Some(kind @ (']' | 'P' | 'X' | '^' | '_')) => {
                while let Some((_, c)) = chars.next() {
                    if (c == '\u{7}' && kind == ']') || c == '\u{9c}' {
                        break;
                    }
                    if c == '\u{1b}' && chars.peek().is_some_and(|&(_, c)| c == '\\') {
                        chars.next();
                        break;
                    }
                }
            }
            // Other escapes (ESC c, ESC 7, ESC ( B, …): intermediates, then a final byte.
            Some(c) if (' '..='/').contains(&c) => {
                while chars.next_if(|&(_, c)| (' '..='/').contains(&c)).is_some() {}
                chars.next();
            }
            _ => {}
        }
    }
    // Only ever removes: the same length means nothing was (colours only), no copy kept.
    if out.len() == line.len() {
        return std::borrow::Cow::Borrowed(line);
    }
    std::borrow::Cow::Owned(out)
}

/// Limits of one log stream.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// Cap on the text of the log (each line's bytes plus one); past it lines are dropped.
    pub max_bytes: u64,
    /// Most recent lines kept in RAM, at most (at least 1).
    pub ring_lines: usize,
    /// Bytes of recent lines kept in RAM, at most (the newest line is always kept).
    pub ring_bytes: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            max_bytes: 64 << 20,
            ring_lines: 4096,
            ring_bytes: 4 << 20,
        }
    }
}

/// The digests of the blobs [`LogWriter::finish`] stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogDigests {
    /// The whole log as JSON lines (see the module documentation).
    pub log: Digest,
    /// The raw stdout lines, for `ActionResult.stdout_digest`.
    pub stdout: Digest,
    /// The raw stderr lines, for `ActionResult.stderr_digest`.
    pub stderr: Digest,
}

/// How a stream closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogClose {
    /// [`LogWriter::finish`] stored the log; here are its blobs.
    Finished(LogDigests),
    /// [`LogWriter::finish`] could not store the log (the lines are still readable).
    Failed(String),
    /// The writer was dropped without `finish` (e.g. the job was cancelled or panicked).
    Abandoned,
}

/// The final record of a stream, seen by every reader once the last line is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEnd {
    /// Number of lines in the log (the last line's `seq` + 1), the truncation notice included.
    pub lines: u64,
    /// True when the size cap was reached.
    pub truncated: bool,
    /// Lines pushed after the cap and dropped.
    pub dropped_lines: u64,
    /// How the stream closed.
    pub close: LogClose,
}

struct State {
    /// The most recent lines, in order; `ring[0].seq` is the oldest line still in RAM.
    ring: VecDeque<LogLine>,
    /// Sum of the capacities of the strings in `ring`.
    ring_bytes: usize,
    /// Lines written so far (the next line's `seq`).
    written: u64,
    /// Lines `[0, durable)` are in the spill files as far as other file handles can see.
    durable: u64,
    end: Option<LogEnd>,
    ended_at: Option<Instant>,
}

struct Shared {
    config: LogConfig,
    data_path: PathBuf,
    index_path: PathBuf,
    state: Mutex<State>,
    notify: Notify,
    // Last, so the directory is removed after everything else of the stream is gone.
    dir: tempfile::TempDir,
}

/// A handle on a log stream, for readers. Cheap to clone.
#[derive(Clone)]
pub struct LogStream {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LogStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStream")
            .field("dir", &self.shared.dir.path())
            .field("lines_written", &self.lines_written())
            .field("finished", &self.is_finished())
            .finish()
    }
}

/// The single writer of a log stream (the job).
pub struct LogWriter {
    shared: Arc<Shared>,
    data: BufWriter<File>,
    index: BufWriter<File>,
    stdout: BufWriter<File>,
    stderr: BufWriter<File>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    next_seq: u64,
    data_len: u64,
    text_bytes: u64,
    truncated: bool,
    dropped: u64,
    /// The first spill-file error; later lines are dropped (they stay readable only from RAM).
    io_error: Option<io::Error>,
    closed: bool,
}

impl std::fmt::Debug for LogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWriter")
            .field("dir", &self.shared.dir.path())
            .field("next_seq", &self.next_seq)
            .field("truncated", &self.truncated)
            .finish()
    }
}

fn create(path: &Path) -> io::Result<BufWriter<File>> {
    Ok(BufWriter::with_capacity(64 << 10, File::create(path)?))
}

impl LogStream {
    /// Creates a stream with default limits, spilling to a fresh directory under `dir`.
    pub fn new(dir: impl AsRef<Path>) -> io::Result<(LogWriter, LogStream)> {
        LogStream::with_config(dir, LogConfig::default())
    }

    /// Creates a stream with the given limits, spilling to a fresh directory under `dir`.
    pub fn with_config(
        dir: impl AsRef<Path>,
        mut config: LogConfig,
    ) -> io::Result<(LogWriter, LogStream)> {
        config.ring_lines = config.ring_lines.max(1);
        std::fs::create_dir_all(dir.as_ref())?;
        let dir = tempfile::Builder::new()
            .prefix("log-")
            .tempdir_in(dir.as_ref())?;
        let data_path = dir.path().join("log.jsonl");
        let index_path = dir.path().join("log.index");
        let stdout_path = dir.path().join("stdout");
        let stderr_path = dir.path().join("stderr");
        let data = create(&data_path)?;
        let index = create(&index_path)?;
        let stdout = create(&stdout_path)?;
        let stderr = create(&stderr_path)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                ring: VecDeque::new(),
                ring_bytes: 0,
                written: 0,
                durable: 0,
                end: None,
                ended_at: None,
            }),
            config,
            data_path,
            index_path,
            notify: Notify::new(),
            dir,
        });
        let writer = LogWriter {
            shared: shared.clone(),
            data,
            index,
            stdout,
            stderr,
            stdout_path,
            stderr_path,
            next_seq: 0,
            data_len: 0,
            text_bytes: 0,
            truncated: false,
            dropped: 0,
            io_error: None,
            closed: false,
        };
        Ok((writer, LogStream { shared }))
    }

    /// A reader starting at line `from_seq` (which may be past the last line written so far).
    pub fn subscribe(&self, from_seq: u64) -> LogReader {
        LogReader {
            shared: self.shared.clone(),
            next: from_seq,
            buffer: VecDeque::new(),
            error: None,
        }
    }

    /// The lines from `from_seq` on as a `Stream`, ending when the log is finished.
    pub fn lines(&self, from_seq: u64) -> impl futures::Stream<Item = LogLine> + Send + 'static {
        self.subscribe(from_seq).into_stream()
    }

    /// Number of lines written so far.
    pub fn lines_written(&self) -> u64 {
        self.shared.state.lock().written
    }

    /// True once the writer finished or was dropped: no line will be added.
    pub fn is_finished(&self) -> bool {
        self.shared.state.lock().end.is_some()
    }

    /// The final record, once the stream is finished.
    pub fn end(&self) -> Option<LogEnd> {
        self.shared.state.lock().end.clone()
    }

    /// When the stream finished (the executor forgets a job some time after).
    pub fn finished_at(&self) -> Option<Instant> {
        self.shared.state.lock().ended_at
    }

    /// Waits until the stream is finished and returns its final record.
    pub async fn wait_finished(&self) -> LogEnd {
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(end) = self.end() {
                return end;
            }
            notified.await;
        }
    }

    /// Approximate bytes of RAM held by the stream's in-memory structures (the ring of recent
    /// lines and the bookkeeping), independent of how many lines were written.
    pub fn memory_footprint(&self) -> usize {
        let state = self.shared.state.lock();
        std::mem::size_of::<Shared>()
            + state.ring.capacity() * std::mem::size_of::<LogLine>()
            + state.ring_bytes
    }

    /// The directory holding the spill files.
    pub fn spill_dir(&self) -> &Path {
        self.shared.dir.path()
    }

    /// The stream's limits.
    pub fn config(&self) -> &LogConfig {
        &self.shared.config
    }
}

impl LogWriter {
    /// A reader handle on this writer's stream.
    pub fn stream(&self) -> LogStream {
        LogStream {
            shared: self.shared.clone(),
        }
    }

    /// Lines pushed so far (the next line's `seq`).
    pub fn lines_written(&self) -> u64 {
        self.next_seq
    }

    /// True once the size cap was reached (or the spill file failed) and lines are dropped.
    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    /// Appends a line and returns its sequence number, or `None` when the line is dropped
    /// because the size cap was reached. A trailing `\n` or `\r\n` is removed, then terminal
    /// control sequences other than colours ([`sanitize_terminal`]).
    ///
    /// Never waits for readers; does buffered writes to local spill files.
    pub fn push(&mut self, stream: LogStreamKind, line: impl Into<String>) -> Option<u64> {
        let mut line = line.into();
        if line.ends_with('\n') {
            line.pop();
            if line.ends_with('\r') {
                line.pop();
            }
        }
        if let std::borrow::Cow::Owned(clean) = sanitize_terminal(&line) {
            line = clean;
        }
        if self.truncated || self.closed {
            self.dropped += 1;
            return None;
        }
        let cost = line.len() as u64 + 1;
        if self.text_bytes + cost > self.shared.config.max_bytes {
            self.truncated = true;
            self.dropped += 1;
            let notice = format!(
                "{TRUNCATION_NOTICE}: the log reached its limit of {} bytes; further lines are dropped",
                self.shared.config.max_bytes
            );
            self.append(LogStreamKind::System, notice);
            return None;
        }
        self.text_bytes += cost;
        Some(self.append(stream, line))
    }

    fn append(&mut self, stream: LogStreamKind, line: String) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.io_error.is_none()
            && let Err(e) = self.spill(seq, stream, &line)
        {
            tracing::warn!(error = %e, dir = ?self.shared.dir.path(), "log spill failed; dropping further lines");
            self.io_error = Some(e);
            self.truncated = true;
        }
        let shared = self.shared.clone();
        let mut state = shared.state.lock();
        state.ring_bytes += line.capacity();
        state.ring.push_back(LogLine { seq, stream, line });
        state.written = self.next_seq;
        let config = &shared.config;
        while state.ring.len() > config.ring_lines
            || (state.ring_bytes > config.ring_bytes && state.ring.len() > 1)
        {
            let front = state.ring.front().map(|l| l.seq).unwrap_or(u64::MAX);
            if front >= state.durable {
                if self.io_error.is_some() {
                    // The spill file is broken: keep the lines in RAM rather than lose them.
                    break;
                }
                if let Err(e) = self.data.flush().and_then(|()| self.index.flush()) {
                    tracing::warn!(error = %e, "log spill flush failed; dropping further lines");
                    self.io_error = Some(e);
                    self.truncated = true;
                    break;
                }
                state.durable = state.written;
            }
            if let Some(old) = state.ring.pop_front() {
                state.ring_bytes -= old.line.capacity();
            }
        }
        drop(state);
        shared.notify.notify_waiters();
        seq
    }

    fn spill(&mut self, seq: u64, stream: LogStreamKind, line: &str) -> io::Result<()> {
        let mut record = serde_json::to_vec(&RecordRef {
            seq,
            stream: stream.name(),
            line,
        })?;
        record.push(b'\n');
        self.data.write_all(&record)?;
        self.data_len += record.len() as u64;
        // The index holds each record's end offset: record s spans [end(s-1), end(s)).
        self.index.write_all(&self.data_len.to_le_bytes())?;
        let raw = match stream {
            LogStreamKind::Stdout => Some(&mut self.stdout),
            LogStreamKind::Stderr => Some(&mut self.stderr),
            LogStreamKind::System => None,
        };
        if let Some(raw) = raw {
            raw.write_all(line.as_bytes())?;
            raw.write_all(b"\n")?;
        }
        Ok(())
    }

    fn flush_all(&mut self) -> io::Result<()> {
        if let Some(e) = &self.io_error {
            return Err(io::Error::new(
                e.kind(),
                format!("log spill failed earlier: {e}"),
            ));
        }
        self.data.flush()?;
        self.index.flush()?;
        self.stdout.flush()?;
        self.stderr.flush()
    }

    fn close(&mut self, close: LogClose) {
        self.closed = true;
        let mut state = self.shared.state.lock();
        if state.end.is_none() {
            state.end = Some(LogEnd {
                lines: self.next_seq,
                truncated: self.truncated,
                dropped_lines: self.dropped,
                close,
            });
            state.ended_at = Some(Instant::now());
        }
        drop(state);
        self.shared.notify.notify_waiters();
    }

    /// Stores the log, stdout and stderr blobs, closes the stream and returns the digests.
    ///
    /// Blocking (it hashes and copies the spill files into the store): from async code use
    /// [`LogWriter::finish_async`]. Readers see the end (with the digests, or
    /// [`LogClose::Failed`]) once the blobs are stored.
    pub fn finish(
        mut self,
        blobs: &BlobStore,
        function: DigestFunction,
    ) -> Result<LogDigests, CasError> {
        let result = self.store(blobs, function);
        match &result {
            Ok(digests) => self.close(LogClose::Finished(*digests)),
            Err(e) => self.close(LogClose::Failed(e.to_string())),
        }
        result
    }

    /// [`LogWriter::finish`] on tokio's blocking pool.
    pub async fn finish_async(
        self,
        blobs: BlobStore,
        function: DigestFunction,
    ) -> Result<LogDigests, CasError> {
        let dir = self.shared.dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || self.finish(&blobs, function))
            .await
            .map_err(|e| CasError::io("storing the log of", dir, io::Error::other(e.to_string())))?
    }

    fn store(
        &mut self,
        blobs: &BlobStore,
        function: DigestFunction,
    ) -> Result<LogDigests, CasError> {
        self.flush_all()
            .map_err(|e| CasError::io("writing", self.shared.dir.path(), e))?;
        self.shared.state.lock().durable = self.next_seq;
        // The three blobs are made durable together (one group commit).
        let mut staged = Vec::with_capacity(3);
        for path in [&self.shared.data_path, &self.stdout_path, &self.stderr_path] {
            let mut file =
                std::fs::File::open(path).map_err(|e| CasError::io("opening", path, e))?;
            staged.push(blobs.stage_open_file(function, &mut file, path)?);
        }
        let mut published = blobs.publish(staged).into_iter();
        let mut next = || published.next().expect("one result per staged blob");
        Ok(LogDigests {
            log: next()?,
            stdout: next()?,
            stderr: next()?,
        })
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        if !self.closed {
            // Not needed for readers (lines outside the ring are already durable), but cheap.
            let _ = self.flush_all();
            if self.io_error.is_none() {
                self.shared.state.lock().durable = self.next_seq;
            }
            self.close(LogClose::Abandoned);
        }
    }
}

/// A reader of a log stream, from a given line on. Holds no lock between calls.
pub struct LogReader {
    shared: Arc<Shared>,
    next: u64,
    buffer: VecDeque<LogLine>,
    error: Option<String>,
}

impl std::fmt::Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader")
            .field("next", &self.next)
            .finish()
    }
}

enum Step {
    Ready,
    Disk { from: u64, upto: u64 },
    Done,
    Wait,
}

impl LogReader {
    /// The sequence number of the next line this reader returns.
    pub fn position(&self) -> u64 {
        self.buffer.front().map(|l| l.seq).unwrap_or(self.next)
    }

    /// The next line, waiting for it if it is not written yet; `None` once the stream is
    /// finished and every line from the start position on was returned (or the spill file
    /// could not be read: see [`LogReader::error`]).
    pub async fn next(&mut self) -> Option<LogLine> {
        loop {
            if let Some(line) = self.buffer.pop_front() {
                return Some(line);
            }
            if self.error.is_some() {
                return None;
            }
            // Registered before looking at the state, so a push in between is not missed.
            let shared = self.shared.clone();
            let notified = shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.step() {
                Step::Ready => continue,
                Step::Done => return None,
                Step::Wait => notified.await,
                Step::Disk { from, upto } => {
                    let data = self.shared.data_path.clone();
                    let index = self.shared.index_path.clone();
                    let read = tokio::task::spawn_blocking(move || {
                        read_spilled(&data, &index, from, upto)
                    })
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))
                    .and_then(|r| r);
                    match read {
                        Ok(lines) => {
                            self.next = from + lines.len() as u64;
                            self.buffer.extend(lines);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "reading a log spill file failed");
                            self.error = Some(e.to_string());
                            return None;
                        }
                    }
                }
            }
        }
    }

    /// Looks at the shared state: copies lines from the ring, or says what to do.
    fn step(&mut self) -> Step {
        let state = self.shared.state.lock();
        if self.next >= state.written {
            return if state.end.is_some() {
                Step::Done
            } else {
                Step::Wait
            };
        }
        let front = state.ring.front().map(|l| l.seq).unwrap_or(state.written);
        if self.next < front {
            return Step::Disk {
                from: self.next,
                upto: front.min(self.next + DISK_BATCH_LINES),
            };
        }
        let start = (self.next - front) as usize;
        self.buffer
            .extend(state.ring.range(start..).take(RING_BATCH_LINES).cloned());
        self.next += self.buffer.len() as u64;
        Step::Ready
    }

    /// The final record, once `next()` returned `None` because the stream finished.
    pub fn end(&self) -> Option<LogEnd> {
        if self.error.is_some() {
            return None;
        }
        self.shared.state.lock().end.clone()
    }

    /// Why the reader stopped early, if reading the spill file failed.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// This reader as a `Stream` of lines.
    pub fn into_stream(self) -> impl futures::Stream<Item = LogLine> + Send + 'static {
        futures::stream::unfold(self, |mut reader| async move {
            reader.next().await.map(|line| (line, reader))
        })
    }
}

/// Reads lines `[from, upto)` from the spill files (all of them durable), at most
/// [`DISK_BATCH_BYTES`] of records unless the first alone is longer.
fn read_spilled(
    data_path: &Path,
    index_path: &Path,
    from: u64,
    upto: u64,
) -> io::Result<Vec<LogLine>> {
    let index = File::open(index_path)?;
    let data = File::open(data_path)?;
    let start = if from == 0 {
        0
    } else {
        let mut end = [0u8; 8];
        index.read_exact_at(&mut end, (from - 1) * 8)?;
        u64::from_le_bytes(end)
    };
    let mut ends = vec![0u8; ((upto - from) * 8) as usize];
    index.read_exact_at(&mut ends, from * 8)?;
    let mut stop = start;
    for chunk in ends.chunks_exact(8) {
        let end = u64::from_le_bytes(chunk.try_into().expect("8-byte chunk"));
        if end - start > DISK_BATCH_BYTES && stop > start {
            break;
        }
        stop = end;
    }
    let mut bytes = vec![0u8; (stop - start) as usize];
    data.read_exact_at(&mut bytes, start)?;
    let lines = parse_log_blob(&bytes)?;
    for (expected, line) in (from..).zip(&lines) {
        if line.seq != expected {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "log spill file out of order: expected line {expected}, found {}",
                    line.seq
                ),
            ));
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    fn store() -> (tempfile::TempDir, BlobStore) {
        BlobStore::scratch().unwrap()
    }

    #[test]
    fn strip_ansi_removes_colours_and_hyperlinks_only() {
        assert_eq!(strip_ansi("plain text"), "plain text");
        assert!(matches!(strip_ansi("plain"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(
            strip_ansi("\u{1b}[1m\u{1b}[32m   Compiling\u{1b}[0m foo v0.1.0"),
            "   Compiling foo v0.1.0"
        );
        assert_eq!(
            strip_ansi("see \u{1b}]8;;https://x.test/a\u{1b}\\docs\u{1b}]8;;\u{1b}\\ now"),
            "see docs now"
        );
        assert_eq!(strip_ansi("bell \u{1b}]0;title\u{7}end"), "bell end");
        assert_eq!(strip_ansi("trailing \u{1b}["), "trailing ");
        assert_eq!(strip_ansi("ünïcödé \u{1b}[31mred\u{1b}[m"), "ünïcödé red");
    }

    #[test]
    fn sanitize_keeps_colours_and_drops_every_other_control() {
        assert!(matches!(
            sanitize_terminal("plain\ttext \u{1b}[1;32mok\u{1b}[0m"),
            std::borrow::Cow::Borrowed(_)
        ));
        for (hostile, shown) in [
            ("\u{1b}[2J\u{1b}[Hcleared", "cleared"),
            ("\u{1b}]0;title\u{7}a\u{1b}]52;c;ZXZpbA==\u{1b}\\b", "ab"),
            ("\u{1b}P+q544e\u{1b}\\dcs", "dcs"),
            (
                "\u{1b}[?1049h\u{1b}[38;2;1;2;3mrgb",
                "\u{1b}[38;2;1;2;3mrgb",
            ),
            ("over\rwrite\u{8}\u{7}\u{0}\u{7f}", "overwrite"),
            ("\u{9b}2Jc1\u{1b}(Bcharset\u{1b}cx", "2Jc1charsetx"),
            ("\u{1b}[31mred\u{1b}[", "\u{1b}[31mred"),
        ] {
            assert_eq!(sanitize_terminal(hostile), shown, "{hostile:?}");
        }
        assert_eq!(strip_ansi("\u{1b}[31mred\u{1b}[2J\r"), "red");
    }

    #[tokio::test]
    async fn readers_and_the_stored_blob_get_sanitised_lines() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, stream) = LogStream::with_config(dir.path(), small_ring()).unwrap();
        writer.push(
            LogStreamKind::Stdout,
            "\u{1b}[2J\u{1b}]0;title\u{7}\u{1b}[31merror\u{1b}[0m: x\n",
        );
        let (_store_dir, blobs) = store();
        let digests = writer.finish(&blobs, DigestFunction::Sha256).unwrap();
        let lines = collect(stream.subscribe(0)).await;
        assert_eq!(lines[0].line, "\u{1b}[31merror\u{1b}[0m: x");
        let stored = parse_log_blob(&blobs.read_to_vec(&digests.log, 1 << 20).unwrap()).unwrap();
        assert_eq!(stored[0].line, lines[0].line);
    }

    fn small_ring() -> LogConfig {
        LogConfig {
            max_bytes: 1 << 30,
            ring_lines: 16,
            ring_bytes: 1 << 10,
        }
    }

    fn kind_of(i: u64) -> LogStreamKind {
        if i.is_multiple_of(3) {
            LogStreamKind::Stderr
        } else {
            LogStreamKind::Stdout
        }
    }

    async fn collect(mut reader: LogReader) -> Vec<LogLine> {
        let mut lines = Vec::new();
        while let Some(line) = reader.next().await {
            lines.push(line);
        }
        lines
    }

    fn check_dense(lines: &[LogLine], from: u64, to: u64) {
        assert_eq!(lines.len() as u64, to - from);
        for (expected, line) in (from..to).zip(lines) {
            assert_eq!(line.seq, expected);
            assert_eq!(line.line, format!("line {expected}"));
            assert_eq!(line.stream, kind_of(expected));
        }
    }

    #[tokio::test]
    async fn readers_from_start_and_middle_see_each_line_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, stream) = LogStream::with_config(dir.path(), small_ring()).unwrap();
        for i in 0..500 {
            assert_eq!(writer.push(kind_of(i), format!("line {i}\n")), Some(i));
        }
        // Started while lines are still coming: from 0 (on disk), from the middle, from the future.
        let from_start = tokio::spawn(collect(stream.subscribe(0)));
        let from_middle = tokio::spawn(collect(stream.subscribe(250)));
        let from_future = tokio::spawn(collect(stream.subscribe(900)));
        for i in 500..1000 {
            writer.push(kind_of(i), format!("line {i}"));
            if i % 100 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let (_store_dir, blobs) = store();
        writer.finish(&blobs, DigestFunction::Sha256).unwrap();
        check_dense(&from_start.await.unwrap(), 0, 1000);
        check_dense(&from_middle.await.unwrap(), 250, 1000);
        check_dense(&from_future.await.unwrap(), 900, 1000);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_readers_while_writing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, stream) = LogStream::with_config(dir.path(), small_ring()).unwrap();
        let readers: Vec<_> = (0..8)
            .map(|r| tokio::spawn(collect(stream.subscribe(r * 100))))
            .collect();
        let producer = tokio::task::spawn_blocking(move || {
            for i in 0..20_000 {
                writer.push(kind_of(i), format!("line {i}"));
            }
            writer
        });
        let writer = producer.await.unwrap();
        drop(writer);
        for (r, reader) in readers.into_iter().enumerate() {
            check_dense(&reader.await.unwrap(), r as u64 * 100, 20_000);
        }
        assert_eq!(stream.end().unwrap().close, LogClose::Abandoned);
    }

    #[tokio::test]
    async fn stalled_reader_does_not_block_writer_and_memory_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, stream) = LogStream::with_config(dir.path(), small_ring()).unwrap();
        let mut stalled = stream.subscribe(0);
        // Start the stalled reader: it reads one line, then never reads again.
        writer.push(kind_of(0), "line 0");
        assert_eq!(stalled.next().await.unwrap().seq, 0);
        let mut footprint_after_10k = 0;
        for i in 1..100_000 {
            writer.push(kind_of(i), format!("line {i}"));
            if i == 10_000 {
                footprint_after_10k = stream.memory_footprint();
            }
        }
        assert_eq!(stream.lines_written(), 100_000);
        let footprint = stream.memory_footprint();
        assert!(
            footprint <= footprint_after_10k,
            "{footprint} > {footprint_after_10k}"
        );
        assert!(
            footprint < 8 << 10,
            "ring of 16 short lines uses {footprint} bytes"
        );
        let (_store_dir, blobs) = store();
        let digests = writer.finish(&blobs, DigestFunction::Blake3).unwrap();
        // The stalled reader resumes where it was and sees everything once.
        let mut rest = vec![LogLine {
            seq: 0,
            stream: kind_of(0),
            line: "line 0".into(),
        }];
        rest.extend(collect(stalled).await);
        check_dense(&rest, 0, 100_000);
        let blob = blobs.read_to_vec(&digests.log, u64::MAX).unwrap();
        check_dense(&parse_log_blob(&blob).unwrap(), 0, 100_000);
    }

    #[tokio::test]
    async fn late_reader_after_finish_and_blob_formats() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, stream) = LogStream::with_config(dir.path(), small_ring()).unwrap();
        writer.push(LogStreamKind::Stdout, "out \"quoted\"\r\n");
        writer.push(
            LogStreamKind::Stderr,
            "\u{1b}[1;32m   Compiling\u{1b}[0m foo",
        );
        writer.push(LogStreamKind::System, "exit status 0");
        writer.push(LogStreamKind::Stdout, "second out");
        let (_store_dir, blobs) = store();
        let digests = writer.finish(&blobs, DigestFunction::Sha256).unwrap();
        assert!(stream.is_finished());

        let log = String::from_utf8(blobs.read_to_vec(&digests.log, 1 << 20).unwrap()).unwrap();
        assert_eq!(
            log.lines().next().unwrap(),
            r#"{"seq":0,"stream":"stdout","line":"out \"quoted\""}"#
        );
        assert_eq!(log.lines().count(), 4);
        assert_eq!(
            blobs.read_to_vec(&digests.stdout, 1 << 20).unwrap(),
            b"out \"quoted\"\nsecond out\n"
        );
        assert_eq!(
            blobs.read_to_vec(&digests.stderr, 1 << 20).unwrap(),
            "\u{1b}[1;32m   Compiling\u{1b}[0m foo\n".as_bytes()
        );

        let mut late = stream.subscribe(1);
        let lines: Vec<LogLine> = {
            let mut lines = Vec::new();
            while let Some(line) = late.next().await {
                lines.push(line);
            }
            lines
        };
        assert_eq!(
            lines.iter().map(|l| l.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(lines[1].stream, LogStreamKind::System);
        let end = late.end().unwrap();
        assert_eq!(
            end,
            LogEnd {
                lines: 4,
                truncated: false,
                dropped_lines: 0,
                close: LogClose::Finished(digests)
            }
        );
        assert_eq!(stream.wait_finished().await, end);
        // Past the end: nothing, immediately.
        assert!(stream.subscribe(10).next().await.is_none());
        let streamed: Vec<LogLine> = stream.lines(0).collect().await;
        assert_eq!(streamed, parse_log_blob(log.as_bytes()).unwrap());
    }

    #[tokio::test]
    async fn size_cap_appends_one_notice_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            max_bytes: 100,
            ..LogConfig::default()
        };
        let (mut writer, stream) = LogStream::with_config(dir.path(), config).unwrap();
        let mut kept = 0;
        for i in 0..50 {
            // "line NN" + newline = 8 bytes: 12 lines fit in 100 bytes.
            if writer
                .push(LogStreamKind::Stdout, format!("line {:02}", i))
                .is_some()
            {
                kept += 1;
            }
        }
        assert_eq!(kept, 12);
        assert!(writer.is_truncated());
        let (_store_dir, blobs) = store();
        let digests = writer.finish(&blobs, DigestFunction::Sha256).unwrap();
        let lines = collect(stream.subscribe(0)).await;
        assert_eq!(lines.len(), 13);
        let notice = &lines[12];
        assert_eq!(notice.stream, LogStreamKind::System);
        assert!(notice.line.starts_with(TRUNCATION_NOTICE));
        let end = stream.end().unwrap();
        assert!(end.truncated);
        assert_eq!(end.dropped_lines, 38);
        assert_eq!(end.lines, 13);
        assert_eq!(digests.stdout.size, 12 * 8);
    }

    #[tokio::test]
    async fn abandoned_writer_ends_readers_and_spill_dir_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, stream) = LogStream::new(dir.path()).unwrap();
        let reader = tokio::spawn(collect(stream.subscribe(0)));
        writer.push(LogStreamKind::Stdout, "only line");
        drop(writer);
        let lines = reader.await.unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(stream.end().unwrap().close, LogClose::Abandoned);
        let spill = stream.spill_dir().to_path_buf();
        assert!(spill.exists());
        drop(stream);
        assert!(!spill.exists());
    }

    #[test]
    fn proto_mapping() {
        let line = LogLine {
            seq: 7,
            stream: LogStreamKind::Stderr,
            line: "x".into(),
        };
        let proto = line.to_proto();
        assert_eq!(proto.seq, 7);
        assert_eq!(
            proto.stream,
            rba_proto::rba::v1::LogStreamKind::Stderr as i32
        );
        for kind in [
            LogStreamKind::Stdout,
            LogStreamKind::Stderr,
            LogStreamKind::System,
        ] {
            assert_eq!(LogStreamKind::from_proto(kind.to_proto()), kind);
            assert_eq!(LogStreamKind::from_name(kind.name()), Some(kind));
        }
    }
}
