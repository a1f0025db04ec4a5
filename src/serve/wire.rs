//! One client connection from its first byte: TLS negotiation, a limit on each message's size
//! read from its header before the body is buffered, the login deadline, the allowance of
//! connections still logging in, and a FATAL 08P01 for protocol garbage. pgwire decodes the
//! messages and kbcrm's handlers answer them ([`super::auth`], [`super::queries`]).

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::BytesMut;
use futures::{FutureExt, SinkExt, StreamExt};
use pgwire::api::{ClientInfo, DefaultClient, PgWireConnectionState};
use pgwire::error::{ErrorInfo, PgWireError};
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::{Message, PgWireFrontendMessage};
use pgwire::tokio::server::{PgWireMessageServerCodec, process_error, process_message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::codec::{Framed, FramedParts};
use tokio_util::sync::CancellationToken;

use super::queries::Stmt;

/// Largest message a client may send before it is logged in (PostgreSQL's own startup packet
/// limit is 10,000 bytes; SCRAM messages are a few hundred).
pub const LOGIN_MESSAGE_LIMIT: usize = 16 << 10;

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
/// The first byte of a TLS ClientHello: a client negotiating TLS directly (PostgreSQL 17).
const TLS_HANDSHAKE: u8 = 0x16;
/// The ALPN protocol a direct-TLS client must offer.
pub const ALPN: &[u8] = b"postgresql";

/// What the size check of one connection needs to know.
pub struct Limits {
    /// Set once the client has logged in: the larger limit applies from then on.
    pub logged_in: AtomicBool,
    /// Largest message after login, in bytes.
    pub after_login: usize,
}

impl Limits {
    fn current(&self) -> usize {
        if self.logged_in.load(Ordering::Acquire) {
            self.after_login
        } else {
            LOGIN_MESSAGE_LIMIT
        }
    }
}

/// The connections still logging in. Beyond the allowance, the one waiting longest is closed,
/// so idle sockets that never log in cannot keep real clients out.
pub struct Pending {
    allowance: usize,
    next: AtomicU64,
    waiting: Mutex<BTreeMap<u64, CancellationToken>>,
}

impl Pending {
    /// Room for `allowance` connections logging in at once.
    pub fn new(allowance: usize) -> Pending {
        Pending {
            allowance: allowance.max(1),
            next: AtomicU64::new(0),
            waiting: Mutex::new(BTreeMap::new()),
        }
    }

    /// Count a new connection in, closing the oldest one waiting when there is no room.
    pub fn enter(self: &Arc<Self>) -> Waiting {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        let mut waiting = self.waiting.lock().expect("pending lock");
        while waiting.len() >= self.allowance {
            match waiting.pop_first() {
                Some((_, oldest)) => oldest.cancel(),
                None => break,
            }
        }
        waiting.insert(id, token.clone());
        Waiting {
            id,
            token,
            pending: self.clone(),
        }
    }

    /// Connections logging in now.
    pub fn len(&self) -> usize {
        self.waiting.lock().expect("pending lock").len()
    }

    /// Whether no connection is logging in.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A connection's place among those logging in; leaves when dropped.
pub struct Waiting {
    id: u64,
    token: CancellationToken,
    pending: Arc<Pending>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.pending
            .waiting
            .lock()
            .expect("pending lock")
            .remove(&self.id);
    }
}

/// The transport after negotiation.
pub enum Io {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Where the size check stands in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Frame {
    /// Reading a message header (type byte and length): this many bytes of it so far.
    Header(usize, [u8; 5]),
    /// Inside a message body: this many bytes still to come.
    Body(usize),
}

/// The client's side of a connection, with every message's length checked against the limit
/// as soon as its header arrives: a longer message ends the connection before its body is
/// read, so no client makes the server buffer more than the limit.
pub struct Checked {
    io: Io,
    limits: Arc<Limits>,
    frame: Frame,
}

/// Why a message was refused by the size check (the error's text is what the client reads).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Oversized(String);

impl Checked {
    fn new(io: Io, limits: Arc<Limits>, body_left: usize) -> Checked {
        Checked {
            io,
            limits,
            frame: if body_left == 0 {
                Frame::Header(0, [0; 5])
            } else {
                Frame::Body(body_left)
            },
        }
    }

    /// Follow the message boundaries through `data`, refusing a header whose length is over the
    /// limit or impossible.
    fn scan(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match &mut self.frame {
                Frame::Body(left) => {
                    let n = (*left).min(data.len());
                    *left -= n;
                    data = &data[n..];
                    if *left == 0 {
                        self.frame = Frame::Header(0, [0; 5]);
                    }
                }
                Frame::Header(have, bytes) => {
                    bytes[*have] = data[0];
                    *have += 1;
                    data = &data[1..];
                    if *have == bytes.len() {
                        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
                        let len = len as usize;
                        self.frame = Frame::Header(0, [0; 5]);
                        if len < 4 {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                Oversized(format!("invalid message length {len}")),
                            ));
                        }
                        let limit = self.limits.current();
                        if len > limit {
                            let what = if self.limits.logged_in.load(Ordering::Acquire) {
                                "serve.max_message_size"
                            } else {
                                "before login"
                            };
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                Oversized(format!(
                                    "message of {len} bytes is longer than the server accepts \
                                     ({limit} bytes, {what})"
                                )),
                            ));
                        }
                        self.frame = if len == 4 {
                            Frame::Header(0, [0; 5])
                        } else {
                            Frame::Body(len - 4)
                        };
                    }
                }
            }
        }
        Ok(())
    }
}

