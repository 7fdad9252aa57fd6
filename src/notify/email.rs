//! Email: SMTP through lettre's protocol client (implicit TLS, STARTTLS or plain, AUTH,
//! multipart text + HTML, a Message-ID we choose and store) on a pool of our own, or .eml
//! files for local use.
//!
//! Why not lettre's `AsyncSmtpTransport` pool: it lets more sessions than its size run at once
//! (each one over the size is opened, used once and closed again), checks every connection
//! with a NOOP round trip before each message, and leaves Nagle's algorithm on, so the final
//! `.` of a message waits for the server's delayed ACK. Together those made delivery 50 times
//! slower than postfix's smtp-source against the same server (BENCHMARKS.md). The pool below
//! bounds the sessions at `email.pool_size` (a send waits for a free one), reuses a
//! connection at once when it was used within the last seconds (a NOOP only after it sat
//! idle), and opens its sockets with TCP_NODELAY.

use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use lettre::message::{header::ContentType, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
#[allow(deprecated)]
use lettre::transport::smtp::client::AsyncNetworkStream;
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters,
};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncFileTransport, AsyncTransport, Message, Tokio1Executor};

use crate::config::Config;
use crate::notify::templates::RenderedEmail;
use crate::notify::SendError;

pub use crate::smtp_url::{SmtpSettings, TlsMode};

pub enum Mailer {
    Smtp(SmtpPool),
    File(AsyncFileTransport<Tokio1Executor>, PathBuf),
}

impl Mailer {
    /// True for the file transport: an `.eml` file reaches no customer.
    pub fn reaches_nobody(&self) -> bool {
        matches!(self, Mailer::File(..))
    }

    pub fn from_config(config: &Config) -> Result<Mailer, String> {
        let Some(url) = &config.email.smtp_url else {
            let dir = config
                .email
                .file_dir
                .clone()
                .unwrap_or_else(|| config.embedded.state_dir.join("outbox"));
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            return Ok(Mailer::File(AsyncFileTransport::new(&dir), dir));
        };
        let settings = SmtpSettings::parse(url)?;
        let tls = match settings.tls {
            TlsMode::None => None,
            TlsMode::Implicit | TlsMode::StartTls => {
                let mut b = TlsParameters::builder(settings.host.clone());
                if let Some(ca) = &config.email.ca_file {
                    let pem = std::fs::read(ca)
                        .map_err(|e| format!("email.ca_file {}: {e}", ca.display()))?;
                    b = b.add_root_certificate(
                        Certificate::from_pem(&pem).map_err(|e| format!("email.ca_file: {e}"))?,
                    );
                }
                Some(b.build_rustls().map_err(|e| e.to_string())?)
            }
        };
        let size = config.email.pool_size.max(1) as usize;
        Ok(Mailer::Smtp(SmtpPool {
            tls,
            hello: ClientId::default(),
            connect_timeout: Duration::from_secs(
                config.notifications.send_timeout.seconds().max(1) as u64,
            ),
            idle: std::sync::Mutex::new(Vec::with_capacity(size)),
            sessions: tokio::sync::Semaphore::new(size),
            settings,
        }))
    }

    /// Sends and returns the provider's id for the message (the Message-ID for SMTP, the
    /// file name for the file transport).
    pub async fn send(
        &self,
        message: Message,
        message_id: &str,
        timeout: Duration,
    ) -> Result<String, SendError> {
        match self {
            Mailer::Smtp(pool) => {
                // Waiting for a free session is not part of the send's timeout: with more
                // sends in flight than sessions, the queued ones would otherwise time out
                // behind a slow server without ever having been tried.
                let _session = pool
                    .sessions
                    .acquire()
                    .await
                    .expect("the pool's semaphore is never closed");
                match tokio::time::timeout(timeout, pool.send(&message)).await {
                    Err(_) => Err(SendError::Temporary(format!(
                        "SMTP send timed out after {}s",
                        timeout.as_secs()
                    ))),
                    Ok(Ok(())) => Ok(message_id.to_string()),
                    Ok(Err(e)) => Err(e),
                }
            }
            Mailer::File(t, dir) => match tokio::time::timeout(timeout, t.send(message)).await {
                Err(_) => Err(SendError::Temporary(
                    "writing the .eml file timed out".into(),
                )),
                Ok(Ok(id)) => Ok(dir.join(format!("{id}.eml")).display().to_string()),
                Ok(Err(e)) => Err(SendError::Temporary(format!("file transport: {e}"))),
            },
        }
    }
}

