//! Deadlines on the wire: a call's `grpc-timeout`, counted from when the
//! transport took the call.

use std::time::{Duration, Instant};

use tonic::{Request, Status};

/// When the transport took a call, stamped by [`stamp_arrival`].
#[derive(Clone, Copy)]
pub(super) struct Arrival(Instant);

/// Stamps each call's [`Arrival`] as it enters the server's layers, before
/// tonic starts its own `grpc-timeout` timer. A deadline counted from it ends
/// no later than that timer, so the handler answers DEADLINE_EXCEEDED first
/// (tonic's timer answers CANCELLED).
pub(super) fn stamp_arrival(mut req: Request<()>) -> Result<Request<()>, Status> {
    req.extensions_mut().insert(Arrival(Instant::now()));
    Ok(req)
}

/// The instant a client's `grpc-timeout` header (e.g. `250m`, `5S`) runs out,
/// counted from the call's arrival.
pub(super) fn grpc_deadline<T>(req: &Request<T>) -> Option<Instant> {
    let timeout = parse_grpc_timeout(req.metadata().get("grpc-timeout")?.to_str().ok()?)?;
    let arrival = req
        .extensions()
        .get::<Arrival>()
        .map_or_else(Instant::now, |a| a.0);
    arrival.checked_add(timeout)
}

/// A `grpc-timeout` value (at most 8 digits and a unit, by the gRPC spec) as a
/// duration. Malformed or absurd values (whose deadline would overflow the clock)
/// mean no deadline rather than a failure: the header is the client's hint.
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_and_absurd_ones_mean_none() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "5", "5x", "-1S", "1.5S", "18446744073709551616S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        // Overflows in the multiplication: no deadline, no panic.
        assert_eq!(parse_grpc_timeout("18446744073709551615H"), None);
        assert_eq!(parse_grpc_timeout("18446744073709551615M"), None);
        let mut req = Request::new(());
        let md = req.metadata_mut();
        md.insert("grpc-timeout", "18446744073709551615S".parse().unwrap());
        assert_eq!(
            grpc_deadline(&req),
            None,
            "a deadline past the clock's end is none"
        );
        req.metadata_mut()
            .insert("grpc-timeout", "3S".parse().unwrap());
        assert!(grpc_deadline(&req).is_some());
        // Counted from the call's arrival, not from when the handler reads it.
        let arrival = Instant::now() - Duration::from_secs(1);
        req.extensions_mut().insert(Arrival(arrival));
        assert_eq!(grpc_deadline(&req), Some(arrival + Duration::from_secs(3)));
    }
}
