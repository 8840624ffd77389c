//! A `replication=database` session spoken over `proto/`: the connection the way
//! [`crate::connect`] makes every other one (hosts in turn, TLS by `sslmode`, the password
//! file, cleartext, MD5 and SCRAM-SHA-256 with channel binding), simple-query replication
//! commands, and CopyBoth streaming.

use std::time::SystemTime;

use bytes::{Buf, BytesMut};
use ghostwire_proto::{error_fields, standby_status_update, startup_message};
use postgres_protocol::authentication::{md5_hash, sasl};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ReplicationError;
use crate::connect::params::{ChannelBinding, Host, HostKind, Params, SslMode};
use crate::connect::tls::{ClientTls, end_point_hash};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The protocol version the startup packet asks for (3.0).
const PROTOCOL_3: u32 = 196_608;
/// The longest message accepted from the server (PostgreSQL's own limit).
const MAX_MESSAGE: usize = ghostwire_proto::MAX_MESSAGE_LEN as usize;

/// A message while streaming.
pub enum Streamed {
    /// The body of a CopyData message.
    Data(BytesMut),
    /// The server ended the stream (CopyDone, or the end of the command).
    Done,
}

pub struct ReplicationClient {
    io: Box<dyn Io>,
    buf: BytesMut,
    /// The backend's process id (BackendKeyData), to find it in `pg_stat_activity`.
    pub pid: i32,
}

/// Rows of a simple query, each column as text (None for NULL).
pub type Rows = Vec<Vec<Option<String>>>;

