//! Fixed-newstyle negotiation for one connection: greeting, client flags, then options until
//! EXPORT_NAME or GO picks an export, or STARTTLS hands the stream to TLS (`connection` then
//! runs the options again over TLS). Every option gets the reply the spec asks for; limits
//! on option length and count keep a hostile client from costing memory or time. Exports
//! with an `allow` list are invisible to (LIST) and refused for (ERR_POLICY) other peers.

use super::listener::Peer;
use super::tls::TlsPolicy;
use super::{Inner, State, HANDOVER_HANDSHAKE_GRACE};
use crate::config::TlsMode;
use crate::export::{Attachment, Export, ExportState};
use crate::proto::consts::*;
use crate::proto::reply;
use crate::proto::{
    parse_client_flags, parse_option, parse_option_header, ClientFlags, ClientOption,
    HandshakeError, InfoRequest, MetaContextRequest, ParseOptionError, PayloadPlan,
};
use crate::store::{BlockStore, StoreClient};
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

/// Options a client may send before it must pick an export.
pub const MAX_OPTIONS: u32 = 256;
/// Context id of `base:allocation` on SET_META_CONTEXT.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake settled: the export and how to talk about it.
pub(crate) struct Negotiated {
    /// Keeps the export alive (and counted) for the connection's lifetime.
    pub attachment: Attachment,
    /// Counted by the store, which keeps new clients out while a rollback or a snapshot
    /// delete runs.
    pub client: StoreClient,
    pub store: Arc<BlockStore>,
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    /// `base:allocation` selected for this export.
    pub block_status: bool,
}

/// Why negotiation ended without an export.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NegotiateError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Protocol(#[from] HandshakeError),
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("NBD_OPT_EXPORT_NAME for unavailable export: {0}")]
    UnknownExport(String),
    /// NBD_OPT_EXPORT_NAME before STARTTLS while TLS is required: it has no error reply.
    #[error("NBD_OPT_EXPORT_NAME without TLS, which is required")]
    TlsRequired,
    /// Bytes behind STARTTLS before the TLS handshake: a man in the middle could have put
    /// them there (the STARTTLS injection attack), so they are never read as TLS or options.
    #[error("client sent data after NBD_OPT_STARTTLS before the TLS handshake")]
    DataAfterStartTls,
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("server is shutting down")]
    ShuttingDown,
    /// The client sent ABORT (or left politely): not an error worth a warning.
    #[error("client aborted the handshake")]
    Aborted,
}

/// How a round of option haggling ended without an error.
pub(crate) enum Outcome {
    /// GO or EXPORT_NAME picked an export: transmission starts.
    Export(Negotiated),
    /// STARTTLS was acknowledged: the caller runs the TLS handshake, then `options` again.
    StartTls(TlsAcceptor),
}

/// Connection-wide facts the option loop needs, fixed for the round.
pub(crate) struct Context<'a> {
    pub flags: ClientFlags,
    pub peer: &'a Peer,
    /// The TLS policy when the connection started; `None` when TLS is not configured.
    pub tls: Option<&'a TlsPolicy>,
    /// The options now arrive over TLS.
    pub tls_active: bool,
}

struct Session<'a, S> {
    inner: &'a Inner,
    io: &'a mut S,
    ctx: Context<'a>,
    structured: bool,
    /// Canonical export name `base:allocation` was selected for.
    meta_export: Option<String>,
    /// An allow-list refusal was logged at warn level; later ones go to debug, so a client
    /// repeating refused options cannot flood the log.
    refusal_logged: bool,
    out: Vec<u8>,
}

enum Step {
    Continue,
    Done(Outcome),
}

/// Why an export is not handed to this client, and the option reply that says so.
struct Refusal {
    kind: u32,
    message: String,
}

/// Sends the greeting and reads the client's flags.
pub(crate) async fn greet<S>(io: &mut S) -> Result<ClientFlags, NegotiateError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    io.write_all(&reply::greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        .await?;
    io.flush().await?;
    Ok(parse_client_flags(io.read_u32().await?)?)
}

/// Answers options until one ends the round. `budget` counts options across rounds, so
/// STARTTLS does not reset a hostile client's allowance. Per the spec, nothing negotiated
/// before STARTTLS (structured replies, meta contexts) carries over into TLS.
pub(crate) async fn options<S>(
    inner: &Inner,
    io: &mut S,
    ctx: Context<'_>,
    budget: &mut u32,
) -> Result<Outcome, NegotiateError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut s = Session {
        inner,
        io,
        ctx,
        structured: false,
        meta_export: None,
        refusal_logged: false,
        out: Vec::with_capacity(512),
    };
    let mut state = inner.state.subscribe();
    while *budget > 0 {
        *budget -= 1;
        if let Step::Done(outcome) = s.one_option(&mut state).await? {
            return Ok(outcome);
        }
    }
    Err(NegotiateError::TooManyOptions)
}

