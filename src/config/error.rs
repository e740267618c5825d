//! Configuration errors in the one form admins see: `PATH:LINE: what is wrong, naming the key`.

use std::fmt;

/// One problem at one place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file as the admin named it (not canonicalised), so the message matches their command.
    pub path: String,
    /// 1-based line.
    pub line: usize,
    /// What is wrong, starting with its section (`export "vm1": unknown key "sise"`).
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.path, self.line, self.message)
    }
}

/// Why a configuration was not accepted. Either way nothing changes: a running daemon keeps
/// its current exports, `check-config` exits 1.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file itself could not be read (missing, permissions): fix the path or access.
    #[error("{path}: cannot read configuration: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is invalid; every problem found is listed, each with its line.
    #[error("{}", join_lines(.0))]
    Invalid(Vec<Diagnostic>),
    /// A command-line (ad-hoc mode) value is invalid.
    #[error("{0}")]
    Flag(String),
}

impl ConfigError {
    /// Each diagnostic as its own line (an unreadable file is one line).
    pub fn lines(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid(all) => all.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        }
    }
}

fn join_lines(all: &[Diagnostic]) -> String {
    all.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The 1-based line holding byte `offset` of `src`.
pub fn line_of(src: &str, offset: usize) -> usize {
    let end = offset.min(src.len());
    src.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}
