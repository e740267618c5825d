//! The S3 store (aws-sdk-s3), tuned for S3-compatible servers as much as for AWS: path-style
//! addressing when asked, no checksums computed by the SDK unless an operation requires them
//! (some S3-compatible servers reject the newer flexible-checksum defaults) — block PUTs send
//! exactly one, `x-amz-checksum-crc32c`, themselves — and no SDK retries (the
//! [`super::retry::Retrying`] wrapper and the block store's write-back own the retry policy).
//!
//! Every PUT carries the body's CRC32C as user metadata and every GET checks it, see
//! [`super::integrity`].

use super::integrity::{hex_of, verify, S3_METADATA_KEY};
use super::{BackendError, ETag, ListPage, ObjectStore, MAX_OBJECT_SIZE};
use crate::config::S3Config;
use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use bytes::{Bytes, BytesMut};
use std::time::Duration;

/// How long establishing a TCP/TLS connection may take before the attempt counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one HTTP attempt (request + whole response body) may take. A 8 MiB block over a
/// slow link fits; a hung server does not hold a write-back slot forever.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds the one S3 client (and so the one connection pool) that all buckets share.
pub async fn build_client(cfg: &S3Config) -> Result<Client, BackendError> {
    use aws_config::meta::region::RegionProviderChain;
    use aws_config::retry::RetryConfig;
    use aws_config::timeout::TimeoutConfig;
    use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};

    let region = match (&cfg.region, &cfg.endpoint) {
        (Some(r), _) => RegionProviderChain::first_try(Region::new(r.clone())),
        // A custom endpoint rarely cares about the region, but SigV4 needs one.
        (None, Some(_)) => RegionProviderChain::first_try(Region::new("us-east-1")),
        (None, None) => RegionProviderChain::default_provider().or_else("us-east-1"),
    };
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(region)
        .retry_config(RetryConfig::standard().with_max_attempts(1))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .build(),
        )
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    if let Some(endpoint) = &cfg.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    match (&cfg.access_key_id, &cfg.secret_access_key) {
        (Some(id), Some(secret)) => {
            let creds = aws_sdk_s3::config::Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "nbd-s3 config",
            );
            loader = loader.credentials_provider(creds);
        }
        (None, None) => {} // the standard chain: env, ~/.aws, instance/pod identity
        _ => {
            return Err(BackendError::Permanent(
                "[s3] needs both access_key_id and secret_access_key_file, or neither".into(),
            ))
        }
    }
    let shared = loader.load().await;
    let s3_config = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(cfg.path_style)
        .build();
    Ok(Client::from_conf(s3_config))
}

/// One bucket on an S3 server. Cloning is cheap and shares the client's connection pool.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
}

impl std::fmt::Debug for S3Store {
    /// Only the bucket: the client's configuration holds credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .finish()
    }
}

impl S3Store {
    /// A store for `bucket` through an existing client (see [`build_client`]).
    pub fn new(client: Client, bucket: &str) -> Self {
        Self {
            client,
            bucket: bucket.to_string(),
        }
    }