/// Resolves when a handshake must end: at once when the server stops. A handover first
/// gives it `HANDOVER_HANDSHAKE_GRACE` to finish negotiating (it then parks and moves like
/// any other connection); one still negotiating after that is cut, and its client
/// reconnects. A refused takeover (the server running on) cancels the cut.
async fn handshake_ends(state: &mut watch::Receiver<State>) {
    loop {
        // Copied out first: the borrow of the watch value must not live across an await.
        let now = state.wait_for(|s| *s != State::Running).await.map(|s| *s);
        let Ok(now) = now else {
            return std::future::pending().await;
        };
        if now.stopping() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(HANDOVER_HANDSHAKE_GRACE) => return,
            // Only whether it failed leaves the future: the watch borrow is not `Send`.
            gone = async { state.wait_for(|s| *s != State::HandingOver).await.is_err() } => {
                if gone {
                    return std::future::pending().await;
                }
            }
        }
    }
}

/// The whole plain-text negotiation over separate halves (in-process tests only; the server
/// goes through `connection`, which also handles STARTTLS).
#[cfg(test)]
pub(crate) async fn negotiate<R, W>(
    inner: &Inner,
    reader: &mut R,
    writer: &mut W,
) -> Result<Negotiated, NegotiateError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut io = tokio::io::join(reader, writer);
    let flags = greet(&mut io).await?;
    let peer = Peer::Unix(Arc::from("unix:test"));
    let ctx = Context {
        flags,
        peer: &peer,
        tls: None,
        tls_active: false,
    };
    match options(inner, &mut io, ctx, &mut MAX_OPTIONS.clone()).await? {
        Outcome::Export(n) => Ok(n),
        Outcome::StartTls(_) => Err(NegotiateError::Aborted),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<'_, S> {
    async fn one_option(
        &mut self,
        state: &mut watch::Receiver<State>,
    ) -> Result<Step, NegotiateError> {
        let mut hb = [0u8; OPTION_HEADER_LEN];
        tokio::select! {
            // An option already on its way is answered (ERR_SHUTDOWN) rather than cut off.
            biased;
            r = self.io.read_exact(&mut hb) => { r?; }
            _ = handshake_ends(state) => return Err(NegotiateError::ShuttingDown),
        }
        let header = parse_option_header(&hb)?;
        let option = header.option;
        match header.payload_plan()? {
            PayloadPlan::Read => {}
            PayloadPlan::SkipTooBig => {
                let mut skip = (&mut *self.io).take(u64::from(header.length));
                tokio::io::copy(&mut skip, &mut tokio::io::sink()).await?;
                return self
                    .error(option, REP_ERR_TOO_BIG, "option data too long")
                    .await;
            }
        }
        let mut data = vec![0u8; header.length as usize];
        self.io.read_exact(&mut data).await?;
        if state.borrow().stopping() {
            if option != OPT_EXPORT_NAME {
                self.error(option, REP_ERR_SHUTDOWN, "server is shutting down")
                    .await?;
            }
            return Err(NegotiateError::ShuttingDown);
        }
        if self.tls_required() && option != OPT_STARTTLS && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Err(NegotiateError::TlsRequired);
            }
            let msg = "TLS is required: send NBD_OPT_STARTTLS first";
            return self.error(option, REP_ERR_TLS_REQD, msg).await;
        }
        match parse_option(option, &data) {
            Ok(opt) => self.dispatch(option, opt).await,
            Err(ParseOptionError::Fatal(e)) => Err(e.into()),
            Err(ParseOptionError::Reply(e)) => {
                self.error(option, e.reply_type(), &e.to_string()).await
            }
        }
    }

    async fn dispatch(&mut self, option: u32, opt: ClientOption) -> Result<Step, NegotiateError> {
        match opt {
            ClientOption::ExportName(name) => self.export_name(&name).await,
            ClientOption::Abort => {
                // The client may already be gone; ABORT is a clean end either way.
                let _ = self.ack(option).await;
                Err(NegotiateError::Aborted)
            }
            ClientOption::List => self.list().await,
            ClientOption::StartTls => self.start_tls(option).await,
            ClientOption::Info(req) => self.info(option, req, false).await,
            ClientOption::Go(req) => self.info(option, req, true).await,
            ClientOption::StructuredReply => {
                self.structured = true;
                self.ack(option).await
            }
            ClientOption::ListMetaContext(req) => self.meta_context(option, req, false).await,
            ClientOption::SetMetaContext(req) => self.meta_context(option, req, true).await,
            ClientOption::ExtendedHeaders | ClientOption::Unknown(_) => {
                self.error(option, REP_ERR_UNSUP, "option not supported")
                    .await
            }
        }
    }

    async fn send(&mut self) -> io::Result<()> {
        self.io.write_all(&self.out).await?;
        self.out.clear();
        self.io.flush().await
    }

    async fn ack(&mut self, option: u32) -> Result<Step, NegotiateError> {
        reply::option_reply(&mut self.out, option, REP_ACK, b"");
        self.send().await?;
        Ok(Step::Continue)
    }

    async fn error(&mut self, option: u32, kind: u32, msg: &str) -> Result<Step, NegotiateError> {
        reply::option_reply(&mut self.out, option, kind, msg.as_bytes());
        self.send().await?;
        Ok(Step::Continue)
    }

    /// Whether plain-text options must be refused: TLS required and not yet started.
    fn tls_required(&self) -> bool {
        !self.ctx.tls_active && self.ctx.tls.is_some_and(|t| t.mode == TlsMode::Require)
    }

    async fn start_tls(&mut self, option: u32) -> Result<Step, NegotiateError> {
        if self.ctx.tls_active {
            return self
                .error(option, REP_ERR_INVALID, "TLS is already active")
                .await;
        }
        let Some(policy) = self.ctx.tls else {
            return self
                .error(option, REP_ERR_POLICY, "TLS is not configured")
                .await;
        };
        let Some(acceptor) = policy.acceptor.clone() else {
            let msg = "TLS credentials could not be loaded (see the server log)";
            return self.error(option, REP_ERR_POLICY, msg).await;
        };
        self.ack(option).await?;
        Ok(Step::Done(Outcome::StartTls(acceptor)))
    }

    /// Whether this client may see and open `export` (its `allow` list, if any).
    fn permitted(&self, export: &Export) -> bool {
        match &export.config.allow {
            None => true,
            Some(rules) => self.ctx.peer.allowed_by(rules),
        }
    }

    /// Finds the export `name` asks for (the empty name: the only one) and checks that this
    /// client may have it. A refusal by the `allow` list is logged for the admin.
    fn lookup(&mut self, name: &str) -> Result<(Arc<Export>, Arc<BlockStore>), Refusal> {
        let export = find(&self.inner.registry, name).map_err(|message| Refusal {
            kind: REP_ERR_UNKNOWN,
            message,
        })?;
        if !self.permitted(&export) {
            let (export, peer) = (export.name(), self.ctx.peer);
            if std::mem::replace(&mut self.refusal_logged, true) {
                debug!("refused export {export} to {peer}: not in its allow list");
            } else {
                warn!("refused export {export} to {peer}: not in its allow list");
            }
            return Err(Refusal {
                kind: REP_ERR_POLICY,
                message: format!("export '{export}' is not available to this client"),
            });
        }
        match export.state() {
            ExportState::Serving { store, .. } => {
                let store = Arc::clone(store);
                Ok((export, store))
            }
            ExportState::Refused { reason } => Err(Refusal {
                kind: REP_ERR_UNKNOWN,
                message: format!("export '{}' is unavailable: {reason}", export.name()),
            }),
        }
    }

    async fn list(&mut self) -> Result<Step, NegotiateError> {
        for listed in self.inner.registry.list_with_snapshots() {
            if !self.permitted(&listed.export) {
                debug!(peer = %self.ctx.peer, "LIST leaves out {}: not in its allow list", listed.name);
            } else if listed.export.is_serving() {
                let description = listed.description.as_deref();
                reply::list_entry(&mut self.out, &listed.name, description);
            }
        }
        self.ack(OPT_LIST).await
    }

    async fn export_name(&mut self, name: &str) -> Result<Step, NegotiateError> {
        let (export, store) = self
            .lookup(name)
            .map_err(|r| NegotiateError::UnknownExport(r.message))?;
        let client = store
            .attach_client()
            .map_err(|why| NegotiateError::UnknownExport(unavailable(&export, &why)))?;
        let attachment = attach(&export, self.ctx.peer.to_string())
            .await
            .map_err(|r| NegotiateError::UnknownExport(r.message))?;
        let n = self.negotiated(&export, store, attachment, client);
        let tflags = transmission_flags(n.read_only, n.structured);
        reply::export_name_reply(&mut self.out, n.size, tflags, self.ctx.flags.no_zeroes);
        self.send().await?;
        Ok(Step::Done(Outcome::Export(n)))
    }

    async fn info(
        &mut self,
        option: u32,
        req: InfoRequest,
        go: bool,
    ) -> Result<Step, NegotiateError> {
        let (export, store) = match self.lookup(&req.name) {
            Ok(found) => found,
            Err(r) => return self.error(option, r.kind, &r.message).await,
        };
        // Only GO enters transmission (and so takes the export lease); INFO merely looks.
        // The store counts the client before anything is promised, so a rollback or delete
        // that started first refuses it instead of changing the export under it.
        let attached = if go {
            let client = match store.attach_client() {
                Ok(client) => client,
                Err(why) => {
                    let message = unavailable(&export, &why);
                    return self.error(option, REP_ERR_UNKNOWN, &message).await;
                }
            };
            match attach(&export, self.ctx.peer.to_string()).await {
                Ok(a) => Some((a, client)),
                Err(r) => return self.error(option, r.kind, &r.message).await,
            }
        } else {
            None
        };
        let tflags = transmission_flags(export.read_only(), self.structured);
        reply::info_export(&mut self.out, option, store.size(), tflags);
        for &kind in &req.info {
            match kind {
                INFO_NAME => reply::info_string(&mut self.out, option, INFO_NAME, export.name()),
                INFO_DESCRIPTION => {
                    if let Some(d) = export.description() {
                        reply::info_string(&mut self.out, option, INFO_DESCRIPTION, d);
                    }
                }
                _ => {}
            }
        }
        let preferred = export.block_size().clamp(1, MAX_PAYLOAD);
        reply::info_block_size(&mut self.out, option, 1, preferred, MAX_PAYLOAD);
        reply::option_reply(&mut self.out, option, REP_ACK, b"");
        self.send().await?;
        Ok(match attached {
            Some((a, client)) => {
                Step::Done(Outcome::Export(self.negotiated(&export, store, a, client)))
            }
            None => Step::Continue,
        })
    }

    /// What transmission needs about the attached export.
    fn negotiated(
        &self,
        export: &Arc<Export>,
        store: Arc<BlockStore>,
        attachment: Attachment,
        client: StoreClient,
    ) -> Negotiated {
        let block_status = self.meta_export.as_deref() == Some(export.name());
        Negotiated {
            size: store.size(),
            read_only: export.read_only(),
            attachment,
            client,
            store,
            structured: self.structured,
            block_status,
        }
    }

    async fn meta_context(
        &mut self,
        option: u32,
        req: MetaContextRequest,
        set: bool,
    ) -> Result<Step, NegotiateError> {
        if !self.structured {
            return self
                .error(option, REP_ERR_INVALID, "structured replies not negotiated")
                .await;
        }
        let name = match self.lookup(&req.export) {
            Ok((export, _)) => export.name().to_owned(),
            Err(r) => return self.error(option, r.kind, &r.message).await,
        };
        let exact = req.queries.iter().any(|q| q == META_BASE_ALLOCATION);
        let matched = if set {
            self.meta_export = None;
            exact
        } else {
            req.queries.is_empty() || exact || req.queries.iter().any(|q| q == "base:")
        };
        if matched {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            reply::meta_context(&mut self.out, option, id, META_BASE_ALLOCATION);
            if set {
                self.meta_export = Some(name);
            }
        }
        self.ack(option).await
    }
}

