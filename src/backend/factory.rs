//! One factory per `[s3]` section: it owns the single S3 client (one connection pool for every
//! export and bucket) or the `file://` root, and hands each export a retrying store for its
//! bucket. Reloads that keep `[s3]` keep the factory, so connections stay warm.

use super::dir::DirStore;
use super::limit::AdaptiveLimit;
use super::retry::Retrying;
use super::s3::{build_client, S3Store};
use super::stats::BackendStats;
use super::{BackendError, DynObjectStore, ObjectStore};
use crate::config::S3Config;
use crate::retry::Policy;
use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Where the objects go.
#[derive(Clone)]
enum Target {
    /// `file:///root`: [`DirStore`]s under this directory.
    Dir(PathBuf),
    /// A shared aws-sdk-s3 client (cheap to clone; clones share the pool).
    S3(aws_sdk_s3::Client),
}

impl std::fmt::Debug for Target {
    /// Never the client: its configuration holds credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Dir(root) => f.debug_tuple("Dir").field(root).finish(),
            Target::S3(_) => f.write_str("S3"),
        }
    }
}

/// Builds object stores for buckets, sharing one client and one set of retry counters.
#[derive(Debug, Clone)]
pub struct StoreFactory {
    target: Target,
    policy: Policy,
    stats: Arc<BackendStats>,
    /// Each bucket's own counters (they also count into `stats`), for per-bucket metrics.
    buckets: Arc<Mutex<BTreeMap<String, Arc<BackendStats>>>>,
    /// Each export's own counters (they also count into their bucket's), by export name: an
    /// export reopened by a reload keeps counting where it left off.
    exports: Arc<Mutex<BTreeMap<String, Arc<BackendStats>>>>,
    /// Each export's limit on calls in flight, by export name: it lives as long as the
    /// factory, so a reopened export keeps what it learnt about the store's throttling.
    limits: Arc<Mutex<BTreeMap<String, Arc<AdaptiveLimit>>>>,
    /// `[s3] adaptive_concurrency`: whether throttling answers lower the limits.
    adaptive: bool,
}

impl StoreFactory {
    /// Sets up the store `[s3]` describes. Does not contact the server: an S3 outage at
    /// startup must not stop the daemon from starting (exports retry when they open).
    pub async fn new(cfg: &S3Config) -> Result<Self, BackendError> {
        let target = match cfg.endpoint.as_deref().and_then(file_root) {
            Some(root) => Target::Dir(root?),
            None => Target::S3(build_client(cfg).await?),
        };
        Ok(Self {
            target,
            policy: Policy::OBJECT_CALL,
            stats: Arc::new(BackendStats::default()),
            buckets: Arc::default(),
            exports: Arc::default(),
            limits: Arc::default(),
            adaptive: cfg.adaptive_concurrency,
        })
    }

    /// Replaces the retry policy for stores made from now on (tests use short ones).
    pub fn with_retry_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// The object store for `bucket`, with blip retries. An unusable bucket name gives a store
    /// whose every call fails permanently with the reason (config validation normally stops
    /// such names earlier).
    pub fn bucket(&self, name: &str) -> DynObjectStore {
        let stats = self.bucket_counters(name);
        self.store(name, stats)
    }

    /// The object store `export` uses in `bucket`: like [`StoreFactory::bucket`], with its
    /// requests also counted for the export alone, and its calls in flight under the
    /// export's adaptive limit (one per export: S3 throttles per prefix).
    pub fn export_bucket(&self, bucket: &str, export: &str) -> DynObjectStore {
        let parent = self.bucket_counters(bucket);
        let stats = Arc::clone(
            self.exports
                .lock()
                .entry(export.to_owned())
                .or_insert_with(|| Arc::new(BackendStats::with_parent(parent))),
        );
        let limit = Arc::clone(
            self.limits
                .lock()
                .entry(export.to_owned())
                .or_insert_with(|| Arc::new(AdaptiveLimit::new(export, self.adaptive))),
        );
        Arc::new(self.retrying(bucket, stats).with_limit(limit))
    }

    fn bucket_counters(&self, name: &str) -> Arc<BackendStats> {
        Arc::clone(
            self.buckets
                .lock()
                .entry(name.to_owned())
                .or_insert_with(|| Arc::new(BackendStats::with_parent(Arc::clone(&self.stats)))),
        )
    }

    fn store(&self, name: &str, stats: Arc<BackendStats>) -> DynObjectStore {
        Arc::new(self.retrying(name, stats))
    }

    fn retrying(&self, name: &str, stats: Arc<BackendStats>) -> Retrying {
        let inner: DynObjectStore = match &self.target {
            Target::S3(client) => Arc::new(S3Store::new(client.clone(), name)),
            Target::Dir(root) => match DirStore::new(root.clone(), name) {
                Ok(store) => Arc::new(store),
                Err(e) => Arc::new(Refused(e.to_string())),
            },
        };
        Retrying::new(inner, self.policy, stats)
    }

    /// Request, latency, byte and retry counters of every store this factory made (metrics).
    pub fn stats(&self) -> &Arc<BackendStats> {
        &self.stats
    }

    /// Counters of each bucket a store was made for, by bucket name (metrics).
    pub fn bucket_stats(&self) -> Vec<(String, Arc<BackendStats>)> {
        named(&self.buckets)
    }

