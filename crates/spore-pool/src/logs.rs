//! Per-function log rings: what instances print, plus one START/END/REPORT block per
//! invocation, kept in memory (the last [`LOG_LINES`] lines) for `spore logs`.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Lines kept per function.
pub const LOG_LINES: usize = 5000;
/// Longest line kept (longer ones are cut).
pub const MAX_LINE: usize = 8192;

/// A bounded ring of log lines.
#[derive(Debug, Default)]
pub struct LogRing {
    lines: Mutex<VecDeque<String>>,
}

impl LogRing {
    /// Appends every line of `text`.
    pub fn push_text(&self, text: &str) {
        let mut lines = self.lines.lock().expect("log ring lock");
        for line in text.lines() {
            let mut line = line.to_owned();
            if line.len() > MAX_LINE {
                let mut cut = MAX_LINE;
                while !line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.truncate(cut);
                line.push_str(" [cut]");
            }
            if lines.len() == LOG_LINES {
                lines.pop_front();
            }
            lines.push_back(line);
        }
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let lines = self.lines.lock().expect("log ring lock");
        lines
            .iter()
            .skip(lines.len().saturating_sub(n))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded() {
        let ring = LogRing::default();
        for i in 0..(LOG_LINES + 10) {
            ring.push_text(&format!("line {i}"));
        }
        let tail = ring.tail(usize::MAX);
        assert_eq!(tail.len(), LOG_LINES);
        assert_eq!(tail.last().unwrap(), &format!("line {}", LOG_LINES + 9));
        ring.push_text(&"é".repeat(MAX_LINE));
        assert!(ring.tail(1)[0].ends_with("[cut]"));
    }
}
