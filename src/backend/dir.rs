//! The `file://` store: each object is a file `<root>/<bucket>/<key>`, so a single machine can
//! run nbd-s3 without any S3 server and an admin can inspect the blocks with `ls`.
//!
//! Files hold exactly the object's bytes (the manifest stays plain JSON); the CRC32C and length
//! live in the extended attribute `user.nbd-s3.crc32c`, set on the temporary file before it is
//! renamed into place, so data and checksum appear together. Writes are temp file + fsync +
//! rename + fsync(dir): a crash leaves the old object or the new one, never a torn one.

use super::integrity::{crc32c_hex, verify};
use super::{BackendError, ETag, ObjectStore, MAX_OBJECT_SIZE};
use async_trait::async_trait;
use bytes::Bytes;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Extended attribute holding `"<crc32c hex> <length>"`.
const XATTR: &str = "user.nbd-s3.crc32c";
/// Name prefix of in-progress writes; keys may not use it and listings skip it.
const TMP_PREFIX: &str = ".nbd-s3-tmp.";

/// Object store backed by a local directory tree.
#[derive(Debug, Clone)]
pub struct DirStore {
    bucket: String,
    /// `<root>/<bucket>`, created on the first write.
    dir: PathBuf,
    /// Shared by the clones of this store (one per export using the bucket).
    writes: Arc<Writes>,
}

/// What atomic writes into one bucket directory share: a sequence for unique temp-file names
/// (with the pid, unique across daemons too) and whether the missing-xattr warning was given.
#[derive(Debug, Default)]
struct Writes {
    seq: AtomicU64,
    warned_no_xattr: AtomicBool,
}

impl DirStore {
    /// A store for one bucket under `root` (the path of a `file://` endpoint). Nothing is
    /// created until the first write, so a typo'd root fails loudly then, not at startup.
    pub fn new(root: impl Into<PathBuf>, bucket: &str) -> Result<Self, BackendError> {
        if bucket.is_empty()
            || bucket == "."
            || bucket == ".."
            || bucket.contains(['/', '\0'])
            || bucket.starts_with(TMP_PREFIX)
        {
            return Err(BackendError::Permanent(format!(
                "bucket name {bucket:?} cannot be a directory name"
            )));
        }
        Ok(Self {
            bucket: bucket.to_string(),
            dir: root.into().join(bucket),
            writes: Arc::default(),
        })
    }

    /// Maps a key to its file, refusing keys that could escape the bucket directory.
    fn path_of(&self, key: &str) -> Result<PathBuf, BackendError> {
        if key.is_empty() || key.contains('\0') || key.split('/').any(bad_component) {
            return Err(BackendError::Permanent(format!(
                "key {key:?} in bucket {} is not a valid relative path",
                self.bucket
            )));
        }
        Ok(self.dir.join(key))
    }
}

/// A path component a key may not have: empty (`a//b`, leading or trailing `/`), `.`, `..`,
/// or our temp-file prefix.
fn bad_component(c: &str) -> bool {
    c.is_empty() || c == "." || c == ".." || c.starts_with(TMP_PREFIX)
}

/// Runs blocking filesystem work off the async threads.
async fn blocking<T, F>(f: F) -> Result<T, BackendError>
where
    F: FnOnce() -> Result<T, BackendError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackendError::Transient(format!("directory store task failed: {e}")))?
}

/// Sorts an I/O error into "an admin must act" and "try again".
fn map_io(op: &str, path: &Path, e: io::Error) -> BackendError {
    let msg = format!("{op} {}: {e}", path.display());
    match e.raw_os_error().map(Errno::from_raw) {
        Some(
            Errno::EACCES
            | Errno::EPERM
            | Errno::EROFS
            | Errno::ENOTDIR
            | Errno::EISDIR
            | Errno::ENAMETOOLONG
            | Errno::ELOOP
            | Errno::EINVAL,
        ) => BackendError::Permanent(msg),
        _ => BackendError::Transient(msg),
    }
}

/// Whether an I/O error means "no such file": the path, or a directory on it, is missing.
fn is_missing(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::ENOENT | Errno::ENOTDIR)
    )
}

/// An ETag for a file: a new inode is made by every write, so inode + mtime + length change
/// whenever the object is replaced.
fn etag_of(meta: &fs::Metadata) -> ETag {
    let mtime_ns = (meta.mtime() as i128) * 1_000_000_000 + meta.mtime_nsec() as i128;
    format!("\"{:x}-{:x}-{:x}\"", meta.ino(), mtime_ns, meta.len())
}

