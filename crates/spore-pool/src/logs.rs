//! Per-function logs: what instances print, plus one START/END/REPORT block per invocation.
//!
//! Each line is kept with its time and, when it belongs to an invocation, the request id:
//! in memory (the last [`LOG_LINES`]) for `spore logs`, on disk in
//! `<data-dir>/logs/<function>.jsonl` (one JSON object a line, mode 0600, rotated at
//! [`MAX_FILE_BYTES`] into `.jsonl.1`, so at most twice that per function) so that they
//! survive a restart, and to followers (`spore logs -f`, the dashboard's live tail) as they
//! come.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Lines kept in memory per function.
pub const LOG_LINES: usize = 5000;
/// Longest line kept (longer ones are cut).
pub const MAX_LINE: usize = 8192;
/// Size at which a function's log file is rotated.
pub const MAX_FILE_BYTES: u64 = 8 << 20;

/// One log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When it was logged, ms since the epoch.
    #[serde(rename = "t")]
    pub timestamp_ms: u64,
    /// The invocation it belongs to, if any.
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The text.
    #[serde(rename = "m")]
    pub message: String,
}

/// Which lines a reader wants.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    /// At most this many (the last ones).
    pub lines: usize,
    /// Only lines logged at or after this time, ms since the epoch.
    pub since_ms: Option<u64>,
    /// Only lines of this invocation.
    pub request_id: Option<String>,
}

impl LogQuery {
    /// Whether `line` is wanted (leaving the count aside).
    pub fn matches(&self, line: &LogLine) -> bool {
        self.since_ms.is_none_or(|s| line.timestamp_ms >= s)
            && self
                .request_id
                .as_deref()
                .is_none_or(|r| line.request_id.as_deref() == Some(r))
    }
}

#[derive(Debug)]
struct State {
    lines: VecDeque<LogLine>,
    /// The open log file and its size (None: memory only, or it failed).
    file: Option<(File, u64)>,
}

/// One function's log.
#[derive(Debug)]
pub struct LogRing {
    state: Mutex<State>,
    path: Option<PathBuf>,
    follow: broadcast::Sender<LogLine>,
}

