//! Pure NBD wire format: bytes in, typed values out. No I/O, no tokio. Placeholder.