    /// Turns an SDK failure into what the caller should do, naming bucket and key.
    fn map_err<E>(&self, op: &str, key: &str, err: SdkError<E>) -> BackendError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let what = format!("{op} s3://{}/{key}", self.bucket);
        classify(&what, err)
    }

    /// Reads an object, checking length and checksum; `None` for a missing key.
    async fn fetch(&self, key: &str) -> Result<Option<(Bytes, Option<ETag>)>, BackendError> {
        let resp = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await;
        let out = match resp {
            Ok(out) => out,
            Err(e) if is_no_such_key(&e) => return Ok(None),
            Err(e) => return Err(self.map_err("GET", key, e)),
        };
        let expected_len = out.content_length().and_then(|l| u64::try_from(l).ok());
        if let Some(len) = expected_len.filter(|&l| l > MAX_OBJECT_SIZE) {
            return Err(BackendError::Corrupt {
                key: key.to_string(),
                reason: format!("object is {len} bytes, more than any block ({MAX_OBJECT_SIZE})"),
            });
        }
        let crc = out.metadata().and_then(|m| m.get(S3_METADATA_KEY)).cloned();
        let etag = out.e_tag().map(str::to_string);
        let data = self.read_body(key, out.body, expected_len).await?;
        verify(key, &data, crc.as_deref(), expected_len)?;
        Ok(Some((data, etag)))
    }

    /// Reads a GET body into one buffer, never more than [`MAX_OBJECT_SIZE`] even when the
    /// server sent no length (chunked encoding).
    async fn read_body(
        &self,
        key: &str,
        mut body: ByteStream,
        expected_len: Option<u64>,
    ) -> Result<Bytes, BackendError> {
        let capacity = expected_len.unwrap_or(0).min(MAX_OBJECT_SIZE);
        let mut buf = BytesMut::with_capacity(usize::try_from(capacity).unwrap_or(0));
        loop {
            let chunk = body.try_next().await.map_err(|e| {
                BackendError::Transient(format!(
                    "GET s3://{}/{key}: reading body: {}",
                    self.bucket,
                    DisplayErrorContext(&e)
                ))
            })?;
            let Some(chunk) = chunk else {
                return Ok(buf.freeze());
            };
            if (buf.len() + chunk.len()) as u64 > MAX_OBJECT_SIZE {
                return Err(BackendError::Corrupt {
                    key: key.to_string(),
                    reason: format!("body exceeds {MAX_OBJECT_SIZE} bytes"),
                });
            }
            buf.extend_from_slice(&chunk);
        }
    }

    /// The shared part of every PUT: body, length and checksum metadata. The body's CRC32C
    /// also goes in `x-amz-checksum-crc32c`, which the server checks before storing, so a
    /// body damaged on the way is refused (and retried) rather than stored; that is what lets
    /// [`send_put`] skip the SigV4 SHA-256 of the body.
    fn put_request(
        &self,
        key: &str,
        data: Bytes,
    ) -> aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder {
        let crc = crc32c::crc32c(&data);
        let len = i64::try_from(data.len()).unwrap_or(i64::MAX);
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(len)
            .metadata(S3_METADATA_KEY, hex_of(crc))
            .checksum_crc32_c(checksum_header(crc))
            .body(ByteStream::from(data))
    }

    /// Sends a conditional PUT: `Some(etag)` on success, `None` when the precondition failed.
    async fn put_conditional(
        &self,
        key: &str,
        req: aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder,
    ) -> Result<Option<ETag>, BackendError> {
        match send_put(req).await {
            Ok(out) => match out.e_tag() {
                Some(etag) => Ok(Some(etag.to_string())),
                // Without an ETag there is nothing to renew a lease with.
                None => Err(BackendError::Unsupported(format!(
                    "ETags (conditional PUT s3://{}/{key} returned none)",
                    self.bucket
                ))),
            },
            Err(e) if status_of(&e) == Some(412) => Ok(None),
            // If-Match on a missing object.
            Err(e) if is_no_such_key(&e) => Ok(None),
            Err(e) if status_of(&e) == Some(501) => Err(BackendError::Unsupported(format!(
                "conditional writes (s3://{}/{key}: HTTP 501)",
                self.bucket
            ))),
            Err(e) => Err(self.map_err("conditional PUT", key, e)),
        }
    }
}

/// Sends a PUT with `x-amz-content-sha256: UNSIGNED-PAYLOAD`: hashing every body with
/// SHA-256 for the signature cost as much CPU as the rest of write-back together, and the
/// server verifies the CRC32C header (see [`S3Store::put_request`]) instead. Headers are
/// still signed.
async fn send_put(
    req: aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder,
) -> Result<
    aws_sdk_s3::operation::put_object::PutObjectOutput,
    SdkError<aws_sdk_s3::operation::put_object::PutObjectError, HttpResponse>,
> {
    req.customize().disable_payload_signing().send().await
}

/// `x-amz-checksum-crc32c`: the big-endian CRC32C in base64 (always 8 characters).
fn checksum_header(crc: u32) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let n = u64::from(crc) << 16; // 32 bits + 16 zero bits = 8 six-bit groups, 6 used
    let mut out: String = (0..6)
        .map(|i| char::from(ALPHABET[((n >> (42 - 6 * i)) & 63) as usize]))
        .collect();
    out.push_str("==");
    out
}