impl AsyncRead for Checked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => Poll::Ready(this.scan(&buf.filled()[before..])),
            other => other,
        }
    }
}

impl AsyncWrite for Checked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A connection as pgwire's handlers see it.
pub type Socket = Framed<Checked, PgWireMessageServerCodec<Stmt>>;

/// The encoded FATAL error `code` with `message`, for a client not yet speaking through pgwire.
fn fatal_bytes(code: &str, message: &str) -> BytesMut {
    let response: ErrorResponse =
        ErrorInfo::new("FATAL".into(), code.into(), message.to_string()).into();
    let mut buf = BytesMut::new();
    // An error response of a short message always encodes.
    let _ = response.encode(&mut buf);
    buf
}

/// TLS and GSS requests answered, up to the header of the client's first real message
/// (startup or cancel request), whose length is checked against the login limit. `None` when
/// the connection ends here (the client told why, where there is something to tell).
async fn negotiate(tcp: TcpStream, tls: Option<&TlsAcceptor>) -> io::Result<Option<(Io, [u8; 8])>> {
    tcp.set_nodelay(true)?;
    let mut first = [0u8; 1];
    let mut io = if tcp.peek(&mut first).await? == 1 && first[0] == TLS_HANDSHAKE {
        let Some(acceptor) = tls else {
            return Ok(None);
        };
        let stream = acceptor.accept(tcp).await?;
        if stream.get_ref().1.alpn_protocol() != Some(ALPN) {
            return Ok(None);
        }
        Io::Tls(Box::new(stream))
    } else {
        Io::Plain(tcp)
    };
    loop {
        let mut header = [0u8; 8];
        io.read_exact(&mut header).await?;
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let code = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        match (len, code, io) {
            (8, SSL_REQUEST, Io::Plain(mut tcp)) => match tls {
                Some(acceptor) => {
                    tcp.write_all(b"S").await?;
                    io = Io::Tls(Box::new(acceptor.accept(tcp).await?));
                }
                None => {
                    tcp.write_all(b"N").await?;
                    io = Io::Plain(tcp);
                }
            },
            (8, GSSENC_REQUEST, mut same) => {
                same.write_all(b"N").await?;
                io = same;
            }
            (len, _, same) => {
                io = same;
                if !(8..=LOGIN_MESSAGE_LIMIT).contains(&len) {
                    let _ = io
                        .write_all(&fatal_bytes("08P01", "invalid length of startup packet"))
                        .await;
                    return Ok(None);
                }
                return Ok(Some((io, header)));
            }
        }
    }
}

