//! Where log lines go. Under systemd, stderr is already connected to the journal
//! (`JOURNAL_STREAM`), so we talk to journald natively and keep structured fields (EXPORT,
//! PEER, BLOCK) searchable with `journalctl EXPORT=vm1`. Everywhere else a human reads stderr.

use std::fmt;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Which output `init` chose; logged once so an admin knows where to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOutput {
    /// Native journald protocol with structured fields.
    Journald,
    /// stderr is the journal but its socket is unreachable: `<N>`-prefixed lines without
    /// timestamps, which journald's stream reader turns into priorities.
    JournalStderr,
    /// Timestamped human-readable lines on stderr (ANSI colours only on a terminal).
    Human,
}

/// Installs the global subscriber. Level: `RUST_LOG` (env-filter syntax) wins, then
/// `NBD_LOG_LEVEL` (what `--log-level` sets), then `info`.
pub fn init() -> LogOutput {
    let filter = env_filter();
    let output = choose_output();
    let registry = tracing_subscriber::registry().with(filter);
    let result = match output {
        LogOutput::Journald => match journald_layer() {
            Ok(layer) => registry.with(layer).try_init(),
            Err(_) => return init_journal_stderr(),
        },
        LogOutput::JournalStderr => return init_journal_stderr(),
        LogOutput::Human => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none();
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi);
            registry.with(layer).try_init()
        }
    };
    // A subscriber already installed (tests calling `run` twice) keeps working; not an error.
    let _ = result;
    output
}

fn init_journal_stderr() -> LogOutput {
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .event_format(SyslogPrefixed);
    let _ = tracing_subscriber::registry()
        .with(env_filter())
        .with(layer)
        .try_init();
    LogOutput::JournalStderr
}

fn env_filter() -> EnvFilter {
    if let Ok(filter) = EnvFilter::try_from_default_env() {
        return filter;
    }
    let level = std::env::var("NBD_LOG_LEVEL").unwrap_or_else(|_| "info".to_owned());
    EnvFilter::try_new(level.trim()).unwrap_or_else(|_| EnvFilter::new("info"))
}

fn journald_layer() -> std::io::Result<tracing_journald::Layer> {
    use tracing_journald::{Priority, PriorityMappings};
    // The same priorities as the `<N>` stderr fallback, so `journalctl -p info` means the same
    // whichever path a line took; fields unprefixed so `journalctl EXPORT=vm1` works.
    let priorities = PriorityMappings {
        info: Priority::Informational,
        debug: Priority::Debug,
        ..PriorityMappings::new()
    };
    Ok(tracing_journald::layer()?
        .with_field_prefix(None)
        .with_priority_mappings(priorities)
        .with_syslog_identifier("nbd-s3".to_owned()))
}

/// Journal when stderr is the very stream systemd connected to the journal; a redirected
/// stderr (`nbd-s3 serve 2>log`) inherits the variable but no longer matches.
fn choose_output() -> LogOutput {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return LogOutput::Human;
    };
    if !stderr_matches(&value) {
        return LogOutput::Human;
    }
    if std::path::Path::new(JOURNAL_SOCKET).exists() {
        LogOutput::Journald
    } else {
        LogOutput::JournalStderr
    }
}

/// journald's native socket, as tracing-journald uses it.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// `JOURNAL_STREAM` is `<device>:<inode>` in decimal (systemd.exec(5)).
pub fn stderr_matches(journal_stream: &str) -> bool {
    let Some((dev, ino)) = journal_stream.trim().split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match nix::sys::stat::fstat(2) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// sd-daemon(3) priority prefix, then the message without a timestamp (journald adds one).
struct SyslogPrefixed;

impl<S, N> FormatEvent<S, N> for SyslogPrefixed
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let prio = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(writer, "<{prio}>")?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(fields) = ext.get::<tracing_subscriber::fmt::FormattedFields<N>>() {
                    if !fields.is_empty() {
                        write!(writer, "{}{{{}}}: ", span.name(), fields)?;
                    }
                }
            }
        }
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_match_stderr() {
        assert!(!stderr_matches("garbage"));
        assert!(!stderr_matches("1:"));
        let st = nix::sys::stat::fstat(2).unwrap();
        assert!(stderr_matches(&format!("{}:{}", st.st_dev, st.st_ino)));
        assert!(!stderr_matches(&format!("{}:{}", st.st_dev, st.st_ino + 1)));
    }
}
