//! `arrears bench-email`: how fast `deliver_notifications` empties the outbox into a mail
//! server, against the fastest client of the same server.
//!
//! The main reference is postfix's `smtp-sink` (it accepts and discards, so the server is not
//! the limit) and postfix's own load generator `smtp-source -d -s 16` sending the same number
//! of messages of the same size to it, in the same run. With `--smtp-url`, a second server
//! (aiosmtpd in the README) is measured the same way against a plain load generator.

use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;

use crate::bench::BenchError;
use crate::config::Config;
use crate::db::{self, Db, MigrationMode};
use crate::jobs::deliver_notifications::{self, Channels};

/// The target: arrears at least a quarter of smtp-source's rate.
pub const TARGET_RATIO: f64 = 0.25;

#[derive(Debug, Clone)]
pub struct EmailBenchOptions {
    pub count: u64,
    /// Parallel sessions of the load generators (smtp-source -s, the plain generator).
    pub connections: usize,
    /// A second SMTP server to measure against (a local one: `count` messages are sent).
    pub smtp_url: Option<String>,
    /// Rounds against smtp-sink (arrears, then smtp-source); the median round's ratio is
    /// the one judged.
    pub rounds: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EmailBenchReport {
    pub count: u64,
    pub message_bytes: usize,
    pub smtp_pool_size: u32,
    pub concurrency: usize,
    pub batch_size: usize,
    /// arrears and smtp-source against postfix's smtp-sink.
    pub smtp_sink: Comparison,
    pub target_ratio: f64,
    pub target_met: bool,
    /// arrears and the plain generator against `--smtp-url`, when given.
    pub second_server: Option<Comparison>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub server: String,
    pub reference: String,
    /// deliver_notifications: claim from the outbox, check the cause, render, send through
    /// the pool, record each outcome.
    pub arrears_seconds: f64,
    pub arrears_emails_per_second: f64,
    pub reference_seconds: f64,
    pub reference_emails_per_second: f64,
    /// arrears' rate over the reference's: the median round's.
    pub ratio: f64,
    /// Every round, in the order run.
    pub rounds: Vec<Round>,
}

/// One round: `count` notices delivered by arrears, then as many messages by the reference.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub arrears_seconds: f64,
    pub arrears_emails_per_second: f64,
    pub reference_seconds: f64,
    pub reference_emails_per_second: f64,
    pub ratio: f64,
}

impl Comparison {
    /// The median round's figures (by ratio), with every round.
    fn of(server: String, reference: String, rounds: Vec<Round>) -> Comparison {
        let mut by_ratio = rounds.clone();
        by_ratio.sort_by(|a, b| a.ratio.total_cmp(&b.ratio));
        let median = &by_ratio[by_ratio.len() / 2];
        Comparison {
            server,
            reference,
            arrears_seconds: median.arrears_seconds,
            arrears_emails_per_second: median.arrears_emails_per_second,
            reference_seconds: median.reference_seconds,
            reference_emails_per_second: median.reference_emails_per_second,
            ratio: median.ratio,
            rounds,
        }
    }
}

impl Round {
    fn new(count: u64, arrears_seconds: f64, reference_seconds: f64) -> Round {
        let count = count as f64;
        Round {
            arrears_seconds,
            arrears_emails_per_second: count / arrears_seconds,
            reference_seconds,
            reference_emails_per_second: count / reference_seconds,
            ratio: reference_seconds / arrears_seconds,
        }
    }
}

