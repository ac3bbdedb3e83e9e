//! The fixed-newstyle handshake: option haggling until GO or EXPORT_NAME enters transmission.
//!
//! Rules enforced here, with their spec sections:
//! - unknown client flags: hang up ("Client flags");
//! - every option except EXPORT_NAME gets a reply, unknown ones `NBD_REP_ERR_UNSUP`, after the
//!   option data has been consumed so the stream stays in sync ("Baseline");
//! - EXPORT_NAME for an unknown export, or after extended headers, ends the session (it cannot
//!   be answered with an error);
//! - FORCEDTLS: before STARTTLS only STARTTLS and ABORT are served ("FORCEDTLS mode");
//! - STARTTLS forgets all earlier negotiation ("NBD_OPT_STARTTLS");
//! - SET_META_CONTEXT replaces the selection even when it fails, and only applies if GO names
//!   the same export ("NBD_OPT_SET_META_CONTEXT").

use std::io::{self, Read, Write};
use std::sync::Arc;

use super::{Context, Export, Shared};
use crate::proto::handshake::{
    export_name_reply, greeting, opt, InfoReply, InvalidOption, OptionHeader,
};
use crate::proto::{
    ClientFlags, ClientOption, InfoRequest, InfoType, MetaQuery, OptionReply, RepError, ReplyMode,
    TransmissionFlags, MAX_OPTIONS, MAX_OPTION_DRAIN, MAX_OPTION_LEN, MAX_STRING,
};
use crate::transport::{Halves, Socket};

/// What the handshake agreed on.
pub(crate) struct Negotiated {
    pub export: Arc<Export>,
    pub mode: ReplyMode,
    pub flags: TransmissionFlags,
    /// Selected metadata contexts with their ids.
    pub contexts: Vec<(u32, Context)>,
}

/// Negotiation state that STARTTLS resets.
#[derive(Default)]
struct State {
    structured: bool,
    extended: bool,
    /// Export named by the last SET_META_CONTEXT and the contexts it selected.
    meta: Option<(String, Vec<(u32, Context)>)>,
}

impl State {
    fn mode(&self) -> ReplyMode {
        if self.extended {
            ReplyMode::Extended
        } else if self.structured {
            ReplyMode::Structured
        } else {
            ReplyMode::Simple
        }
    }
}

struct Handshake<'a> {
    shared: &'a Shared,
    socket: &'a Socket,
    halves: &'a mut Halves,
    client: ClientFlags,
    tls: bool,
    state: State,
}

/// Runs the handshake. `Ok(None)` means the client aborted (or was refused in a way that ends
/// the session cleanly); `Err` means the connection must be dropped.
pub(crate) fn negotiate(
    shared: &Shared,
    socket: &Socket,
    halves: &mut Halves,
) -> io::Result<Option<Negotiated>> {
    halves.writer.write_all(&greeting())?;
    let Some(client) = ClientFlags::read(&mut halves.reader)? else {
        return Err(protocol("client sent unknown handshake flags"));
    };
    let mut hs = Handshake {
        shared,
        socket,
        halves,
        client,
        tls: false,
        state: State::default(),
    };
    for _ in 0..MAX_OPTIONS {
        if let Some(done) = hs.option()? {
            return Ok(done);
        }
    }
    Err(protocol("too many options"))
}