impl ReplicationClient {
    /// Connects to the first of `p`'s hosts that accepts a replication session.
    pub async fn connect(p: &Params) -> Result<ReplicationClient, ReplicationError> {
        let tls = if p.tls.mode == SslMode::Disable { None } else { Some(ClientTls::new(&p.tls)?) };
        let mut failures = Vec::new();
        for host in &p.hosts {
            let attempt = tokio::time::timeout(p.connect_timeout, Self::connect_host(p, host, tls.as_ref()));
            match attempt.await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(ReplicationError::Server { code, message })) => {
                    // The server answered: the login itself was refused (no REPLICATION
                    // attribute, pg_hba.conf, no free WAL sender); no other host is tried.
                    return Err(ReplicationError::Server { code, message });
                }
                Ok(Err(e)) => failures.push(format!("{}: {e}", host.name())),
                Err(_) => {
                    failures.push(format!("{}: timeout after {:?} (connect_timeout)", host.name(), p.connect_timeout))
                }
            }
        }
        Err(ReplicationError::Connect(failures.join("; ")))
    }

    async fn connect_host(
        p: &Params,
        host: &Host,
        tls: Option<&ClientTls>,
    ) -> Result<ReplicationClient, ReplicationError> {
        let (io, cert): (Box<dyn Io>, _) = match &host.kind {
            HostKind::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", host.port));
                let s = tokio::net::UnixStream::connect(&path)
                    .await
                    .map_err(|e| ReplicationError::Connect(format!("{}: {e}", path.display())))?;
                (Box::new(s), None)
            }
            HostKind::Tcp(_) => {
                let (s, cert) =
                    crate::connect::stream::open(host, &p.tls, tls).await.map_err(ReplicationError::Connect)?;
                (Box::new(s), cert)
            }
        };
        let mut client = ReplicationClient { io, buf: BytesMut::with_capacity(64 * 1024), pid: 0 };
        let mut params: Vec<(&str, &str)> =
            vec![("user", &p.user), ("database", &p.dbname), ("replication", "database")];
        if let Some(name) = p.effective_application_name() {
            params.push(("application_name", name));
        }
        if let Some(o) = &p.options {
            params.push(("options", o));
        }
        client.write(&startup_message(PROTOCOL_3, &params)).await?;
        let password = crate::connect::password_for(p, host);
        let binding = cert.as_ref().and_then(|c| end_point_hash(c));
        client.authenticate(p, password.as_deref(), binding).await?;
        Ok(client)
    }

    async fn authenticate(
        &mut self,
        p: &Params,
        password: Option<&str>,
        binding: Option<Vec<u8>>,
    ) -> Result<(), ReplicationError> {
        let need_password = || {
            ReplicationError::Auth(
                "the server asks for a password and none was given (put it in the URL, PGPASSWORD or the password \
                 file)"
                    .into(),
            )
        };
        let mut scram: Option<sasl::ScramSha256> = None;
        let mut authenticated = false;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'R' => {
                    let code = body.get(..4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(-1);
                    match code {
                        0 => {
                            if p.channel_binding == ChannelBinding::Require && scram.is_none() {
                                return Err(ReplicationError::Auth(
                                    "channel_binding=require, but the server did not use SCRAM with channel binding"
                                        .into(),
                                ));
                            }
                            authenticated = true;
                        }
                        3 => {
                            let pw = password.ok_or_else(need_password)?;
                            self.write(&password_message(pw.as_bytes())).await?;
                        }
                        5 => {
                            let pw = password.ok_or_else(need_password)?;
                            let salt: [u8; 4] = body
                                .get(4..8)
                                .and_then(|s| s.try_into().ok())
                                .ok_or_else(|| ReplicationError::Protocol("MD5 request without a salt".into()))?;
                            let hash = md5_hash(p.user.as_bytes(), pw.as_bytes(), salt);
                            self.write(&password_message(hash.as_bytes())).await?;
                        }
                        10 => {
                            let pw = password.ok_or_else(need_password)?;
                            let offered = ghostwire_proto::auth_request(&body)?;
                            let ghostwire_proto::AuthRequest::Sasl(mechanisms) = offered else {
                                return Err(ReplicationError::Protocol("malformed SASL request".into()));
                            };
                            let plus = mechanisms.contains(&ghostwire_proto::SCRAM_SHA_256_PLUS);
                            let (mechanism, cb) = match (&binding, p.channel_binding) {
                                (Some(hash), ChannelBinding::Prefer | ChannelBinding::Require) if plus => (
                                    ghostwire_proto::SCRAM_SHA_256_PLUS,
                                    sasl::ChannelBinding::tls_server_end_point(hash.clone()),
                                ),
                                (_, ChannelBinding::Require) => {
                                    return Err(ReplicationError::Auth(
                                        "channel_binding=require, but channel binding is not possible on this \
                                         connection (no TLS, or the server does not offer SCRAM-SHA-256-PLUS)"
                                            .into(),
                                    ));
                                }
                                (Some(_), _) => (ghostwire_proto::SCRAM_SHA_256, sasl::ChannelBinding::unrequested()),
                                (None, _) => (ghostwire_proto::SCRAM_SHA_256, sasl::ChannelBinding::unsupported()),
                            };
                            if !mechanisms.contains(&mechanism) {
                                return Err(ReplicationError::Auth(format!(
                                    "the server offers SASL mechanisms {mechanisms:?}, none that ghostwire speaks"
                                )));
                            }
                            let s = sasl::ScramSha256::new(pw.as_bytes(), cb);
                            let mut m = mechanism.as_bytes().to_vec();
                            m.push(0);
                            m.extend((s.message().len() as i32).to_be_bytes());
                            m.extend(s.message());
                            self.write(&ghostwire_proto::message(b'p', &m)).await?;
                            scram = Some(s);
                        }
                        11 | 12 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                ReplicationError::Protocol("SASL continuation before its start".into())
                            })?;
                            let data = body.get(4..).unwrap_or_default();
                            if code == 11 {
                                s.update(data).map_err(|e| ReplicationError::Auth(format!("SCRAM: {e}")))?;
                                let answer = s.message().to_vec();
                                self.write(&ghostwire_proto::message(b'p', &answer)).await?;
                            } else {
                                s.finish(data).map_err(|e| ReplicationError::Auth(format!("SCRAM: {e}")))?;
                            }
                        }
                        other => {
                            return Err(ReplicationError::Auth(format!(
                                "the server asks for an authentication method ghostwire does not speak (code {other})"
                            )));
                        }
                    }
                }
                b'E' => return Err(server_error(&body)),
                b'K' => {
                    self.pid = ghostwire_proto::backend_key_data(&body).map(|(pid, _)| pid).unwrap_or(0);
                }
                b'Z' if authenticated => return Ok(()),
                _ => {} // ParameterStatus, NoticeResponse
            }
        }
    }

    /// Runs one replication command or SQL statement; returns its rows.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Rows, ReplicationError> {
        let mut q = sql.as_bytes().to_vec();
        q.push(0);
        self.write(&ghostwire_proto::message(b'Q', &q)).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'D' => rows.push(data_row(&body)?),
                b'E' => error = Some(server_error(&body)),
                b'Z' => return error.map_or(Ok(rows), Err),
                _ => {}
            }
        }
    }

    /// `START_REPLICATION SLOT … LOGICAL …` with the plugin's options; streaming follows.
    pub async fn start_logical(
        &mut self,
        slot: &str,
        from: u64,
        options: &[(&str, &str)],
    ) -> Result<(), ReplicationError> {
        let opts: Vec<String> =
            options.iter().map(|(k, v)| format!("{} {}", crate::sql::ident(k), crate::sql::literal(v))).collect();
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} ({})",
            crate::sql::ident(slot),
            ghostwire_proto::format_lsn(from),
            opts.join(", ")
        );
        let mut q = sql.into_bytes();
        q.push(0);
        self.write(&ghostwire_proto::message(b'Q', &q)).await?;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'W' => return Ok(()),
                b'E' => {
                    let e = server_error(&body);
                    // The ReadyForQuery that follows the error.
                    while self.read_message().await?.0 != b'Z' {}
                    return Err(e);
                }
                _ => {}
            }
        }
    }

    /// The next message while streaming. Cancel-safe: bytes read stay in the buffer.
    pub async fn recv(&mut self) -> Result<Streamed, ReplicationError> {
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'd' => return Ok(Streamed::Data(body)),
                b'c' | b'C' | b'Z' => return Ok(Streamed::Done),
                b'E' => return Err(server_error(&body)),
                _ => {} // NoticeResponse, ParameterStatus
            }
        }
    }

    /// The next message while streaming if it is already whole in the buffer (no waiting).
    pub fn buffered(&mut self) -> Result<Option<Streamed>, ReplicationError> {
        while let Some((tag, body)) = self.whole_message()? {
            match tag {
                b'd' => return Ok(Some(Streamed::Data(body))),
                b'c' | b'C' | b'Z' => return Ok(Some(Streamed::Done)),
                b'E' => return Err(server_error(&body)),
                _ => {}
            }
        }
        Ok(None)
    }

    /// Tells the server how far the changes are safely kept (`flush`: the slot may let go
    /// of the WAL before it).
    pub async fn send_status(&mut self, flush: u64, reply: bool) -> Result<(), ReplicationError> {
        let body = standby_status_update(flush, flush, flush, ghostwire_proto::pg_timestamp(SystemTime::now()), reply);
        self.write(&ghostwire_proto::message(b'd', &body)).await
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), ReplicationError> {
        self.io.write_all(bytes).await.map_err(ReplicationError::Io)?;
        self.io.flush().await.map_err(ReplicationError::Io)
    }

    /// The message at the front of the buffer, if it is whole: (tag, body).
    fn whole_message(&mut self) -> Result<Option<(u8, BytesMut)>, ReplicationError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if !(4..=MAX_MESSAGE).contains(&len) {
            return Err(ReplicationError::Protocol(format!("message length {len} out of range")));
        }
        if self.buf.len() > len {
            let tag = self.buf[0];
            self.buf.advance(5);
            return Ok(Some((tag, self.buf.split_to(len - 4))));
        }
        self.buf.reserve(len + 1 - self.buf.len());
        Ok(None)
    }

    /// One whole message: (tag, body).
    async fn read_message(&mut self) -> Result<(u8, BytesMut), ReplicationError> {
        loop {
            if let Some(m) = self.whole_message()? {
                return Ok(m);
            }
            let n = self.io.read_buf(&mut self.buf).await.map_err(ReplicationError::Io)?;
            if n == 0 {
                return Err(ReplicationError::Closed);
            }
        }
    }
}

