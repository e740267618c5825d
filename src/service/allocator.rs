//! Keeps the process's memory within the cache budget: block buffers (block_size, 128 KiB by
//! default) are allocated and freed constantly as the cache fills and evicts. glibc's default
//! *dynamic* mmap threshold rises after the first such free, after which block buffers come
//! from the heap arenas and freed ones stay in the process (measured: RSS at 2–3× the
//! `[cache] memory` budget under a write storm). Pinning the threshold below the block size
//! makes every block buffer its own mapping, returned to the OS when it is freed. The cost
//! (a fresh mapping and a page fault per 4 KiB for every buffer) is taken back by
//! `store::pool`, which recycles freed blocks and large payload buffers up to a small bound.

/// Allocations at or above this size are served by mmap and unmapped on free.
const MMAP_THRESHOLD: i32 = 64 * 1024;

/// Applies the allocator policy; call once, before the runtime starts.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // nix has no mallopt, hence its libc re-export.
        // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
        let ok = unsafe { nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        if ok != 1 {
            tracing::warn!(
                "could not set the allocator's mmap threshold; RSS may exceed the cache budget"
            );
        }
    }
}