    /// Counters of each export a store was made for, by export name (metrics).
    pub fn export_stats(&self) -> Vec<(String, Arc<BackendStats>)> {
        named(&self.exports)
    }

    /// Each export's limit on object-store calls in flight, by export name (metrics).
    pub fn export_limits(&self) -> Vec<(String, Arc<AdaptiveLimit>)> {
        named(&self.limits)
    }

    /// `true` for the `file://` directory store.
    pub fn is_local(&self) -> bool {
        matches!(self.target, Target::Dir(_))
    }
}

/// A snapshot of a name → shared value map.
fn named<T>(map: &Mutex<BTreeMap<String, Arc<T>>>) -> Vec<(String, Arc<T>)> {
    let map = map.lock();
    map.iter()
        .map(|(name, value)| (name.clone(), Arc::clone(value)))
        .collect()
}

/// `Some(root)` for a `file://` endpoint; the root must be an absolute path.
fn file_root(endpoint: &str) -> Option<Result<PathBuf, BackendError>> {
    let rest = endpoint.strip_prefix("file://")?;
    // Accept `file://localhost/dir` too, as file URLs allow.
    let path = rest.strip_prefix("localhost").unwrap_or(rest);
    if !path.starts_with('/') {
        return Some(Err(BackendError::Permanent(format!(
            "endpoint {endpoint:?}: a file:// endpoint needs an absolute path, like file:///var/lib/nbd-s3"
        ))));
    }
    Some(Ok(PathBuf::from(path)))
}

/// A store that refuses everything with a fixed reason.
#[derive(Debug)]
struct Refused(String);

impl Refused {
    fn err(&self) -> BackendError {
        BackendError::Permanent(self.0.clone())
    }
}

#[async_trait]
impl ObjectStore for Refused {
    async fn get(&self, _key: &str) -> Result<Option<Bytes>, BackendError> {
        Err(self.err())
    }
    async fn put(&self, _key: &str, _data: Bytes) -> Result<(), BackendError> {
        Err(self.err())
    }
    async fn delete(&self, _key: &str) -> Result<(), BackendError> {
        Err(self.err())
    }
    async fn list(&self, _prefix: &str) -> Result<Vec<String>, BackendError> {
        Err(self.err())
    }
}

#[cfg(test)]
mod tests {
    use super::super::stats::{Op, Outcome};
    use super::*;

    fn cfg(endpoint: &str) -> S3Config {
        S3Config {
            endpoint: Some(endpoint.to_string()),
            region: None,
            path_style: true,
            access_key_id: None,
            secret_access_key: None,
            adaptive_concurrency: true,
        }
    }

    #[tokio::test]
    async fn file_endpoint_makes_directory_stores() {
        let root = tempfile::tempdir().unwrap();
        let url = format!("file://{}", root.path().display());
        let f = StoreFactory::new(&cfg(&url)).await.unwrap();
        assert!(f.is_local());
        let b = f.bucket("nbd");
        b.put("vm1/0000000000000001", Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert!(root.path().join("nbd/vm1/0000000000000001").is_file());
        assert_eq!(b.list("vm1/").await.unwrap(), vec!["vm1/0000000000000001"]);
        // A bucket that cannot be a directory fails permanently, not at bucket() time.
        let bad = f.bucket("../x");
        assert!(matches!(
            bad.get("k").await,
            Err(BackendError::Permanent(_))
        ));
    }

    #[tokio::test]
    async fn each_bucket_has_its_own_counters_under_the_totals() {
        let root = tempfile::tempdir().unwrap();
        let url = format!("file://{}", root.path().display());
        let f = StoreFactory::new(&cfg(&url)).await.unwrap();
        for (bucket, puts) in [("a", 1), ("b", 2), ("a", 1)] {
            let store = f.bucket(bucket);
            for i in 0..puts {
                store
                    .put(&format!("k{i}"), Bytes::from_static(b"x"))
                    .await
                    .unwrap();
            }
        }
        let per: Vec<(String, u64)> = f
            .bucket_stats()
            .iter()
            .map(|(b, s)| (b.clone(), s.requests(Op::Put, Outcome::Ok)))
            .collect();
        assert_eq!(per, [("a".to_string(), 2), ("b".to_string(), 2)]);
        assert_eq!(f.stats().requests(Op::Put, Outcome::Ok), 4);
    }

    #[tokio::test]
    async fn relative_file_endpoint_is_refused() {
        let err = StoreFactory::new(&cfg("file://relative/dir"))
            .await
            .unwrap_err();
        assert!(matches!(err, BackendError::Permanent(_)));
        assert!(file_root("file://localhost/srv").unwrap().is_ok());
        assert!(file_root("http://127.0.0.1:9000").is_none());
    }

    #[tokio::test]
    async fn half_configured_credentials_are_refused() {
        let mut c = cfg("http://127.0.0.1:1");
        c.access_key_id = Some("id".into());
        let err = StoreFactory::new(&c).await.unwrap_err();
        assert!(err.to_string().contains("access_key_id"), "{err}");
        c.secret_access_key = Some("s".into());
        let f = StoreFactory::new(&c).await.unwrap();
        assert!(!f.is_local());
    }
}