/// A connection that sat idle longer than this is checked with a NOOP before it is used
/// again (servers close idle sessions); one used more recently is used at once.
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(5);

/// At most `email.pool_size` SMTP sessions at once, kept open between messages.
pub struct SmtpPool {
    settings: SmtpSettings,
    /// For STARTTLS and implicit TLS.
    tls: Option<TlsParameters>,
    hello: ClientId,
    connect_timeout: Duration,
    /// Open sessions not in use, with when each was last used.
    idle: std::sync::Mutex<Vec<(Session, Instant)>>,
    /// One permit per session that may be open at once.
    sessions: tokio::sync::Semaphore,
}

/// An SMTP session and whether its server pipelines (RFC 2920).
struct Session {
    conn: AsyncSmtpConnection,
    pipelining: bool,
}

/// The envelope's commands in one write (MAIL, every RCPT, DATA), for a server that
/// pipelines: lettre's client writes each and waits for its answer, four round trips a
/// message with the body; pipelined they are two.
struct Pipelined(String);

impl std::fmt::Display for Pipelined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl SmtpPool {
    /// One message on a pooled session, by a caller holding one of `sessions`' permits. A
    /// session that failed is closed, never reused. Cancelling this future (the send timeout)
    /// drops the session it was using.
    async fn send(&self, message: &Message) -> Result<(), SendError> {
        let mut session = self.checkout().await?;
        let email = message.formatted();
        let envelope = message.envelope();
        // Pipelined when the server says it can and the message needs no SMTPUTF8 / 8BITMIME
        // parameter (our messages are ASCII: quoted-printable bodies, encoded headers).
        let pipelined = session.pipelining
            && email.is_ascii()
            && envelope
                .from()
                .is_none_or(|a| AsRef::<str>::as_ref(a).is_ascii())
            && envelope
                .to()
                .iter()
                .all(|a| AsRef::<str>::as_ref(a).is_ascii());
        let result = if pipelined {
            pipelined_send(&mut session.conn, envelope, &email).await
        } else {
            session.conn.send(envelope, &email).await.map(|_| ())
        }
        .map_err(smtp_error);
        // A pipelined exchange that failed part way has answers still unread: the session
        // is closed, never reused out of step.
        if session.conn.has_broken() || (pipelined && result.is_err()) {
            session.conn.abort().await;
        } else {
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((session, Instant::now()));
        }
        result
    }

    /// The most recently used idle session (checked first if it sat idle a while), or a new
    /// one.
    async fn checkout(&self) -> Result<Session, SendError> {
        loop {
            let popped = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some((mut session, used)) = popped else {
                return self.connect().await;
            };
            if used.elapsed() < CHECK_AFTER_IDLE || session.conn.test_connected().await {
                return Ok(session);
            }
            session.conn.abort().await;
        }
    }

    /// A new session: TCP with TCP_NODELAY, TLS first (smtps) or after STARTTLS (required),
    /// then AUTH when the URL has credentials.
    async fn connect(&self) -> Result<Session, SendError> {
        let s = &self.settings;
        let network = |e: std::io::Error| {
            SendError::Temporary(format!("SMTP: connecting to {}:{}: {e}", s.host, s.port))
        };
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect((s.host.as_str(), s.port)),
        )
        .await
        .map_err(|_| network(std::io::ErrorKind::TimedOut.into()))?
        .map_err(network)?;
        tcp.set_nodelay(true).map_err(network)?;
        let mut conn = match (s.tls, &self.tls) {
            (TlsMode::Implicit, Some(params)) => {
                #[allow(deprecated)]
                let mut stream = AsyncNetworkStream::use_existing_tokio1(Box::new(tcp));
                stream
                    .upgrade_tls(params.clone())
                    .await
                    .map_err(smtp_error)?;
                AsyncSmtpConnection::connect_with_transport(
                    Box::new(TlsStream(stream)),
                    &self.hello,
                )
                .await
            }
            _ => AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello).await,
        }
        .map_err(smtp_error)?;
        if let (TlsMode::StartTls, Some(params)) = (s.tls, &self.tls) {
            conn.starttls(params.clone(), &self.hello)
                .await
                .map_err(smtp_error)?;
        }
        if let (Some(user), Some(password)) = (&s.user, &s.password) {
            conn.auth(
                DEFAULT_MECHANISMS,
                &Credentials::new(user.clone(), password.clone()),
            )
            .await
            .map_err(smtp_error)?;
        }
        // lettre keeps only the extensions it uses from the greeting: asked again, once per
        // session, whether the server pipelines.
        let ehlo = conn
            .command(lettre::transport::smtp::commands::Ehlo::new(
                self.hello.clone(),
            ))
            .await
            .map_err(smtp_error)?;
        let pipelining = ehlo
            .message()
            .any(|line| line.trim().eq_ignore_ascii_case("PIPELINING"));
        Ok(Session { conn, pipelining })
    }
}