/// HTTP status of a service or response error.
fn status_of<E>(err: &SdkError<E>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

/// "No such key" (404 without a bucket-level code): the object is absent, which is not an error.
fn is_no_such_key<E: ProvideErrorMetadata>(err: &SdkError<E>) -> bool {
    let code = err.as_service_error().and_then(|e| e.code());
    match code {
        Some("NoSuchKey") => true,
        Some("NoSuchBucket") => false,
        _ => status_of(err) == Some(404),
    }
}

/// Error codes S3 servers use for "too many requests" (whatever the status): the store is
/// fine, we are too fast, so the export's concurrency limit comes down.
const THROTTLING_CODES: &[&str] = &[
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "TooManyRequests",
    "TooManyRequestsException",
];

/// Error codes S3 servers use for "try again" even with a 4xx status.
const RETRYABLE_CODES: &[&str] = &[
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
    "ConditionalRequestConflict",
];

/// The classification behind [`S3Store::map_err`]; `what` names the operation and object.
/// Whether the store has no such request (501 `NotImplemented`, as some S3-compatible
/// stores answer a multi-object delete).
fn not_implemented<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    match err {
        SdkError::ServiceError(ctx) => {
            ctx.raw().status().as_u16() == 501 || ctx.err().code() == Some("NotImplemented")
        }
        _ => false,
    }
}

