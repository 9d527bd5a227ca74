//! What client commands print: aligned tables for people, JSON for programs (`-o json`: the
//! daemon's answer as it came, pretty-printed).

use std::sync::atomic::{AtomicBool, Ordering};

static JSON: AtomicBool = AtomicBool::new(false);

/// Sets the output format for this run.
pub(crate) fn set_json(json: bool) {
    JSON.store(json, Ordering::Relaxed);
}

/// Whether commands print JSON.
pub(crate) fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// Prints `v` as JSON.
pub(crate) fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// `s` safe for a terminal: control characters (escape sequences, carriage returns, bells:
/// what function output could use to rewrite the operator's screen) shown as `\xNN`;
/// tabs are kept.
pub(crate) fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() && c != '\t' {
            out.push_str(&format!("\\x{:02x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// A table printed with each column as wide as its widest cell.
pub(crate) struct Table {
    header: Vec<String>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns by name; a name starting with `>` is right-aligned (numbers).
    pub(crate) fn new(columns: &[&str]) -> Table {
        Table {
            header: columns
                .iter()
                .map(|c| c.trim_start_matches('>').to_owned())
                .collect(),
            right: columns.iter().map(|c| c.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (one cell per column).
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Whether it has no rows.
    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table's lines.
    pub(crate) fn lines(&self) -> Vec<String> {
        let n = self.header.len();
        let width = |i: usize| {
            self.rows
                .iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .chain([self.header[i].chars().count()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..n).map(width).collect();
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, w) in widths.iter().enumerate() {
                let c = cells.get(i).map_or("", String::as_str);
                let pad = w.saturating_sub(c.chars().count());
                if i > 0 {
                    s.push_str("  ");
                }
                if self.right[i] {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                } else {
                    s.push_str(c);
                    if i + 1 < n {
                        s.push_str(&" ".repeat(pad));
                    }
                }
            }
            s
        };
        std::iter::once(line(&self.header))
            .chain(self.rows.iter().map(|r| line(r)))
            .collect()
    }

    /// Prints it.
    pub(crate) fn print(&self) {
        for l in self.lines() {
            println!("{l}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_not_sent() {
        assert_eq!(printable("a\x1b]0;t\x07b\tc\r"), "a\\x1b]0;t\\x07b\tc\\x0d");
    }

    #[test]
    fn columns_align_whatever_the_cells() {
        let mut t = Table::new(&["NAME", ">MEMORY", "NOTE"]);
        t.row(vec!["a-very-long-name".into(), "128 MB".into(), "x".into()]);
        t.row(vec!["b".into(), "1024 MB".into(), "é".into()]);
        let l = t.lines();
        assert_eq!(l[0], format!("NAME{}   MEMORY  NOTE", " ".repeat(12)));
        assert_eq!(l[1], "a-very-long-name   128 MB  x");
        assert_eq!(l[2], format!("b{}  1024 MB  é", " ".repeat(15)));
    }
}