fn protocol(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// What handling one option led to.
type Step = Option<Option<Negotiated>>;

impl Handshake<'_> {
    fn reply(&mut self, code: u32, reply: OptionReply) -> io::Result<()> {
        self.halves.writer.write_all(&reply.encode(code))
    }

    fn error(&mut self, code: u32, err: RepError, msg: &str) -> io::Result<Step> {
        self.reply(code, OptionReply::Error(err, msg))?;
        Ok(None)
    }

    fn tls_required(&self) -> bool {
        self.shared.settings.tls_required && !self.tls
    }

    /// Reads and answers one option. `Some(..)` ends the handshake.
    fn option(&mut self) -> io::Result<Step> {
        let hdr = OptionHeader::read(&mut self.halves.reader)?;
        if hdr.len > MAX_OPTION_DRAIN {
            return Err(protocol("option length is a denial of service"));
        }
        let oversized = hdr.len > MAX_OPTION_LEN;
        let mut data = Vec::new();
        if oversized {
            io::copy(
                &mut (&mut self.halves.reader).take(u64::from(hdr.len)),
                &mut io::sink(),
            )?;
        } else {
            data = vec![0; hdr.len as usize];
            self.halves.reader.read_exact(&mut data)?;
        }
        // FORCEDTLS: before TLS, everything but STARTTLS and ABORT is refused, whatever its
        // data ("FORCEDTLS mode").
        if self.tls_required() {
            match hdr.code {
                opt::STARTTLS | opt::ABORT => {}
                opt::EXPORT_NAME => {
                    return Err(protocol("EXPORT_NAME before STARTTLS on a TLS-only server"))
                }
                _ => return self.error(hdr.code, RepError::TlsReqd, "TLS is required"),
            }
        }
        if oversized {
            if hdr.code == opt::EXPORT_NAME {
                return Err(protocol("export name longer than any valid name"));
            }
            let msg = format!("option data longer than {MAX_OPTION_LEN} bytes");
            return self.error(hdr.code, RepError::TooBig, &msg);
        }
        let option = match ClientOption::parse(hdr.code, &data) {
            Ok(o) => o,
            Err(InvalidOption(_)) if hdr.code == opt::EXPORT_NAME => {
                return Err(protocol("invalid export name"));
            }
            Err(InvalidOption(msg)) => return self.error(hdr.code, RepError::Invalid, &msg),
        };
        if self.shared.shutting_down() && option != ClientOption::Abort {
            return self.error(hdr.code, RepError::Shutdown, "server is shutting down");
        }
        let code = hdr.code;
        match option {
            ClientOption::ExportName(name) => self.export_name(&name),
            ClientOption::Abort => {
                // The client may already have closed: failing to send the ACK is fine.
                let _ = self.reply(code, OptionReply::Ack);
                Ok(Some(None))
            }
            ClientOption::List => self.list(code),
            ClientOption::StartTls => self.starttls(code),
            ClientOption::Info(req) => self.info(code, &req, false),
            ClientOption::Go(req) => self.info(code, &req, true),
            ClientOption::StructuredReply => {
                if self.state.extended {
                    return self.error(
                        code,
                        RepError::ExtHeaderReqd,
                        "extended headers are already negotiated",
                    );
                }
                self.state.structured = true;
                self.reply(code, OptionReply::Ack)?;
                Ok(None)
            }
            ClientOption::ExtendedHeaders => {
                self.state.extended = true;
                self.state.structured = true;
                self.reply(code, OptionReply::Ack)?;
                Ok(None)
            }
            ClientOption::ListMetaContext(q) => self.meta_context(code, &q, false),
            ClientOption::SetMetaContext(q) => self.meta_context(code, &q, true),
            ClientOption::Unknown(_) => {
                let msg = format!("option {code} is not supported");
                self.error(code, RepError::Unsup, &msg)
            }
        }
    }

    fn export_name(&mut self, name: &str) -> io::Result<Step> {
        if self.state.extended {
            return Err(protocol("EXPORT_NAME after extended headers"));
        }
        let Some(export) = self.shared.find(name) else {
            return Err(protocol("EXPORT_NAME for an unknown export"));
        };
        let flags = export.flags(self.state.structured, self.shared.multi_conn());
        let reply = export_name_reply(export.size(), flags, self.client.no_zeroes);
        self.halves.writer.write_all(&reply)?;
        Ok(Some(Some(self.negotiated(export, flags))))
    }

    fn negotiated(&mut self, export: Arc<Export>, flags: TransmissionFlags) -> Negotiated {
        let contexts = match self.state.meta.take() {
            Some((name, ctx))
                if self
                    .shared
                    .find(&name)
                    .is_some_and(|e| Arc::ptr_eq(&e, &export)) =>
            {
                ctx
            }
            _ => Vec::new(),
        };
        Negotiated {
            export,
            mode: self.state.mode(),
            flags,
            contexts,
        }
    }

    fn list(&mut self, code: u32) -> io::Result<Step> {
        for e in &self.shared.exports {
            let reply = OptionReply::Server {
                name: e.name(),
                description: e.text(),
            };
            self.halves.writer.write_all(&reply.encode(code))?;
        }
        self.reply(code, OptionReply::Ack)?;
        Ok(None)
    }

    fn info(&mut self, code: u32, req: &InfoRequest, go: bool) -> io::Result<Step> {
        let Some(export) = self.shared.find(&req.export) else {
            let msg = format!("no export named {:?}", req.export);
            return self.error(code, RepError::Unknown, &msg);
        };
        let mut flags = export.flags(self.state.structured, self.shared.multi_conn());
        // As qemu-nbd: with extended headers, BLOCK_STATUS may carry a payload selecting
        // contexts once some are negotiated for this export (or, for INFO, could be).
        let has_contexts = matches!(&self.state.meta,
            Some((name, ctx)) if !ctx.is_empty()
                && self.shared.find(name).is_some_and(|e| Arc::ptr_eq(&e, &export)));
        if self.state.extended && (has_contexts || !go) {
            flags = TransmissionFlags(flags.0 | TransmissionFlags::BLOCK_STATUS_PAYLOAD);
        }
        let (min, preferred, max) = export.block_sizes();
        let mut infos = vec![
            InfoReply::Export {
                size: export.size(),
                flags,
            },
            // Sent even unrequested, as qemu-nbd does: clients that did not ask ignore it.
            InfoReply::BlockSize {
                min,
                preferred,
                max,
            },
        ];
        if req.wants(InfoType::Name) {
            infos.push(InfoReply::Name(export.name()));
        }
        if req.wants(InfoType::Description) && !export.text().is_empty() {
            infos.push(InfoReply::Description(export.text()));
        }
        for info in infos {
            self.reply(code, OptionReply::Info(info))?;
        }
        self.reply(code, OptionReply::Ack)?;
        if !go {
            return Ok(None);
        }
        Ok(Some(Some(self.negotiated(export, flags))))
    }

    /// LIST_META_CONTEXT (`set == false`) and SET_META_CONTEXT.
    fn meta_context(&mut self, code: u32, q: &MetaQuery, set: bool) -> io::Result<Step> {
        if set {
            // The selection is replaced even if this request fails.
            self.state.meta = None;
        }
        if !self.state.structured {
            let msg = "structured replies must be negotiated first";
            return self.error(code, RepError::Invalid, msg);
        }
        let Some(export) = self.shared.find(&q.export) else {
            let msg = format!("no export named {:?}", q.export);
            return self.error(code, RepError::Unknown, &msg);
        };
        let available = export.contexts();
        let mut chosen: Vec<Context> = Vec::new();
        if q.queries.is_empty() {
            if !set {
                chosen = available;
            }
        } else {
            for query in &q.queries {
                for &ctx in &available {
                    if query_matches(query, ctx, set) && !chosen.contains(&ctx) {
                        chosen.push(ctx);
                    }
                }
            }
        }
        let selected: Vec<(u32, Context)> = chosen
            .into_iter()
            .enumerate()
            .map(|(i, c)| (if set { i as u32 + 1 } else { 0 }, c))
            .collect();
        for &(id, ctx) in &selected {
            self.reply(
                code,
                OptionReply::MetaContext {
                    id,
                    name: ctx.name(),
                },
            )?;
        }
        self.reply(code, OptionReply::Ack)?;
        if set {
            self.state.meta = Some((q.export.clone(), selected));
        }
        Ok(None)
    }

    #[cfg(feature = "tls")]
    fn starttls(&mut self, code: u32) -> io::Result<Step> {
        let Some(config) = self.shared.settings.tls.clone() else {
            return self.error(code, RepError::Unsup, "TLS is not configured");
        };
        if self.tls {
            return self.error(code, RepError::Invalid, "TLS is already active");
        }
        self.reply(code, OptionReply::Ack)?;
        // Past the ACK there is no way back: a failed TLS handshake ends the session.
        *self.halves = crate::tls::accept(&config, self.socket)?;
        self.tls = true;
        self.state = State::default();
        Ok(None)
    }

    #[cfg(not(feature = "tls"))]
    fn starttls(&mut self, code: u32) -> io::Result<Step> {
        let _ = self.socket;
        self.error(code, RepError::Unsup, "built without TLS support")
    }
}

/// Whether a context query selects `ctx`. Exact names select; in LIST, a bare namespace
/// (`base:`, `qemu:`) is a wildcard ("The base: metadata namespace": `base:` MUST be a wildcard
/// for LIST and MUST be ignored by SET). Unknown namespaces and leaves are ignored.
fn query_matches(query: &str, ctx: Context, set: bool) -> bool {
    if query.len() > MAX_STRING {
        return false;
    }
    let name = ctx.name();
    if query == name {
        return true;
    }
    let namespace = &name[..=name.find(':').unwrap()];
    !set && query == namespace
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_wildcards_only_list() {
        assert!(query_matches("base:", Context::Allocation, false));
        assert!(!query_matches("base:", Context::Allocation, true));
        assert!(query_matches("base:allocation", Context::Allocation, true));
        assert!(query_matches("qemu:", Context::AllocationDepth, false));
        assert!(!query_matches("qemu:", Context::Allocation, false));
        assert!(!query_matches(
            "qemu:dirty-bitmap:x",
            Context::AllocationDepth,
            true
        ));
        assert!(!query_matches("nonsense", Context::Allocation, false));
    }
}
