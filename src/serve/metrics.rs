//! Prometheus metrics. The library records through the `metrics` facade (a
//! no-op until a recorder is installed, so tests and tools pay nothing); the
//! server installs the Prometheus recorder, and the wire layer serves it at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Mutex, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

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
pub const DECODE_WAIT_SECONDS: &str = "rws_decode_wait_seconds";
pub const DECODES_IN_FLIGHT: &str = "rws_decodes_in_flight";
pub const DECODE_PIXELS_IN_FLIGHT: &str = "rws_decode_pixels_in_flight";
pub const SHED: &str = "rws_shed_total";
pub const CANCELLED: &str = "rws_cancelled_total";
pub const WORKER_PANICS: &str = "rws_worker_panics_total";
pub const CPU_KERNEL_INFO: &str = "rws_cpu_kernel_info";

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
    metrics::gauge!(CPU_KERNEL_INFO, "isa" => crate::model::blocked::kernel::isa().name()).set(1.0);
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
    describe_histogram!(
        DECODE_WAIT_SECONDS,
        Unit::Seconds,
        "Time a request waited for a decode slot, by lane (small, large)."
    );
    describe_gauge!(DECODES_IN_FLIGHT, "Images being decoded, by lane.");
    describe_gauge!(
        CPU_KERNEL_INFO,
        "1, labelled with the instruction set the CPU kernels run with here."
    );
    describe_gauge!(
        DECODE_PIXELS_IN_FLIGHT,
        "Pixels of the images being decoded in the large lane."
    );
    describe_counter!(
        SHED,
        "Requests refused before any work by admission, by reason (peer_limit, \
         decode_deadline, overloaded)."
    );
    describe_counter!(
        CANCELLED,
        "Requests whose caller had gone or whose deadline had passed when their \
         work came up, by stage (decode, compute): that work was skipped."
    );
    describe_counter!(
        WORKER_PANICS,
        "Compute batches that panicked; their requests got INTERNAL and the worker was replaced."
    );
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

/// Activations in the published table by (scope, profile). Rendered by
/// [`render`] after the recorder's text rather than held as gauges: the
/// `metrics` facade cannot remove a series, and a gauge per pair would stay
/// after its activation, one more series for every scope ever activated.
static ACTIVATION_COUNTS: Mutex<BTreeMap<(String, String), usize>> = Mutex::new(BTreeMap::new());

/// Sets what `rws_activations` shows: the counts of the table just published.
pub fn set_activations(counts: BTreeMap<(String, String), usize>) {
    *ACTIVATION_COUNTS.lock().unwrap_or_else(|e| e.into_inner()) = counts;
}

/// The text a scrape gets: the recorder's, then the activations.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    let counts = ACTIVATION_COUNTS.lock().unwrap_or_else(|e| e.into_inner());
    render_activations(&counts, &mut text);
    text
}

/// Appends the `rws_activations` family to `out`: one sample per pair, and
/// nothing without activations.
fn render_activations(counts: &BTreeMap<(String, String), usize>, out: &mut String) {
    use metrics_exporter_prometheus::formatting::{
        sanitize_label_value, write_help_line, write_type_line,
    };
    if counts.is_empty() {
        return;
    }
    write_help_line(
        out,
        ACTIVATIONS,
        None,
        None,
        "Activations in the table by scope and profile (ended ones until cleaned up).",
    );
    write_type_line(out, ACTIVATIONS, None, None, "gauge");
    for ((scope, profile), n) in counts {
        let (scope, profile) = (sanitize_label_value(scope), sanitize_label_value(profile));
        // Writing to a String does not fail.
        let _ = writeln!(
            out,
            "{ACTIVATIONS}{{scope=\"{scope}\",profile=\"{profile}\"}} {n}"
        );
    }
    out.push('\n');
}

/// Refreshes the process gauges from `/proc/self`, so that every scrape sees them
/// as of now. Read directly rather than through the procfs crate: its rustix
/// backend probes the vDSO and crashes under valgrind, which the leak check uses.
pub fn collect_process() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_render_as_they_are_and_ended_pairs_vanish() {
        let pair = |s: &str, p: &str| (s.to_string(), p.to_string());
        let mut out = String::new();
        let counts = BTreeMap::from([(pair("site-a/", "fog"), 2), (pair("*", "rain"), 1)]);
        render_activations(&counts, &mut out);
        let samples: Vec<_> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                r#"rws_activations{scope="*",profile="rain"} 1"#,
                r#"rws_activations{scope="site-a/",profile="fog"} 2"#,
                "",
            ]
        );
        assert!(out.contains("# TYPE rws_activations gauge\n"), "{out}");
        let mut out = String::new();
        render_activations(&BTreeMap::new(), &mut out);
        assert_eq!(out, "", "no family without activations");
    }
}
