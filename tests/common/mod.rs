//! Shared test fixtures: the S3 server, the nbd-s3 process, client helpers. Placeholder.
#![allow(dead_code)]
