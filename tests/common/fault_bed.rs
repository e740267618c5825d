//! The fault bed: a real S3 server, the fault proxy in front of it and the daemon talking to
//! the proxy, with metrics on, so a test injects S3 faults and reads from `/metrics` how many
//! the daemon retried.

use super::daemon::NbdS3Builder;
use super::fault_proxy::FaultProxy;
use super::store_bed::KIB;
use super::{metrics, ExportSpec, NbdS3, S3Server};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// S3, the fault proxy in front of it, and the daemon talking to the proxy (dropped first).
pub struct FaultBed {
    pub nbd: NbdS3,
    pub proxy: FaultProxy,
    pub s3: S3Server,
}

impl FaultBed {
    /// Starts everything; `tweak` adjusts the daemon builder (cache sizes, flush timeout).
    pub fn start(
        exports: Vec<ExportSpec>,
        seed: u64,
        tweak: impl FnOnce(NbdS3Builder) -> NbdS3Builder,
    ) -> FaultBed {
        let s3 = S3Server::start();
        let proxy = FaultProxy::start(s3.port(), seed);
        let endpoint = proxy.endpoint();
        let mut b = NbdS3::builder(&s3).config(|c| {
            c.endpoint = endpoint;
            c.metrics = Some(metrics::ANY_PORT.into());
        });
        for e in exports {
            b = b.export(e);
        }
        let nbd = tweak(b).start();
        FaultBed { nbd, proxy, s3 }
    }

    /// Object-store retries of the daemon's current process (a restart starts from zero).
    pub fn retries(&self) -> u64 {
        metrics::backend_retries(&self.nbd)
    }

    /// Kill -9 and start again, so every later read is a GET through the proxy.
    pub fn crash_and_restart(&mut self) {
        self.nbd.kill9();
        self.nbd.restart();
    }
}

/// A fresh random seed, printed so a failing run can be replayed, and an RNG from it.
pub fn seeded_rng() -> (u64, StdRng) {
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    (seed, StdRng::seed_from_u64(seed))
}

/// Random writes (offset, data) inside `size`, of 1 byte to 200 KiB, any alignment.
pub fn random_ops(rng: &mut impl Rng, size: u64, n: usize) -> Vec<(u64, Vec<u8>)> {
    (0..n)
        .map(|_| {
            let len = rng.gen_range(1..=200 * KIB).min(size);
            let off = rng.gen_range(0..=size - len);
            (off, super::pattern(len as usize, rng.gen()))
        })
        .collect()
}