/// Reads one object and checks it; `None` when there is no such file.
fn read_object(path: &Path, key: &str) -> Result<Option<(Bytes, ETag)>, BackendError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if is_missing(&e) => return Ok(None),
        Err(e) => return Err(map_io("open", path, e)),
    };
    let meta = file.metadata().map_err(|e| map_io("stat", path, e))?;
    if meta.is_dir() {
        // `a` when only `a/…` exists: S3 would say "no such key".
        return Ok(None);
    }
    if meta.len() > MAX_OBJECT_SIZE {
        return Err(BackendError::Corrupt {
            key: key.to_string(),
            reason: format!("file is {} bytes, more than any block", meta.len()),
        });
    }
    let stored = read_checksum(&file).map_err(|e| map_io("getxattr", path, e))?;
    let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.read_to_end(&mut buf)
        .map_err(|e| map_io("read", path, e))?;
    if let Some(stored) = stored {
        let (crc, len) = parse_stored(key, &stored)?;
        verify(key, &buf, Some(crc), Some(len))?;
    }
    Ok(Some((Bytes::from(buf), etag_of(&meta))))
}

/// Splits the attribute value `"<crc hex> <length>"`.
fn parse_stored<'a>(key: &str, stored: &'a str) -> Result<(&'a str, u64), BackendError> {
    let mut parts = stored.split(' ');
    let parsed = match (parts.next(), parts.next(), parts.next()) {
        (Some(crc), Some(len), None) => len.parse::<u64>().ok().map(|len| (crc, len)),
        _ => None,
    };
    parsed.ok_or_else(|| BackendError::Corrupt {
        key: key.to_string(),
        reason: format!("checksum attribute {stored:?} is malformed"),
    })
}

/// The checksum attribute, or `None` for files written without one (by hand, or on a
/// filesystem without user xattrs).
fn read_checksum(file: &File) -> io::Result<Option<String>> {
    let mut buf = [0u8; 64];
    match fgetxattr(file, XATTR, &mut buf) {
        Ok(n) => Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned())),
        Err(Errno::ENODATA | Errno::ENOTSUP) => Ok(None),
        Err(Errno::ERANGE) => Ok(Some(String::from("<oversized attribute>"))),
        Err(e) => Err(e.into()),
    }
}