fn classify<E>(what: &str, err: SdkError<E>) -> BackendError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ConstructionFailure(_) => {
            BackendError::Permanent(format!("{what}: {}", DisplayErrorContext(&err)))
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            BackendError::Transient(format!("{what}: {}", DisplayErrorContext(&err)))
        }
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status().as_u16();
            let code = ctx.err().code().unwrap_or("");
            let message = ctx.err().message().unwrap_or("");
            let text = format!("{what}: HTTP {status} {code} {message}");
            let text = text.trim_end().to_string();
            // 503 is S3's "reduce your request rate", with or without a body saying
            // SlowDown (a HEAD's answer has none).
            if status == 429 || status == 503 || THROTTLING_CODES.contains(&code) {
                BackendError::Throttled(text)
            } else if status >= 500 || RETRYABLE_CODES.contains(&code) {
                BackendError::Transient(text)
            } else if code == "NoSuchBucket" {
                BackendError::Permanent(format!("{text} (the bucket does not exist)"))
            } else {
                BackendError::Permanent(text)
            }
        }
        _ => BackendError::Transient(format!("{what}: {}", DisplayErrorContext(&err))),
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, BackendError> {
        Ok(self.fetch(key).await?.map(|(data, _)| data))
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        send_put(self.put_request(key, data))
            .await
            .map(|_| ())
            .map_err(|e| self.map_err("PUT", key, e))
    }

    async fn copy_from(
        &self,
        _src: &dyn ObjectStore,
        src_bucket: &str,
        src_key: &str,
        key: &str,
    ) -> Result<(), BackendError> {
        self.client
            .copy_object()
            .bucket(&self.bucket)
            .key(key)
            .copy_source(format!(
                "{}/{}",
                encode_key(src_bucket),
                encode_key(src_key)
            ))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.map_err("COPY", key, e))
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        let resp = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await;
        match resp {
            Ok(_) => Ok(()),
            Err(e) if is_no_such_key(&e) => Ok(()),
            Err(e) => Err(self.map_err("DELETE", key, e)),
        }
    }

    async fn delete_many(&self, keys: &[String]) -> Result<(), BackendError> {
        use aws_sdk_s3::types::{Delete, ObjectIdentifier};
        let first = keys.first().map_or("", String::as_str);
        let build = |e: aws_sdk_s3::error::BuildError| {
            BackendError::Permanent(format!("DELETE-OBJECTS s3://{}/{first}: {e}", self.bucket))
        };
        let objects = keys
            .iter()
            .map(|k| ObjectIdentifier::builder().key(k).build().map_err(build))
            .collect::<Result<Vec<_>, _>>()?;
        let delete = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .map_err(build)?;
        let resp = self
            .client
            .delete_objects()
            .bucket(&self.bucket)
            .delete(delete)
            .send()
            .await;
        let out = match resp {
            Ok(out) => out,
            Err(e) if not_implemented(&e) => {
                return Err(BackendError::Unsupported(format!(
                    "DELETE-OBJECTS s3://{}: {}",
                    self.bucket,
                    DisplayErrorContext(&e)
                )))
            }
            Err(e) => return Err(self.map_err("DELETE-OBJECTS", first, e)),
        };
        // Quiet mode lists only the keys that failed; any one fails the batch (deleting again
        // is harmless, so the caller simply retries it).
        match out.errors().first() {
            None => Ok(()),
            Some(failed) => {
                let code = failed.code().unwrap_or("");
                let text = format!(
                    "DELETE-OBJECTS s3://{}/{}: {code} {} ({} of {} keys failed)",
                    self.bucket,
                    failed.key().unwrap_or(""),
                    failed.message().unwrap_or(""),
                    out.errors().len(),
                    keys.len()
                );
                if THROTTLING_CODES.contains(&code) {
                    Err(BackendError::Throttled(text))
                } else if RETRYABLE_CODES.contains(&code) {
                    Err(BackendError::Transient(text))
                } else {
                    Err(BackendError::Permanent(text))
                }
            }
        }
    }

    /// One page after another, each from the last key of the one before.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        let mut keys = Vec::new();
        loop {
            let after = keys.last().map(String::as_str);
            let page = self.list_page(prefix, after, None).await?;
            keys.extend(page.keys);
            if !page.more {
                return Ok(keys);
            }
        }
    }

    /// One `ListObjectsV2` request from `StartAfter`; keys past `upto` end the range.
    async fn list_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        upto: Option<&str>,
    ) -> Result<ListPage, BackendError> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_start_after(after.map(str::to_string))
            .send()
            .await
            .map_err(|e| self.map_err("LIST", &format!("{prefix}*"), e))?;
        let mut keys = Vec::new();
        let mut past = false;
        for key in out.contents().iter().filter_map(|o| o.key()) {
            if upto.is_some_and(|u| key > u) {
                past = true;
                break;
            }
            if super::in_range(key, after, upto) {
                keys.push(key.to_string());
            }
        }
        let more = !past && out.is_truncated() == Some(true);
        if more && keys.is_empty() {
            // Listing again from the same place would get the same page: never loop on it.
            return Err(BackendError::Permanent(format!(
                "LIST s3://{}/{prefix}*: a truncated page held no key after {:?}",
                self.bucket,
                after.unwrap_or("")
            )));
        }
        Ok(ListPage { keys, more })
    }

    async fn get_with_etag(&self, key: &str) -> Result<Option<(Bytes, ETag)>, BackendError> {
        match self.fetch(key).await? {
            None => Ok(None),
            Some((data, Some(etag))) => Ok(Some((data, etag))),
            Some((_, None)) => Err(BackendError::Unsupported(format!(
                "ETags (GET s3://{}/{key} returned none)",
                self.bucket
            ))),
        }
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<Option<ETag>, BackendError> {
        let req = self.put_request(key, data).if_none_match("*");
        self.put_conditional(key, req).await
    }

    async fn put_if_match(
        &self,
        key: &str,
        data: Bytes,
        etag: &str,
    ) -> Result<Option<ETag>, BackendError> {
        let req = self.put_request(key, data).if_match(etag);
        self.put_conditional(key, req).await
    }
}

/// A key as `x-amz-copy-source` wants it: percent-encoded except unreserved characters and `/`.
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::checksum_header;

    #[test]
    fn checksum_header_is_base64_of_the_big_endian_crc() {
        // CRC32C("123456789") = e3069283, the standard check value.
        assert_eq!(checksum_header(crc32c::crc32c(b"123456789")), "4waSgw==");
        assert_eq!(checksum_header(0), "AAAAAA==");
        assert_eq!(checksum_header(u32::MAX), "/////w==");
    }
}
