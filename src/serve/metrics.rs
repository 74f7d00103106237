//! Prometheus metrics. The library records through the `metrics` facade (a
//! no-op until a recorder is installed, so tests and tools pay nothing); the
//! server installs the Prometheus recorder and serves it at `/metrics`.

use std::future::Future;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::{Error, Result};

pub const REQUESTS: &str = "rws_requests_total";
pub const REQUEST_SECONDS: &str = "rws_request_duration_seconds";
pub const QUEUE_SECONDS: &str = "rws_queue_wait_seconds";
pub const BATCH_SIZE: &str = "rws_batch_size";
pub const QUEUE_DEPTH: &str = "rws_queue_depth";
pub const PROFILES: &str = "rws_profiles";
pub const RESIDENT_PROFILES: &str = "rws_resident_profiles";
pub const PATCH_APPLY_SECONDS: &str = "rws_patch_apply_seconds";
pub const PROFILE_CHANGES: &str = "rws_profile_changes_total";
pub const SIGNATURES: &str = "rws_signatures";
pub const SIGNATURE_BYTES: &str = "rws_signature_bytes";
pub const GENERATION: &str = "rws_generation";
pub const FLEET_CONNECTED: &str = "rws_fleet_connected";
pub const EVENTS: &str = "rws_events_total";
pub const ACTIVATIONS: &str = "rws_activations";
pub const FLEET_APPLIED_REVISION: &str = "rws_fleet_applied_revision";
pub const TOP1_PROBABILITY: &str = "rws_top1_probability";
pub const AUTO_CHOICES: &str = "rws_auto_choices_total";
pub const SHADOW_SAMPLES: &str = "rws_shadow_samples_total";
pub const SHADOW_PROBABILITY: &str = "rws_shadow_top1_probability";
pub const SHADOW_ENTROPY: &str = "rws_shadow_entropy_nats";
pub const HEAP_BYTES: &str = "rws_heap_bytes";
pub const RESIDENT_BYTES: &str = "process_resident_memory_bytes";
pub const OPEN_FDS: &str = "process_open_fds";
pub const THREADS: &str = "process_threads";

/// Installs the process-wide Prometheus recorder once; later calls return the same handle.
pub fn install() -> Result<PrometheusHandle> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let seconds = [
        50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3,
        500e-3, 1.0, 2.5, 5.0,
    ];
    let batch = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
    // Fine near 1, where a healthy classifier's answers sit, so drift shows.
    let probability = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0];
    // Up to ln(10), the entropy of a uniform answer over ten classes.
    let entropy = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &batch))
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Suffix("_probability".into()), &probability)
        })
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_nats".into()), &entropy))
        .and_then(|b| b.install_recorder())
        .map_err(|e| Error::Internal(format!("cannot install the metrics recorder: {e}")))?;
    describe();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        REQUESTS,
        "Classification requests by profile and gRPC status."
    );
    describe_histogram!(
        REQUEST_SECONDS,
        Unit::Seconds,
        "Time from request to answer, decode included, by profile."
    );
    describe_histogram!(
        QUEUE_SECONDS,
        Unit::Seconds,
        "Time a request waited for a compute worker."
    );
    describe_histogram!(BATCH_SIZE, "Requests per batch run by a compute worker.");
    describe_gauge!(QUEUE_DEPTH, "Requests waiting for a compute worker.");
    describe_gauge!(PROFILES, "Profiles defined.");
    describe_gauge!(
        RESIDENT_PROFILES,
        "Profiles whose patched stem is in memory."
    );
    describe_histogram!(
        PATCH_APPLY_SECONDS,
        Unit::Seconds,
        "Time to materialize one profile's patched stem with the fused add-scale kernel."
    );
    describe_counter!(
        PROFILE_CHANGES,
        "Published changes to profiles and signatures, by operation."
    );
    describe_gauge!(SIGNATURES, "Signatures loaded.");
    describe_gauge!(
        SIGNATURE_BYTES,
        Unit::Bytes,
        "Bytes of signature deltas held in memory."
    );
    describe_gauge!(
        GENERATION,
        "Generation of the profile table, bumped by every change."
    );
    describe_counter!(
        EVENTS,
        "Event reports by kind and outcome (activated, extended, held, cooldown, no_rule, refused)."
    );
    describe_gauge!(
        ACTIVATIONS,
        "Activations in the table by scope and profile (ended ones until cleaned up)."
    );
    describe_histogram!(
        TOP1_PROBABILITY,
        "Softmax probability of the top class of each answer, by the profile that served it: \
         a profile drifting from its traffic shows as this falling."
    );
    describe_counter!(
        AUTO_CHOICES,
        "What the auto profile served images with: signature@alpha, or clean."
    );
    describe_counter!(
        SHADOW_SAMPLES,
        "Shadow samples by candidate profile and outcome: agreed or disagreed with the \
         served answer, dropped (server busy, queue full) or failed."
    );
    describe_histogram!(
        SHADOW_PROBABILITY,
        "Top-1 probability of the served and the candidate answers of shadow samples."
    );
    describe_histogram!(
        SHADOW_ENTROPY,
        "Entropy, in nats, of the served and the candidate answers of shadow samples."
    );
    describe_gauge!(
        RESIDENT_BYTES,
        Unit::Bytes,
        "Resident memory of the process."
    );
    describe_gauge!(OPEN_FDS, "Open file descriptors of the process.");
    describe_gauge!(THREADS, "Threads of the process.");
    describe_gauge!(
        HEAP_BYTES,
        Unit::Bytes,
        "Bytes the allocator has handed out and not had back, over all arenas: \
         unlike resident memory it does not include freed pages the allocator keeps."
    );
}

/// Refreshes the process gauges from `/proc/self`, so that every scrape sees them
/// as of now. Read directly rather than through the procfs crate: its rustix
/// backend probes the vDSO and crashes under valgrind, which the leak check uses.
fn collect_process() {
    use metrics::gauge;
    if let Some(kb) = self_status("VmRSS:") {
        gauge!(RESIDENT_BYTES).set((kb * 1024) as f64);
    }
    if let Some(n) = self_status("Threads:") {
        gauge!(THREADS).set(n as f64);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        // Counts the descriptor read_dir holds too, the same on every scrape.
        gauge!(OPEN_FDS).set(fds.count() as f64);
    }
    if let Some(bytes) = heap_bytes() {
        gauge!(HEAP_BYTES).set(bytes as f64);
    }
}

/// A number field of `/proc/self/status` (`VmRSS:` in kB, `Threads:`), on Linux.
pub fn self_status(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Heap in use, from glibc's `mallinfo2`: small blocks in use plus mmapped ones.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap_bytes() -> Option<u64> {
    // SAFETY: mallinfo2 takes no arguments and only reads the allocator's counters.
    let m = unsafe { libc::mallinfo2() };
    Some((m.uordblks + m.hblkhd) as u64)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap_bytes() -> Option<u64> {
    None
}

/// Serves the recorder's text format at `/metrics` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            collect_process();
            async move {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    handle.render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Internal(format!("metrics server failed: {e}")))
}
