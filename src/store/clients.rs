//! Who is attached to a store (or to one snapshot's read-only view), and the mark a change
//! that needs no client sets before it starts: a rollback (on the export), a snapshot delete
//! (on the snapshot's view) and a reload replacing the store (for good). Counting and marking happen under one lock, so
//! a client cannot attach between the "no clients" check and the change: it is either
//! counted (and the change refused) or refused itself with the reason.
//!
//! A view's gate belongs to the snapshot, not to the view store: views are reopened (flatten
//! drops them) while their clients stay on the old one, and they must still count.

use std::sync::Arc;

/// The clients of one store or snapshot, and whether new ones are refused.
#[derive(Debug, Default)]
pub struct ClientGate {
    state: parking_lot::Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    clients: usize,
    /// Why new clients are refused, while an admin change runs (or for good: deleted).
    closed: Option<String>,
}

/// A counted client; dropping it (the connection ends) uncounts it.
#[derive(Debug)]
pub struct StoreClient {
    gate: Arc<ClientGate>,
}

impl Drop for StoreClient {
    fn drop(&mut self) {
        let mut s = self.gate.state.lock();
        s.clients = s.clients.saturating_sub(1);
    }
}

/// New clients are refused while this lives; dropping it lets them in again, unless it was
/// [`Closed::forever`].
#[derive(Debug)]
pub(crate) struct Closed {
    gate: Arc<ClientGate>,
    reopen: bool,
}

impl Closed {
    /// Keeps the gate closed for good (the snapshot is gone; a view looked up before the
    /// delete must not let a client in afterwards).
    pub fn forever(mut self, why: &str) {
        self.gate.state.lock().closed = Some(why.to_owned());
        self.reopen = false;
    }
}

impl Drop for Closed {
    fn drop(&mut self) {
        if self.reopen {
            self.gate.state.lock().closed = None;
        }
    }
}

impl ClientGate {
    /// Counts a new client, or says why none may attach now.
    pub fn enter(self: &Arc<Self>) -> Result<StoreClient, String> {
        let mut s = self.state.lock();
        if let Some(why) = &s.closed {
            return Err(why.clone());
        }
        s.clients += 1;
        Ok(StoreClient {
            gate: Arc::clone(self),
        })
    }

    /// Counts a client that is already attached (a connection taken over from the previous
    /// process), whatever the mark says.
    pub fn adopt(self: &Arc<Self>) -> StoreClient {
        self.state.lock().clients += 1;
        StoreClient {
            gate: Arc::clone(self),
        }
    }

    /// Clients counted now.
    pub fn clients(&self) -> usize {
        self.state.lock().clients
    }

    /// Whether new clients may attach now.
    pub fn is_open(&self) -> bool {
        self.state.lock().closed.is_none()
    }

    /// Like `close`, for a caller that does not hold the export's admin lock (a reload): also
    /// refused, with its reason, while an admin change holds the gate.
    pub(crate) fn close_if_open(self: &Arc<Self>, why: &str, what: &str) -> Result<Closed, String> {
        let mut s = self.state.lock();
        if let Some(held) = &s.closed {
            return Err(held.clone());
        }
        close_locked(self, &mut s, why, what)
    }

    /// Refuses new clients with `why`, unless clients are attached: then nothing changes and
    /// the error names how many are attached to `what`. Only one admin change holds it at a
    /// time (the callers hold the export's admin lock).
    pub(crate) fn close(self: &Arc<Self>, why: &str, what: &str) -> Result<Closed, String> {
        let mut s = self.state.lock();
        close_locked(self, &mut s, why, what)
    }
}

/// `ClientGate::close` with its state already locked.
fn close_locked(
    gate: &Arc<ClientGate>,
    s: &mut GateState,
    why: &str,
    what: &str,
) -> Result<Closed, String> {
    if s.clients > 0 {
        return Err(format!(
            "{} client(s) attached to {what}; disconnect them first",
            s.clients
        ));
    }
    s.closed = Some(why.to_owned());
    Ok(Closed {
        gate: Arc::clone(gate),
        reopen: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_gate_refuses_clients_and_an_attached_client_refuses_the_close() {
        let gate = Arc::new(ClientGate::default());
        let client = gate.enter().expect("open gate");
        let err = gate.close("busy", "vm1").expect_err("a client is attached");
        assert!(err.contains("1 client(s) attached to vm1"), "{err}");
        drop(client);
        let closed = gate.close("being rolled back", "vm1").expect("no clients");
        assert_eq!(gate.enter().expect_err("closed"), "being rolled back");
        let adopted = gate.adopt();
        assert_eq!(gate.clients(), 1);
        drop(adopted);
        drop(closed);
        let again = gate.enter().expect("reopened");
        drop(again);
        gate.close("x", "vm1")
            .expect("no clients")
            .forever("deleted");
        assert_eq!(gate.enter().expect_err("closed for good"), "deleted");
    }
}