/// MAIL, RCPT and DATA in one write, their answers read in order, then the body: the
/// exchange lettre's `send` makes, in two round trips.
async fn pipelined_send(
    conn: &mut AsyncSmtpConnection,
    envelope: &lettre::address::Envelope,
    email: &[u8],
) -> Result<(), lettre::transport::smtp::Error> {
    use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
    let mut commands = Mail::new(envelope.from().cloned(), vec![]).to_string();
    for to in envelope.to() {
        commands.push_str(&Rcpt::new(to.clone(), vec![]).to_string());
    }
    commands.push_str(&Data.to_string());
    // `command` writes the lot and reads the first answer (MAIL's); a negative answer is an
    // error, and the caller closes the session.
    conn.command(Pipelined(commands)).await?;
    // every RCPT's answer, then DATA's (354)
    for _ in envelope.to() {
        conn.read_response().await?;
    }
    conn.read_response().await?;
    // The content and its end in one write (lettre's `message` makes two), the content being
    // allowed to start a pipelined group (RFC 2920 3.1). The caller checked it is ASCII.
    conn.command(Pipelined(with_end_of_data(email))).await?;
    Ok(())
}

/// `email` as SMTP sends it (RFC 5321 4.5.2): a line that starts with "." gets another, then
/// the end-of-data line.
fn with_end_of_data(email: &[u8]) -> String {
    let mut out = String::with_capacity(email.len() + 16);
    for line in String::from_utf8_lossy(email).split_inclusive('\n') {
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line);
    }
    out.push_str("\r\n.\r\n");
    out
}

/// A 5xx answer is permanent (the notice goes dead); anything else may pass on a retry.
fn smtp_error(e: lettre::transport::smtp::Error) -> SendError {
    if e.is_permanent() {
        SendError::Permanent(format!("SMTP: {e}"))
    } else {
        SendError::Temporary(format!("SMTP: {e}"))
    }
}

/// lettre's TLS stream (futures-io) seen as the tokio stream its protocol client reads, so
/// that an implicit-TLS session can run over a socket we opened (with TCP_NODELAY).
#[allow(deprecated)]
#[derive(Debug)]
struct TlsStream(AsyncNetworkStream);

#[allow(deprecated)]
impl AsyncTokioStream for TlsStream {
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.peer_addr()
    }
}

impl tokio::io::AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let unfilled = buf.initialize_unfilled();
        match futures_io::AsyncRead::poll_read(Pin::new(&mut self.get_mut().0), cx, unfilled) {
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl tokio::io::AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        futures_io::AsyncWrite::poll_write(Pin::new(&mut self.get_mut().0), cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        futures_io::AsyncWrite::poll_flush(Pin::new(&mut self.get_mut().0), cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        futures_io::AsyncWrite::poll_close(Pin::new(&mut self.get_mut().0), cx)
    }
}

/// A multipart text + HTML message with our own Message-ID.
pub fn build_message(
    from: &str,
    to: &str,
    mail: &RenderedEmail,
    message_id: &str,
) -> Result<Message, SendError> {
    let from: Mailbox = from
        .parse()
        .map_err(|e| SendError::Permanent(format!("email.from: {e}")))?;
    let to: Mailbox = to
        .parse()
        .map_err(|_| SendError::Permanent("the account's email address is not valid".into()))?;
    Message::builder()
        .from(from)
        .to(to)
        .subject(mail.subject.clone())
        .message_id(Some(message_id.to_string()))
        .multipart(
            MultiPart::alternative()
                .singlepart(
                    SinglePart::builder()
                        .header(ContentType::TEXT_PLAIN)
                        .body(mail.text.clone()),
                )
                .singlepart(
                    SinglePart::builder()
                        .header(ContentType::TEXT_HTML)
                        .body(mail.html.clone()),
                ),
        )
        .map_err(|e| SendError::Permanent(format!("building the message: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_dot_stuffed_and_ended_as_smtp_wants() {
        assert_eq!(
            with_end_of_data(b"Subject: x\r\n\r\n.hidden\r\nok\r\n..two"),
            "Subject: x\r\n\r\n..hidden\r\nok\r\n...two\r\n.\r\n"
        );
        assert_eq!(with_end_of_data(b""), "\r\n.\r\n");
    }
}