/// Records the checksum on the (still temporary) file.
fn write_checksum(writes: &Writes, file: &File, data: &[u8]) -> io::Result<()> {
    let value = format!("{} {}", crc32c_hex(data), data.len());
    match fsetxattr(file, XATTR, value.as_bytes()) {
        Ok(()) => Ok(()),
        Err(Errno::ENOTSUP) => {
            if !writes.warned_no_xattr.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "filesystem has no user extended attributes: file:// objects are stored \
                     without checksums"
                );
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

// nix has no extended-attribute calls; these two wrap the system calls the way nix wraps
// the others (C string in, `Errno` out), so the rest of the file stays free of `unsafe`.

/// `fgetxattr(2)`: the attribute's length, its bytes in `buf`.
fn fgetxattr(file: &File, name: &str, buf: &mut [u8]) -> Result<usize, Errno> {
    let name = CString::new(name).map_err(|_| Errno::EINVAL)?;
    // SAFETY: the descriptor is open for the call's duration, `name` is NUL-terminated and
    // `buf` is valid for `buf.len()` bytes of writes.
    let n = unsafe {
        nix::libc::fgetxattr(
            file.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    Errno::result(n).map(|n| n as usize)
}

/// `fsetxattr(2)` creating or replacing the attribute.
fn fsetxattr(file: &File, name: &str, value: &[u8]) -> Result<(), Errno> {
    let name = CString::new(name).map_err(|_| Errno::EINVAL)?;
    // SAFETY: the descriptor is open for the call's duration, `name` is NUL-terminated and
    // `value` is valid for `value.len()` bytes of reads.
    let rc = unsafe {
        nix::libc::fsetxattr(
            file.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    Errno::result(rc).map(drop)
}

/// fsyncs a directory so a rename or a new entry in it survives a crash.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and missing ancestors, making each new entry durable.
fn ensure_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = dir.parent().ok_or(e)?;
            ensure_dir(parent)?;
            match fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    }
    match dir.parent() {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

/// Opens a fresh temp file next to `path`, creating the directory if needed.
fn create_temp(writes: &Writes, path: &Path) -> io::Result<(File, PathBuf)> {
    let parent = path.parent().ok_or(io::ErrorKind::InvalidInput)?;
    let name = path.file_name().ok_or(io::ErrorKind::InvalidInput)?;
    let seq = writes.seq.fetch_add(1, Ordering::Relaxed);
    let tmp = parent.join(format!(
        "{TMP_PREFIX}{}.{}.{seq}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let open = || OpenOptions::new().write(true).create_new(true).open(&tmp);
    let file = match open() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            ensure_dir(parent)?;
            open()?
        }
        other => other?,
    };
    Ok((file, tmp))
}

/// Writes an object atomically. With `no_replace`, returns `Ok(None)` if the key exists.
fn write_object(
    writes: &Writes,
    path: &Path,
    data: &[u8],
    no_replace: bool,
) -> io::Result<Option<ETag>> {
    let (mut file, tmp) = create_temp(writes, path)?;
    let result = (|| {
        file.write_all(data)?;
        write_checksum(writes, &file, data)?;
        file.sync_all()?;
        let meta = file.metadata()?;
        if no_replace {
            if !rename_no_replace(&tmp, path)? {
                return Ok(None);
            }
        } else {
            fs::rename(&tmp, path)?;
        }
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
        Ok(Some(etag_of(&meta)))
    })();
    if !matches!(result, Ok(Some(_))) {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Renames unless the target exists (atomically); `false` when it exists.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<bool> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::fcntl::{renameat2, RenameFlags};
        match renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => return Ok(true),
            Err(Errno::EEXIST) => return Ok(false),
            // Filesystems without RENAME_NOREPLACE: fall back to link(2) below.
            Err(Errno::EINVAL) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // link(2) also refuses an existing target, so the check and the rename stay one step.
    match fs::hard_link(from, to) {
        Ok(()) => fs::remove_file(from).map(|()| true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Holds an exclusive `flock` on the bucket directory, serialising conditional writes across
/// processes sharing the directory (two daemons contending for a lease).
fn lock_bucket(dir: &Path) -> Result<Flock<File>, BackendError> {
    ensure_dir(dir).map_err(|e| map_io("mkdir", dir, e))?;
    let f = File::open(dir).map_err(|e| map_io("open", dir, e))?;
    Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| map_io("flock", dir, e.into()))
}

/// Every key under `bucket_dir` starting with `prefix`.
fn list_prefix(bucket_dir: &Path, prefix: &str) -> Result<Vec<String>, BackendError> {
    let (dir_part, name_part) = match prefix.rfind('/') {
        Some(i) => (&prefix[..=i], &prefix[i + 1..]),
        None => ("", prefix),
    };
    if let Some(dirs) = dir_part.strip_suffix('/') {
        if dirs.split('/').any(bad_component) {
            // No valid key lives under `..`, `a//` and the like.
            return Ok(Vec::new());
        }
    }
    let mut keys = Vec::new();
    // (directory, key prefix of its entries, required name prefix)
    let mut stack = vec![(bucket_dir.join(dir_part), dir_part.to_string(), name_part)];
    while let Some((dir, key_prefix, must_start)) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if is_missing(&e) => continue,
            Err(e) => return Err(map_io("read_dir", &dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| map_io("read_dir", &dir, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue; // not a key we could have written
            };
            if name.starts_with(TMP_PREFIX) || !name.starts_with(must_start) {
                continue;
            }
            let ft = entry
                .file_type()
                .map_err(|e| map_io("stat", &entry.path(), e))?;
            if ft.is_dir() {
                stack.push((entry.path(), format!("{key_prefix}{name}/"), ""));
            } else if ft.is_file() {
                keys.push(format!("{key_prefix}{name}"));
            }
        }
    }
    Ok(keys)
}

#[async_trait]
impl ObjectStore for DirStore {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, BackendError> {
        Ok(self.get_with_etag(key).await?.map(|(data, _)| data))
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        let path = self.path_of(key)?;
        let writes = Arc::clone(&self.writes);
        blocking(move || {
            write_object(&writes, &path, &data, false).map_err(|e| map_io("write", &path, e))?;
            Ok(())
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        let path = self.path_of(key)?;
        blocking(move || {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if is_missing(&e) => return Ok(()),
                Err(e) => return Err(map_io("unlink", &path, e)),
            }
            match path.parent() {
                Some(parent) => sync_dir(parent).map_err(|e| map_io("fsync", parent, e)),
                None => Ok(()),
            }
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        let dir = self.dir.clone();
        let prefix = prefix.to_string();
        blocking(move || list_prefix(&dir, &prefix)).await
    }

    async fn get_with_etag(&self, key: &str) -> Result<Option<(Bytes, ETag)>, BackendError> {
        let path = self.path_of(key)?;
        let key = key.to_string();
        blocking(move || read_object(&path, &key)).await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<Option<ETag>, BackendError> {
        let path = self.path_of(key)?;
        let dir = self.dir.clone();
        let writes = Arc::clone(&self.writes);
        blocking(move || {
            let _lock = lock_bucket(&dir)?;
            write_object(&writes, &path, &data, true).map_err(|e| map_io("write", &path, e))
        })
        .await
    }

    async fn put_if_match(
        &self,
        key: &str,
        data: Bytes,
        etag: &str,
    ) -> Result<Option<ETag>, BackendError> {
        let path = self.path_of(key)?;
        let (dir, key, etag) = (self.dir.clone(), key.to_string(), etag.to_string());
        let writes = Arc::clone(&self.writes);
        blocking(move || {
            let _lock = lock_bucket(&dir)?;
            match read_object(&path, &key)? {
                Some((_, current)) if current == etag => {}
                _ => return Ok(None),
            }
            write_object(&writes, &path, &data, false).map_err(|e| map_io("write", &path, e))
        })
        .await
    }
}

#[cfg(test)]
mod tests;
