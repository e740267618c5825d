//! Keeping credentials out of sight: a `Secret` string type whose `Debug` never shows it (so
//! clap's derived `Debug` of the command line, panics and logs cannot leak it), and the
//! warnings `check-config` / `serve` print when a credential is exposed to other local users.
//! Warnings, not errors: the daemon still works, and the admin decides.

use super::Config;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A credential (the S3 secret key of ad-hoc mode). Read it with `expose`; printing it with
/// `{:?}` shows `<redacted>`. No `Display`, so it cannot end up in a message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The credential itself, for the one place that needs it (the S3 client).
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Moves the credential out (into `S3Config`, whose `Debug` redacts it too).
    pub fn into_inner(self) -> String {
        self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_owned())
    }
}

/// What `check-config` warns about in the file at `path` (already validated as `cfg`):
/// - the file is writable by every local user: anyone could point the daemon at their own
///   S3, turn TLS off or widen an `allow` list;
/// - it is readable by every local user and names `[s3] access_key_id` inline (the secret
///   itself must live in a 0600 `secret_access_key_file`, which validation enforces, but the
///   key id is half of the credential and names the account).
pub fn file_warnings(path: &Path, cfg: &Config) -> Vec<String> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let mode = meta.permissions().mode() & 0o7777;
    let shown = path.display();
    let mut warnings = Vec::new();
    if mode & 0o002 != 0 {
        warnings.push(format!(
            "{shown} has mode {mode:04o}: every local user can change what is served and to \
             whom; run chmod o-w {shown}"
        ));
    }
    if mode & 0o004 != 0 && cfg.s3.access_key_id.is_some() {
        warnings.push(format!(
            "{shown} has mode {mode:04o} and names [s3] access_key_id inline: every local \
             user can read it; run chmod 640 {shown} (owner root, group of the daemon)"
        ));
    }
    warnings
}

/// Flags whose value every local user can read in `ps` / `/proc/PID/cmdline` while the
/// daemon runs; the same value in the environment (`NBD_S3_SECRET_KEY`) stays private.
const SECRET_FLAGS: &[(&str, &str)] = &[("--s3-secret-key", "NBD_S3_SECRET_KEY")];

/// Warnings for credentials given on the command line (`args` as `std::env::args_os`).
pub fn command_line_warnings(args: impl IntoIterator<Item = OsString>) -> Vec<String> {
    let args: Vec<OsString> = args.into_iter().collect();
    SECRET_FLAGS
        .iter()
        .filter(|(flag, _)| {
            args.iter().any(|a| {
                let a = a.to_string_lossy();
                a == *flag || a.starts_with(&format!("{flag}="))
            })
        })
        .map(|(flag, env)| {
            format!(
                "{flag} on the command line is visible to every local user (ps); \
                 set {env} in the environment instead"
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_is_redacted() {
        let s: Secret = "hunter2".parse().unwrap();
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(<redacted>)");
        assert_eq!(s.expose(), "hunter2");
    }

    /// The S3 client's own types are the other place the secret lives: their `Debug` must not
    /// show it either (a `{:?}` of the client config in a log line would otherwise leak it).
    #[test]
    fn s3_client_debug_output_hides_the_secret() {
        let creds =
            aws_sdk_s3::config::Credentials::new("AKIDEXAMPLE", "s3cr3t-value", None, None, "t");
        let conf = aws_sdk_s3::config::Builder::new()
            .credentials_provider(creds.clone())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .build();
        let shown = format!("{creds:?} {conf:?}");
        assert!(!shown.contains("s3cr3t-value"), "{shown}");
    }

    #[test]
    fn secret_flag_on_the_command_line_is_flagged() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let w = command_line_warnings(args(&["nbd-s3", "serve", "--s3-secret-key", "x"]));
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("NBD_S3_SECRET_KEY") && !w[0].contains(" x"),
            "{w:?}"
        );
        assert_eq!(
            command_line_warnings(args(&["nbd-s3", "serve", "--s3-secret-key=x"])).len(),
            1
        );
        assert!(
            command_line_warnings(args(&["nbd-s3", "serve", "--s3-access-key", "k"])).is_empty()
        );
    }

    #[test]
    fn file_modes_that_expose_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exports.toml");
        std::fs::write(&path, "[server]\n").unwrap();
        let mut cfg = Config::parse("[server]\n", "exports.toml", dir.path()).unwrap();
        let chmod =
            |mode| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        chmod(0o644);
        assert!(
            file_warnings(&path, &cfg).is_empty(),
            "no credential, no noise"
        );
        cfg.s3.access_key_id = Some("AKIDEXAMPLE".into());
        let w = file_warnings(&path, &cfg);
        assert!(w.len() == 1 && w[0].contains("access_key_id"), "{w:?}");
        assert!(!w[0].contains("AKIDEXAMPLE"), "{w:?}");
        chmod(0o640);
        assert!(file_warnings(&path, &cfg).is_empty());
        chmod(0o666);
        assert_eq!(file_warnings(&path, &cfg).len(), 2);
    }
}
