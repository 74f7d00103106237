//! Where the process's spans and logs go: log lines to stderr (text or JSON,
//! level from RUST_LOG), and with `serve --otlp-endpoint`, the server's spans
//! (classify with its profile, source and activation; decode, batch with its
//! queue time, stem, forward, patch_apply) to an OpenTelemetry collector over OTLP.

use anyhow::{Context, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps the span exporter alive; [`Telemetry::shutdown`] flushes what is pending.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Sets up logging, and span export when `otlp_endpoint` is given.
pub fn init(json: bool, otlp_endpoint: Option<&str>) -> Result<Telemetry> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match json {
        true => logs.json().with_filter(filter).boxed(),
        false => logs.with_filter(filter).boxed(),
    };
    let provider = otlp_endpoint
        .map(|endpoint| {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .with_context(|| format!("cannot set up OTLP export to {endpoint}"))?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name("rws")
                .build();
            // Exported from tokio's runtime, which the tonic client needs.
            let processor =
                opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                    exporter,
                    opentelemetry_sdk::runtime::Tokio,
                )
                .build();
            anyhow::Ok(
                SdkTracerProvider::builder()
                    .with_span_processor(processor)
                    .with_resource(resource)
                    .build(),
            )
        })
        .transpose()?;
    // The server's own spans, down to the per-batch ones, whatever RUST_LOG says.
    let spans = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("rws"))
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("rws", tracing::Level::DEBUG),
            )
    });
    tracing_subscriber::registry().with(logs).with(spans).init();
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Exports the spans still buffered. The exporter's flush blocks its thread
    /// while it waits on a task of this runtime, so it runs off the runtime's
    /// workers, and a collector that does not answer delays exit by 5 s at most.
    pub async fn shutdown(self) {
        let Some(p) = self.provider else { return };
        let flush = tokio::task::spawn_blocking(move || p.shutdown());
        match tokio::time::timeout(std::time::Duration::from_secs(5), flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("rws: OTLP export did not finish: {e}"),
            Ok(Err(e)) => eprintln!("rws: OTLP export did not finish: {e}"),
            Err(_) => eprintln!("rws: OTLP export did not finish within 5 s; spans dropped"),
        }
    }
}
