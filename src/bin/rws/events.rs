//! `rws events report` and `rws events replay`: weather and sensor events sent to a
//! running server, one by one or from a recorded day.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use rws::serve::events::Event;
use rws::server::pb;

use crate::client::Client;

#[derive(Subcommand)]
pub enum EventsCmd {
    /// Report one event: `rws events report fog --severity 3 --scope site-a/`.
    Report {
        /// fog, snow, rain, contrast, brightness, gaussian_noise, ...
        kind: String,
        #[arg(long)]
        severity: u32,
        /// `*`, a source prefix ending in `/`, or one source.
        #[arg(long)]
        scope: String,
        /// How long it holds, e.g. 30m (default: the rule's TTL).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Your id for it, kept in the audit trail.
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        client: Client,
    },
    /// Replay a recorded JSON-lines file of events (each with `observed_at`) against a
    /// server, `--speed` times faster than recorded. TTLs are divided by the speed too,
    /// so the server sees the day compressed; its rules' durations are its own.
    Replay {
        file: PathBuf,
        #[arg(long, default_value_t = 60.0)]
        speed: f64,
        #[command(flatten)]
        client: Client,
    },
}

pub async fn events(cmd: EventsCmd) -> Result<()> {
    match cmd {
        EventsCmd::Report {
            kind,
            severity,
            scope,
            duration,
            id,
            client,
        } => {
            let report = pb::EventReport {
                kind,
                severity,
                scope,
                ttl_seconds: duration.map_or(0.0, |d| d.as_secs_f64()),
                id: id.unwrap_or_default(),
                ..Default::default()
            };
            let o = client.connect().await?.report(report).await?;
            println!("{}", describe(&o));
        }
        EventsCmd::Replay {
            file,
            speed,
            client,
        } => replay(&file, speed, &client).await?,
    }
    Ok(())
}

fn describe(o: &pb::EventOutcome) -> String {
    match o.activation_id.as_str() {
        "" => o.outcome.clone(),
        id => {
            let left = o
                .until_unix_ms
                .saturating_sub(rws::serve::activation::now_ms());
            format!(
                "{:<10} {} -> {} for {:.1} s",
                o.outcome,
                id,
                o.profile,
                left as f64 / 1000.0
            )
        }
    }
}

async fn replay(file: &PathBuf, speed: f64, client: &Client) -> Result<()> {
    if !(speed.is_finite() && speed > 0.0) {
        bail!("--speed must be a positive number");
    }
    let text =
        std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut events = Vec::new();
    for (i, line) in std::io::BufReader::new(text).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let e: Event = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not an event", file.display(), i + 1))?;
        let at = e.observed_at.as_deref().with_context(|| {
            format!(
                "{}:{}: a replayed event needs observed_at",
                file.display(),
                i + 1
            )
        })?;
        let at = humantime::parse_rfc3339_weak(at).with_context(|| {
            format!("{}:{}: observed_at is not RFC 3339", file.display(), i + 1)
        })?;
        events.push((at.duration_since(UNIX_EPOCH)?, e));
    }
    let Some(t0) = events.first().map(|(t, _)| *t) else {
        bail!("{} holds no events", file.display());
    };
    let mut rws = client.connect().await?;
    let start = Instant::now();
    for (at, e) in events {
        let offset = at.saturating_sub(t0).div_f64(speed);
        tokio::time::sleep_until((start + offset).into()).await;
        let recorded = e.observed_at.clone().unwrap_or_default();
        let report = pb::EventReport {
            kind: e.kind.clone(),
            severity: e.severity.into(),
            scope: e.scope.clone(),
            // The server's clock, not the recording's: the day is replayed now.
            observed_at: String::new(),
            ttl_seconds: e.ttl_seconds.map_or(0.0, |t| t / speed),
            id: e.id.clone().unwrap_or_default(),
        };
        let outcome = match rws.report(report).await {
            Ok(o) => describe(&o),
            Err(err) => format!("refused: {err}"),
        };
        println!(
            "{recorded}  {:<15} {} {:<14} {outcome}",
            e.kind, e.severity, e.scope
        );
    }
    Ok(())
}