/// Whether `e` is the transport failing (the client gone) rather than a message that makes
/// no sense.
fn transport_gone(e: &PgWireError) -> bool {
    match e {
        PgWireError::IoError(io) => {
            io.kind() != io::ErrorKind::InvalidData
                && io.kind() != io::ErrorKind::UnexpectedEof
                && io.get_ref().is_none_or(|inner| !inner.is::<Oversized>())
        }
        _ => false,
    }
}

/// What the client is told about a message it should not have sent.
fn garbage_message(e: &PgWireError) -> String {
    match e {
        PgWireError::IoError(io) => match io.get_ref() {
            Some(inner) if inner.is::<Oversized>() => inner.to_string(),
            _ => format!("invalid message: {io}"),
        },
        other => format!("invalid message: {other}"),
    }
}

/// Serve one client from its first byte to its last. `waiting` is the connection's place among
/// those logging in; it is given up once the client has logged in.
pub async fn serve(
    tcp: TcpStream,
    tls: Option<TlsAcceptor>,
    handlers: super::Connection,
    limits: Arc<Limits>,
    login_deadline: Instant,
    waiting: Waiting,
) {
    let peer = match tcp.peer_addr() {
        Ok(p) => p,
        Err(_) => return,
    };
    let evicted = waiting.token.clone();
    let negotiated = tokio::select! {
        _ = tokio::time::sleep_until(login_deadline) => return,
        _ = evicted.cancelled() => return,
        n = negotiate(tcp, tls.as_ref()) => n,
    };
    let Ok(Some((io, header))) = negotiated else {
        return;
    };
    let first_len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let secure = matches!(io, Io::Tls(_));
    let checked = Checked::new(io, limits, first_len - header.len());
    let codec = PgWireMessageServerCodec::new(DefaultClient::new(peer, secure));
    let mut parts = FramedParts::new::<pgwire::messages::PgWireBackendMessage>(checked, codec);
    parts.read_buf = BytesMut::from(&header[..]);
    let mut socket: Socket = Framed::from_parts(parts);
    socket.set_state(PgWireConnectionState::AwaitingStartup);
    run(&mut socket, handlers, login_deadline, Some(waiting)).await;
}

async fn run(
    socket: &mut Socket,
    handlers: super::Connection,
    login_deadline: Instant,
    mut waiting: Option<Waiting>,
) {
    let startup = handlers.login.clone();
    let queries = handlers.queries.clone();
    let copy = Arc::new(pgwire::api::NoopHandler);
    let cancel = Arc::new(super::auth::Cancel {
        registry: handlers.shared.registry.clone(),
    });
    loop {
        let logging_in = matches!(
            socket.state(),
            PgWireConnectionState::AwaitingStartup
                | PgWireConnectionState::AuthenticationInProgress
        );
        if !logging_in {
            waiting = None;
        }
        let next = std::panic::AssertUnwindSafe(socket.next()).catch_unwind();
        let read = match &waiting {
            Some(w) => tokio::select! {
                _ = tokio::time::sleep_until(login_deadline) => {
                    send_fatal(socket, "57014", "canceling authentication due to timeout").await;
                    return;
                }
                _ = w.token.cancelled() => {
                    send_fatal(
                        socket,
                        "53300",
                        "too many connections are logging in; this one waited longest",
                    )
                    .await;
                    return;
                }
                read = next => read,
            },
            None => next.await,
        };
        let message = match read {
            Err(_) => {
                send_fatal(socket, "08P01", "invalid message").await;
                return;
            }
            Ok(None) => return,
            Ok(Some(Err(e))) => {
                if !transport_gone(&e) {
                    send_fatal(socket, "08P01", &garbage_message(&e)).await;
                }
                return;
            }
            Ok(Some(Ok(m))) => m,
        };
        let cancel_request = matches!(message, PgWireFrontendMessage::CancelRequest(_));
        if matches!(message, PgWireFrontendMessage::Terminate(_)) {
            return;
        }
        let extended_message = match socket.state() {
            PgWireConnectionState::CopyInProgress(e) => e,
            _ => message.is_extended_query(),
        };
        let handled = std::panic::AssertUnwindSafe(process_message(
            message,
            socket,
            startup.clone(),
            queries.clone(),
            queries.clone(),
            copy.clone(),
            cancel.clone(),
        ))
        .catch_unwind()
        .await;
        match handled {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(peer = %socket.socket_addr(), "{e}");
                let info: ErrorInfo = e.into();
                let fatal = info.is_fatal();
                let sent = process_error(
                    socket,
                    PgWireError::UserError(Box::new(info)),
                    extended_message,
                )
                .await;
                if fatal || sent.is_err() {
                    return;
                }
            }
            Err(_) => {
                tracing::error!(peer = %socket.socket_addr(), "a message handler panicked");
                send_fatal(socket, "XX000", "internal error; the connection is closed").await;
                return;
            }
        }
        if cancel_request {
            return;
        }
    }
}

