//! Turns a TOML/serde error (a message and a byte span) into an admin-readable diagnostic:
//! the line, the section it is in (`export "vm1"`, `[s3]`), and the key it names. serde's own
//! wording ("unknown field `sise`, expected one of …") is rewritten to the design's
//! `unknown key "sise"`.

use super::error::{line_of, Diagnostic};
use std::ops::Range;
use toml::de::{DeTable, DeValue};

/// One table of the file: the header and every key/value span inside it.
struct Section {
    label: String,
    header: Range<usize>,
    /// (key, key span, value span) of each entry.
    entries: Vec<(String, Range<usize>, Range<usize>)>,
}

impl Section {
    fn contains(&self, at: usize) -> bool {
        let hit = |r: &Range<usize>| r.start <= at && (at < r.end || r.is_empty() && at == r.start);
        hit(&self.header) || self.entries.iter().any(|(_, k, v)| hit(k) || hit(v))
    }
    /// The key whose value holds `at`.
    fn key_for_value(&self, at: usize) -> Option<&str> {
        self.entries
            .iter()
            .find(|(_, _, v)| v.start <= at && at < v.end.max(v.start + 1))
            .map(|(k, _, _)| k.as_str())
    }
}

/// The section map of one file, built leniently (it is only used to describe errors).
struct Locator {
    top_keys: Vec<Range<usize>>,
    /// Top-level `key = value` entries (not tables), as a pseudo-section without a label.
    top: Section,
    sections: Vec<Section>,
}

fn entries_of(table: &DeTable<'_>) -> Vec<(String, Range<usize>, Range<usize>)> {
    table
        .iter()
        .map(|(k, v)| (k.get_ref().to_string(), k.span(), v.span()))
        .collect()
}

impl Locator {
    fn new(src: &str) -> Self {
        let (root, _errors) = DeTable::parse_recoverable(src);
        let mut top_keys = Vec::new();
        let mut top = Section {
            label: String::new(),
            header: 0..0,
            entries: Vec::new(),
        };
        let mut sections = Vec::new();
        for (key, value) in root.get_ref().iter() {
            top_keys.push(key.span());
            top.entries
                .push((key.get_ref().to_string(), key.span(), value.span()));
            match value.get_ref() {
                DeValue::Table(t) => sections.push(Section {
                    label: format!("[{}]", key.get_ref()),
                    header: value.span(),
                    entries: entries_of(t),
                }),
                DeValue::Array(items) if key.get_ref() == "export" => {
                    for (i, item) in items.iter().enumerate() {
                        let Some(t) = item.get_ref().as_table() else {
                            continue;
                        };
                        let label = match t.get("name").and_then(|n| n.get_ref().as_str()) {
                            Some(name) => format!("export {name:?}"),
                            None => format!("export #{}", i + 1),
                        };
                        sections.push(Section {
                            label,
                            header: item.span(),
                            entries: entries_of(t),
                        });
                    }
                }
                _ => {}
            }
        }
        Self {
            top_keys,
            top,
            sections,
        }
    }

    fn section_at(&self, at: usize) -> Option<&Section> {
        if let Some(s) = self.sections.iter().find(|s| s.contains(at)) {
            return Some(s);
        }
        // Keys the lenient parse dropped (a duplicate key): the last header before the error.
        self.sections
            .iter()
            .filter(|s| s.header.start <= at)
            .max_by_key(|s| s.header.start)
    }
}

/// Extracts the identifier between the first pair of backticks of a serde message.
fn backticked(msg: &str) -> Option<&str> {
    let start = msg.find('`')? + 1;
    let len = msg[start..].find('`')?;
    Some(&msg[start..start + len])
}

/// Rewrites a serde/toml message; `key` names the key whose value failed, when known.
fn rewrite(msg: &str, src: &str, span: &Range<usize>, key: Option<&str>) -> String {
    let first_line = msg.lines().next().unwrap_or(msg).trim();
    if first_line.starts_with("unknown field") {
        if let Some(k) = backticked(first_line) {
            if k.contains("secret") || k.contains("password") {
                // Someone tried to inline a credential: say where it goes instead.
                return format!(
                    "unknown key {k:?}: secrets are never written in this file; put the secret \
                     in a file only the daemon can read (chmod 600) and name it with \
                     secret_access_key_file"
                );
            }
            return format!("unknown key {k:?}");
        }
    }
    if first_line.starts_with("missing field") {
        if let Some(k) = backticked(first_line) {
            return format!("missing key {k:?}");
        }
    }
    if first_line == "duplicate key" {
        let text = src.get(span.clone()).unwrap_or("").trim().trim_matches('"');
        return format!("duplicate key {text:?}");
    }
    let flat = msg.lines().map(str::trim).collect::<Vec<_>>().join("; ");
    match key {
        Some(k) => format!("key {k:?}: {flat}"),
        None => flat,
    }
}

/// Describes a parse error of the file at `path` whose text is `src`.
pub fn diagnose(path: &str, src: &str, err: &toml::de::Error) -> Diagnostic {
    let span = err.span().unwrap_or(0..0);
    let at = span.start;
    let line = line_of(src, at);
    let locator = Locator::new(src);
    let is_top_key = locator.top_keys.contains(&span);
    // A syntax error leaves the recovered tables unreliable (`[server` parses as odd
    // tables): name a section only for well-formed files, and for duplicate keys.
    let trusted = err.message() == "duplicate key" || DeTable::parse(src).is_ok();
    let section = if is_top_key || !trusted {
        None
    } else {
        locator.section_at(at)
    };
    let key = match section {
        Some(s) => s.key_for_value(at),
        None if trusted && !is_top_key => locator.top.key_for_value(at),
        None => None,
    };
    let message = rewrite(err.message(), src, &span, key);
    let message = match section {
        Some(s) => format!("{}: {message}", s.label),
        None => message,
    };
    Diagnostic {
        path: path.to_string(),
        line,
        message,
    }
}