fn password_message(secret: &[u8]) -> Vec<u8> {
    let mut body = secret.to_vec();
    body.push(0);
    ghostwire_proto::message(b'p', &body)
}

fn server_error(body: &[u8]) -> ReplicationError {
    let fields = error_fields(body).unwrap_or_default();
    let get = |c: u8| fields.iter().find(|(k, _)| *k == c).map(|(_, v)| v.to_string());
    let mut message = get(b'M').unwrap_or_else(|| "unknown error".into());
    if let Some(d) = get(b'D') {
        message.push_str(&format!(" ({d})"));
    }
    if let Some(h) = get(b'H') {
        message.push_str(&format!("; hint: {h}"));
    }
    ReplicationError::Server { code: get(b'C').unwrap_or_default(), message }
}

fn data_row(body: &[u8]) -> Result<Vec<Option<String>>, ReplicationError> {
    let bad = || ReplicationError::Protocol("malformed DataRow".into());
    let n = body.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])).ok_or_else(bad)? as usize;
    let mut at = 2;
    let mut out = Vec::with_capacity(n.min(body.len()));
    for _ in 0..n {
        let len = body.get(at..at + 4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]])).ok_or_else(bad)?;
        at += 4;
        if len < 0 {
            out.push(None);
            continue;
        }
        let v = body.get(at..at + len as usize).ok_or_else(bad)?;
        out.push(Some(String::from_utf8_lossy(v).into_owned()));
        at += len as usize;
    }
    Ok(out)
}