/// Looks an export up; the empty name means the default export, which exists when exactly one
/// export is configured. `Err` carries the message for ERR_UNKNOWN.
fn find(registry: &crate::export::Registry, name: &str) -> Result<Arc<Export>, String> {
    if name.is_empty() {
        let all = registry.list();
        return match <[_; 1]>::try_from(all) {
            Ok([only]) => Ok(only),
            Err(_) => Err("no default export: ask for an export by name".to_owned()),
        };
    }
    registry
        .find(name)
        .ok_or_else(|| format!("export '{name}' does not exist"))
}

/// The ERR_UNKNOWN message for a served export its store keeps clients out of for now.
fn unavailable(export: &Export, why: &str) -> String {
    format!("export '{}' is unavailable: {why}", export.name())
}

/// Transmission flags for an export as negotiated (INFO and GO must report the same).
pub(crate) fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_CAN_MULTI_CONN
        | TFLAG_SEND_CACHE;
    if read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= TFLAG_SEND_DF;
    }
    f
}

/// Attaches a connection from `peer` to `export` (only GO/EXPORT_NAME do: INFO merely
/// looks), taking the export lease if this daemon does not hold it; refused, naming the
/// holder, when another daemon does. (A free function: the handshake's stream is not `Sync`,
/// so it cannot be borrowed across the lease's S3 calls.)
async fn attach(export: &Arc<Export>, peer: String) -> Result<Attachment, Refusal> {
    export.attach_client().await.map_err(|reason| {
        warn!("refused export {} to {peer}: {reason}", export.name());
        Refusal {
            kind: REP_ERR_UNKNOWN,
            message: format!("export '{}' is unavailable: {reason}", export.name()),
        }
    })
}
