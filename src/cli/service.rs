//! `arrears serve`: the daemon, on the wall clock or (with --as-of) a simulated one.

use std::process::ExitCode;

use anyhow::{Context, Result};
use arrears::scheduler::{Clock, Schedule};

use super::{guard_time_travel, open, Env};

pub async fn serve(env: &Env, speed: u32) -> Result<ExitCode> {
    let config = &env.config;
    let schedule = Schedule::load(config.service.jobs_dir.as_deref())?;
    if env.explicit_as_of.is_some() && !config.lifecycle.allow_future {
        guard_time_travel(&open(config).await?, config, env.explicit_as_of).await?;
    }
    let clock = match env.explicit_as_of {
        Some(start) => Clock::simulated(start, speed),
        None => Clock::Wall,
    };
    let addr = config.service.http_addr.clone();
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("listening on {addr} (service.http_addr / ARREARS_HTTP_ADDR)"))?;
    tracing::info!(addr = %listener.local_addr()?, "HTTP listening");
    arrears::service::serve(config.clone(), schedule, clock, listener).await?;
    Ok(ExitCode::SUCCESS)
}