/// Tell the client a FATAL error and close the connection.
async fn send_fatal(socket: &mut Socket, code: &str, message: &str) {
    tracing::debug!(peer = %socket.socket_addr(), code, "{message}");
    let info = ErrorInfo::new("FATAL".into(), code.into(), message.to_string());
    let _ = socket
        .send(pgwire::messages::PgWireBackendMessage::ErrorResponse(
            info.into(),
        ))
        .await;
    let _ = socket.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(logged_in: bool) -> Checked {
        let limits = Arc::new(Limits {
            logged_in: AtomicBool::new(logged_in),
            after_login: 1 << 20,
        });
        // A socket is only needed for its type; the scan never touches it.
        let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std.local_addr().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let tcp = rt.block_on(async {
            let listener = tokio::net::TcpListener::from_std({
                std.set_nonblocking(true).unwrap();
                std
            })
            .unwrap();
            let (_client, _) = tokio::join!(TcpStream::connect(addr), listener.accept());
            _client.unwrap()
        });
        Checked::new(Io::Plain(tcp), limits, 0)
    }

    fn message(kind: u8, len: u32) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(std::iter::repeat_n(b'x', (len as usize).saturating_sub(4)));
        m
    }

    #[test]
    fn message_boundaries_are_followed_across_reads() {
        let mut c = checked(true);
        let mut bytes = message(b'Q', 20);
        bytes.extend(message(b'S', 4));
        bytes.extend(message(b'Q', 9));
        // Any split of the stream gives the same boundaries.
        for cut in 0..bytes.len() {
            c.frame = Frame::Header(0, [0; 5]);
            c.scan(&bytes[..cut]).unwrap();
            c.scan(&bytes[cut..]).unwrap();
            assert_eq!(c.frame, Frame::Header(0, [0; 5]), "cut at {cut}");
        }
    }

    #[test]
    fn a_header_over_the_limit_is_refused_before_its_body() {
        let mut c = checked(false);
        let header = &message(b'Q', 256 << 20)[..5];
        let e = c.scan(header).unwrap_err();
        assert!(e.to_string().contains("before login"), "{e}");
        let mut c = checked(true);
        c.scan(&message(b'Q', 1 << 20)).unwrap();
        let e = c.scan(&message(b'Q', (1 << 20) + 1)[..5]).unwrap_err();
        assert!(e.to_string().contains("serve.max_message_size"), "{e}");
        let mut c = checked(true);
        assert!(c.scan(&[b'Q', 0, 0, 0, 3]).is_err(), "a length under 4");
        assert!(c.scan(&[b'Q', 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn the_longest_waiting_login_makes_room() {
        let pending = Arc::new(Pending::new(2));
        let a = pending.enter();
        let b = pending.enter();
        assert!(!a.token.is_cancelled());
        let c = pending.enter();
        assert!(a.token.is_cancelled(), "the oldest was not closed");
        assert!(!b.token.is_cancelled() && !c.token.is_cancelled());
        drop(b);
        assert_eq!(pending.len(), 1);
        let _d = pending.enter();
        assert!(!c.token.is_cancelled(), "room was there");
    }
}