/// `smtp-source -d -s CONNECTIONS -m COUNT -l BYTES` against the sink on `port`; its seconds.
async fn smtp_source(opts: &EmailBenchOptions, port: u16, bytes: usize) -> Result<f64, BenchError> {
    let t = Instant::now();
    let out = tokio::process::Command::new(postfix_tool("smtp-source")?)
        .args(["-d", "-s", &opts.connections.max(1).to_string()])
        .args(["-m", &opts.count.to_string(), "-l", &bytes.to_string()])
        .args(["-f", "bench@example.com", "-t", "user@example.com"])
        .arg(format!("127.0.0.1:{port}"))
        .output()
        .await?;
    let seconds = t.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(other(format!(
            "smtp-source failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(seconds)
}

fn other(e: impl std::fmt::Display) -> BenchError {
    BenchError::Io(std::io::Error::other(e.to_string()))
}

/// A postfix tool from PATH or /usr/sbin, or an error saying how to install it.
fn postfix_tool(name: &str) -> Result<std::path::PathBuf, BenchError> {
    let dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    dirs.into_iter()
        .chain([std::path::PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            other(format!(
                "{name} not found: install postfix's tools (Debian: apt-get install postfix)"
            ))
        })
}

/// `smtp-sink` on a free local port, killed when dropped.
struct Sink {
    child: tokio::process::Child,
    port: u16,
}

impl Sink {
    async fn start() -> Result<Sink, BenchError> {
        let bin = postfix_tool("smtp-sink")?;
        let port = crate::db::embedded::free_port()?;
        let mut cmd = tokio::process::Command::new(bin);
        // smtp-sink refuses to run as root without a user to switch to.
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            cmd.args(["-u", "nobody"]);
        }
        let child = cmd
            .arg(format!("127.0.0.1:{port}"))
            .arg("1000")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                return Err(other(format!("smtp-sink did not listen on port {port}")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Sink { child, port })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

pub async fn run(
    config: &Config,
    opts: &EmailBenchOptions,
) -> Result<EmailBenchReport, BenchError> {
    let base = Db::open(config, MigrationMode::Apply).await?;
    let admin = db::raw_connect(&db::with_database(&base.url, "postgres")?).await?;
    let url = db::recreate_database(&base.url, "arrears_bench_email").await?;
    let db = Db::open_url(&url, 8, MigrationMode::Apply).await?;
    let client = db.raw_client().await?;
    let n = opts.count as i64;
    // Raw SQL: bench accounts from generate_series(), a set diesel has no table for.
    client
        .execute(
            "INSERT INTO accounts (id, name, email, locale, timezone, created_at, updated_at)
             SELECT 'm' || i, 'Mail ' || i, 'user' || i || '@example.com', 'en', 'Asia/Shanghai', now(), now()
             FROM generate_series(1, $1::bigint) i",
            &[&n],
        )
        .await?;
    let vars = crate::notify::templates::sample_vars();
    let sink = Sink::start().await?;
    let sink_url = format!("smtp://127.0.0.1:{}?tls=none", sink.port);

    // Rounds, each arrears then smtp-source on fresh notices: on a shared machine either
    // rate moves by a fifth from one minute to the next, so the ratio judged is the median
    // round's, and every round is reported.
    let mut bytes = Vec::new();
    let mut rounds = Vec::new();
    for round in 1..=opts.rounds.max(1) {
        let tag = format!("sink{round}");
        let (arrears_seconds, channels) =
            deliver(&db, config, &sink_url, &tag, round as i32, n, &vars).await?;
        if bytes.is_empty() {
            // The same message, as bytes: its size for smtp-source, its bytes for the plain
            // generator.
            let mail = channels
                .templates
                .email(crate::notify::NoticeKind::Overdue, "en", &vars)
                .map_err(other)?;
            bytes = crate::notify::email::build_message(
                "Bench <bench@example.com>",
                "user@example.com",
                &mail,
                "<plain@example.com>",
            )
            .map_err(other)?
            .formatted();
        }
        let source_seconds = smtp_source(opts, sink.port, bytes.len()).await?;
        rounds.push(Round::new(opts.count, arrears_seconds, source_seconds));
    }
    drop(sink);
    let smtp_sink = Comparison::of(
        "postfix smtp-sink".into(),
        format!("smtp-source -d -s {}", opts.connections.max(1)),
        rounds,
    );

    let second_server = match &opts.smtp_url {
        None => None,
        Some(url) => {
            let episode = opts.rounds.max(1) as i32 + 1;
            let (arrears_seconds, _) =
                deliver(&db, config, url, "second", episode, n, &vars).await?;
            let settings = crate::notify::email::SmtpSettings::parse(url).map_err(other)?;
            let t = Instant::now();
            let conns = opts.connections.max(1) as u64;
            let per_conn = opts.count / conns;
            let mut tasks = Vec::new();
            for c in 0..conns {
                let (host, port, body) = (settings.host.clone(), settings.port, bytes.clone());
                let k = if c == 0 {
                    opts.count - per_conn * (conns - 1)
                } else {
                    per_conn
                };
                tasks.push(tokio::spawn(async move {
                    plain_smtp(&host, port, &body, k).await
                }));
            }
            for task in tasks {
                task.await.map_err(other)??;
            }
            let plain_seconds = t.elapsed().as_secs_f64();
            Some(Comparison::of(
                url.clone(),
                format!("a plain SMTP client, {conns} connections"),
                vec![Round::new(opts.count, arrears_seconds, plain_seconds)],
            ))
        }
    };
    drop(client);
    drop(db);
    // Raw SQL: DROP DATABASE is DDL, which diesel's query builder does not say.
    admin
        .batch_execute("DROP DATABASE IF EXISTS arrears_bench_email WITH (FORCE)")
        .await?;
    Ok(EmailBenchReport {
        count: opts.count,
        message_bytes: bytes.len(),
        smtp_pool_size: config.email.pool_size,
        concurrency: config.notifications.concurrency,
        batch_size: config.notifications.batch_size,
        target_met: smtp_sink.ratio >= TARGET_RATIO,
        target_ratio: TARGET_RATIO,
        smtp_sink,
        second_server,
    })
}

/// Queues `n` overdue alerts (one per account, each in its open arrears episode `episode`,
/// keys under `tag`) and times
/// `deliver_notifications` sending them all to `smtp_url`.
async fn deliver(
    db: &Db,
    config: &Config,
    smtp_url: &str,
    tag: &str,
    episode: i32,
    n: i64,
    vars: &serde_json::Value,
) -> Result<(f64, Channels), BenchError> {
    let client = db.raw_client().await?;
    // Each account in its own open arrears episode, so that the overdue alert is still true
    // at delivery and its acceptance writes the episode's first accepted alert (R2).
    // Raw SQL: benchmark scaffolding (rows from generate_series()) on the bench's raw client.
    client
        .batch_execute(
            "UPDATE arrears_episodes SET closed_at = now(), close_reason = 'paid', closed_by = 'bench' WHERE closed_at IS NULL",
        )
        .await?;
    client
        .execute(
            "INSERT INTO arrears_episodes (account_id, no, opened_at, opened_by)
             SELECT 'm' || i, $2, now(), 'bench' FROM generate_series(1, $1::bigint) i",
            &[&n, &episode],
        )
        .await?;
    client
        .execute(
            "UPDATE accounts SET cash_balance = -1000000, episode = $1",
            &[&episode],
        )
        .await?;
    let mut payload = vars.clone();
    payload["_about"] = serde_json::json!([{"topic": "overdue", "episode": episode}]);
    // Raw SQL: bench notices from generate_series(), then VACUUM ANALYZE: diesel can say neither.
    client
        .execute(
            "INSERT INTO notices (account_id, kind, channel, dedupe_key, payload, episode, next_attempt_at, created_at)
             SELECT 'm' || i, 'overdue', 'email', $4 || ':' || i, $2, $3, now(), now()
             FROM generate_series(1, $1::bigint) i",
            &[&n, &payload, &episode, &tag],
        )
        .await?;
    client.batch_execute("VACUUM ANALYZE notices").await?;
    drop(client);
    let mut cfg = config.clone();
    cfg.email.smtp_url = Some(smtp_url.to_string());
    cfg.email.from = Some("Bench <bench@example.com>".into());
    let channels = Channels::from_config(&cfg).map_err(other)?;
    let t = Instant::now();
    let rep = deliver_notifications::run(
        db,
        &cfg,
        &channels,
        &deliver_notifications::Options {
            as_of: Utc::now() + chrono::Duration::minutes(1),
            dry_run: false,
            max_batches: usize::MAX,
        },
    )
    .await?;
    let seconds = t.elapsed().as_secs_f64();
    if rep.sent as i64 != n {
        return Err(other(format!(
            "only {} of {n} sent to {smtp_url}: {:?} {:?}",
            rep.sent, rep.failures, rep.cancelled_reasons
        )));
    }
    Ok((seconds, channels))
}

/// A minimal SMTP client on one connection: EHLO once, then MAIL/RCPT/DATA per message.
async fn plain_smtp(host: &str, port: u16, body: &[u8], count: u64) -> Result<(), BenchError> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::TcpStream::connect((host, port)).await?;
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    async fn reply(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Result<(), BenchError> {
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).await? == 0 {
                return Err(other("connection closed"));
            }
            if !line.starts_with('2') && !line.starts_with('3') {
                return Err(other(format!("server said {line}")));
            }
            if line.as_bytes().get(3) == Some(&b' ') {
                return Ok(());
            }
        }
    }
    reply(&mut r).await?;
    w.write_all(b"EHLO bench\r\n").await?;
    reply(&mut r).await?;
    let mut data = body.to_vec();
    data.extend_from_slice(b"\r\n.\r\n");
    for _ in 0..count {
        w.write_all(b"MAIL FROM:<bench@example.com>\r\n").await?;
        reply(&mut r).await?;
        w.write_all(b"RCPT TO:<user@example.com>\r\n").await?;
        reply(&mut r).await?;
        w.write_all(b"DATA\r\n").await?;
        reply(&mut r).await?;
        w.write_all(&data).await?;
        reply(&mut r).await?;
    }
    w.write_all(b"QUIT\r\n").await?;
    Ok(())
}
