//! The `arrears` command line: parses the arguments, sets up logging, runs the command
//! (src/cli/, one module per command group) and maps its outcome to an exit status. anyhow
//! lives here and in src/cli/ only; the library's errors are typed.

mod cli;

use std::process::ExitCode;

use arrears::config::Config;
use clap::Parser;
use cli::{BadInput, Cli, Command};

/// Exit statuses (README "Exit codes"): 0 done or allowed; 1 refused by `gate`, or bad input
/// to any other command; 2 any other error, and every error of `gate`; 75 a job run skipped
/// because another live runner holds its slot (not done: try again later).
const EXIT_BAD_INPUT: u8 = 1;
const EXIT_ERROR: u8 = 2;
const EXIT_SLOT_HELD: u8 = 75;

fn main() -> ExitCode {
    // `arrears ... --json | head`: the reader went away. Rust's print macros panic on it (with a
    // backtrace); a command-line tool stops quietly instead, with the status a shell gives a
    // process that SIGPIPE ended (128 + 13). The signal itself stays ignored: sockets must
    // keep failing with an error, not end the process.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            let _ = e.print();
            // Bad arguments are bad input (1), except to `gate`, whose 1 means refused.
            let gate = std::env::args().skip(1).any(|a| a == "gate");
            return ExitCode::from(if gate { EXIT_ERROR } else { EXIT_BAD_INPUT });
        }
    };
    // The demo and simulate drive thousands of short slots one after the other, each a few
    // dozen round trips: on one thread, a reply wakes the task that waits for it without a
    // cross-thread wake-up (on this 2-core VM, 60% of the demo's time was the kernel waking
    // and parking the other worker). A one-off job run and the email benchmark wait on the
    // database and the mail server too, never on arrears' own CPU: one thread spent a tenth
    // less CPU per notice delivered (bench-email, BENCHMARKS.md). The service keeps one
    // worker per core, so that its HTTP API answers while a job renders a large batch.
    let sequential = matches!(
        cli.command,
        Command::Demo(_) | Command::Simulate(_) | Command::Run(_) | Command::BenchEmail(_)
    );
    let runtime = if sequential {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
    .enable_all()
    .build()
    .expect("the tokio runtime starts");
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    init_logging(&cli);
    let gate = matches!(cli.command, Command::Gate { .. });
    match cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(if gate { EXIT_ERROR } else { exit_code_of(&e) })
        }
    }
}

/// 1 when the error is about the command's input (arguments, files, configuration, unknown
/// names, a refused reference or day), 2 for everything else (the database, I/O, bugs).
fn exit_code_of(e: &anyhow::Error) -> u8 {
    use arrears::config::ConfigError;
    use arrears::db::{catalog::PricesError, DbError};
    use arrears::domain::money::DecimalError;
    use arrears::import::ImportError;
    use arrears::jobs::JobError;
    use arrears::ledger::LedgerError;
    use arrears::lifecycle::LifecycleError;
    for cause in e.chain() {
        let input = if cause.is::<BadInput>()
            || cause.is::<ConfigError>()
            || cause.is::<DecimalError>()
            || cause.is::<PricesError>()
            // the jobs folder and the templates are the operator's configuration too
            || cause.is::<arrears::scheduler::ScheduleError>()
            || cause.is::<arrears::notify::templates::TemplateError>()
        {
            Some(true)
        } else if let Some(l) = cause.downcast_ref::<LedgerError>() {
            Some(!matches!(l, LedgerError::Db(_)))
        } else if let Some(i) = cause.downcast_ref::<ImportError>() {
            Some(!matches!(i, ImportError::Db(_)))
        } else if let Some(l) = cause.downcast_ref::<LifecycleError>() {
            Some(!matches!(l, LifecycleError::Db(_)))
        } else if let Some(j) = cause.downcast_ref::<JobError>() {
            Some(matches!(j, JobError::Refused(_)))
        } else if let Some(d) = cause.downcast_ref::<DbError>() {
            Some(matches!(
                d,
                DbError::Prices(PricesError::NotAfterLatest { .. }) | DbError::MoneyMismatch(_)
            ))
        } else {
            None
        };
        if let Some(input) = input {
            return if input { EXIT_BAD_INPUT } else { EXIT_ERROR };
        }
    }
    EXIT_ERROR
}

/// CLI commands log warnings to stderr as text; `serve` logs info and up as JSON lines to
/// stdout (or text, or to journald: service.log_format). ARREARS_LOG sets the filter.
fn init_logging(cli: &Cli) {
    use tracing_subscriber::prelude::*;
    let serving = matches!(cli.command, Command::Serve { .. });
    let filter = tracing_subscriber::EnvFilter::try_from_env("ARREARS_LOG")
        .unwrap_or_else(|_| if serving { "info" } else { "warn" }.into());
    let format = if serving {
        // The format is read before the configuration is validated; a bad value is reported
        // by Config::load and falls back to JSON here.
        Config::load(cli.config.as_deref())
            .map(|c| c.service.log_format)
            .unwrap_or_else(|_| "json".into())
    } else {
        "text".into()
    };
    let registry = tracing_subscriber::registry().with(filter);
    match format.as_str() {
        "journald" => match tracing_journald::layer() {
            Ok(layer) => registry.with(layer).init(),
            Err(e) => {
                registry
                    .with(
                        tracing_subscriber::fmt::layer()
                            .json()
                            .with_writer(std::io::stdout),
                    )
                    .init();
                tracing::warn!(error = %e, "journald is not reachable; logging JSON to stdout");
            }
        },
        "json" => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stdout),
            )
            .init(),
        _ => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init(),
    }
}