impl Default for LogRing {
    fn default() -> Self {
        LogRing::in_memory()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn cut(mut line: String) -> String {
    if line.len() > MAX_LINE {
        let mut at = MAX_LINE;
        while !line.is_char_boundary(at) {
            at -= 1;
        }
        line.truncate(at);
        line.push_str(" [cut]");
    }
    line
}

impl LogRing {
    /// A log kept in memory only.
    pub fn in_memory() -> LogRing {
        LogRing {
            state: Mutex::new(State {
                lines: VecDeque::new(),
                file: None,
            }),
            path: None,
            follow: broadcast::channel(1024).0,
        }
    }

    /// A log persisted at `path` (created 0600 if missing); what is there already is read
    /// back (its last [`LOG_LINES`] lines, the rotated file first).
    pub fn open(path: PathBuf) -> LogRing {
        let mut lines = VecDeque::new();
        let rotated = path.with_extension("jsonl.1");
        for p in [&rotated, &path] {
            let Ok(f) = File::open(p) else { continue };
            for l in BufReader::new(f).lines().map_while(Result::ok) {
                // A line cut by a crash is skipped, not fatal.
                if let Ok(line) = serde_json::from_str::<LogLine>(&l) {
                    if lines.len() == LOG_LINES {
                        lines.pop_front();
                    }
                    lines.push_back(line);
                }
            }
        }
        let file = open_append(&path);
        LogRing {
            state: Mutex::new(State { lines, file }),
            path: Some(path),
            follow: broadcast::channel(1024).0,
        }
    }

    /// Appends every line of `text` (not part of an invocation).
    pub fn push_text(&self, text: &str) {
        self.push(None, text);
    }

    /// Appends every line of `text` as lines of invocation `request_id`.
    pub fn push_invocation(&self, request_id: &str, text: &str) {
        self.push(Some(request_id), text);
    }

    fn push(&self, request_id: Option<&str>, text: &str) {
        let t = now_ms();
        let mut st = self.state.lock().expect("log lock");
        // One write for all the lines: an invocation's START, END and REPORT lines cost one
        // system call, not three.
        let mut bytes = Vec::new();
        for message in text.lines() {
            let line = LogLine {
                timestamp_ms: t,
                request_id: request_id.map(str::to_owned),
                message: cut(message.to_owned()),
            };
            if st.file.is_some() {
                serde_json::to_writer(&mut bytes, &line).expect("log lines serialize");
                bytes.push(b'\n');
            }
            if st.lines.len() == LOG_LINES {
                st.lines.pop_front();
            }
            // No follower is not an error.
            let _ = self.follow.send(line.clone());
            st.lines.push_back(line);
        }
        self.write(&mut st, &bytes);
    }

    /// Appends `bytes` (whole lines) to the file, rotating it when it grew past
    /// [`MAX_FILE_BYTES`]. A file that cannot be written is dropped (the log stays in memory)
    /// with a warning.
    fn write(&self, st: &mut State, bytes: &[u8]) {
        let (Some(path), Some((file, size))) = (&self.path, st.file.as_mut()) else {
            return;
        };
        if bytes.is_empty() {
            return;
        }
        if let Err(e) = file.write_all(bytes) {
            tracing::warn!(
                "writing the log {}: {e}; keeping it in memory only",
                path.display()
            );
            st.file = None;
            return;
        }
        *size += bytes.len() as u64;
        if *size >= MAX_FILE_BYTES {
            let _ = std::fs::rename(path, path.with_extension("jsonl.1"));
            st.file = open_append(path);
        }
    }

    /// The last `n` lines' text.
    pub fn tail(&self, n: usize) -> Vec<String> {
        self.query(&LogQuery {
            lines: n,
            ..LogQuery::default()
        })
        .into_iter()
        .map(|l| l.message)
        .collect()
    }

    /// The last `q.lines` lines `q` selects.
    pub fn query(&self, q: &LogQuery) -> Vec<LogLine> {
        let st = self.state.lock().expect("log lock");
        let mut out: Vec<LogLine> = st
            .lines
            .iter()
            .rev()
            .filter(|l| q.matches(l))
            .take(q.lines)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// New lines from now on.
    pub fn follow(&self) -> broadcast::Receiver<LogLine> {
        self.follow.subscribe()
    }

    /// Removes the log's files (its function was deleted).
    pub fn remove_files(&self) {
        let mut st = self.state.lock().expect("log lock");
        st.file = None;
        st.lines.clear();
        if let Some(p) = &self.path {
            remove_files_at(p);
        }
    }
}

/// Deletes the log at `path` and its rotated half, whichever exist.
pub(crate) fn remove_files_at(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("jsonl.1"));
}

fn open_append(path: &PathBuf) -> Option<(File, u64)> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path);
    match f {
        Ok(f) => {
            let size = f.metadata().map_or(0, |m| m.len());
            Some((f, size))
        }
        Err(e) => {
            tracing::warn!(
                "opening the log {}: {e}; keeping it in memory only",
                path.display()
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded() {
        let ring = LogRing::in_memory();
        for i in 0..(LOG_LINES + 10) {
            ring.push_text(&format!("line {i}"));
        }
        let tail = ring.tail(usize::MAX);
        assert_eq!(tail.len(), LOG_LINES);
        assert_eq!(tail.last().unwrap(), &format!("line {}", LOG_LINES + 9));
        ring.push_text(&"é".repeat(MAX_LINE));
        assert!(ring.tail(1)[0].ends_with("[cut]"));
    }

    #[test]
    fn persisted_lines_come_back_with_their_request_ids_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.jsonl");
        {
            let ring = LogRing::open(path.clone());
            ring.push_text("cold start");
            ring.push_invocation("r1", "START RequestId: r1\nhello\nEND RequestId: r1");
            ring.push_invocation("r2", "START RequestId: r2");
        }
        let ring = LogRing::open(path.clone());
        assert_eq!(
            ring.tail(10),
            [
                "cold start",
                "START RequestId: r1",
                "hello",
                "END RequestId: r1",
                "START RequestId: r2"
            ]
        );
        let r1 = ring.query(&LogQuery {
            lines: 10,
            request_id: Some("r1".into()),
            ..LogQuery::default()
        });
        assert_eq!(r1.len(), 3);
        let future = ring.query(&LogQuery {
            lines: 10,
            since_ms: Some(now_ms() + 60_000),
            ..LogQuery::default()
        });
        assert!(future.is_empty());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Past the size limit the file rotates, and both parts are read back.
        let big = "x".repeat(MAX_LINE - 100);
        for _ in 0..(MAX_FILE_BYTES as usize / big.len() + 2) {
            ring.push_text(&big);
        }
        assert!(path.with_extension("jsonl.1").exists());
        assert!(std::fs::metadata(&path).unwrap().len() < MAX_FILE_BYTES);
        ring.remove_files();
        assert!(!path.exists() && !path.with_extension("jsonl.1").exists());
    }

    #[tokio::test]
    async fn followers_get_new_lines() {
        let ring = LogRing::in_memory();
        let mut rx = ring.follow();
        ring.push_invocation("r9", "one\ntwo");
        assert_eq!(rx.recv().await.unwrap().message, "one");
        let two = rx.recv().await.unwrap();
        assert_eq!(
            (two.message.as_str(), two.request_id.as_deref()),
            ("two", Some("r9"))
        );
    }
}
