//! The phases of a shutdown that load balancers can follow, shared by the gRPC
//! server and the side endpoints.
//!
//! Kubernetes removes a terminating pod from its endpoints at the same time as
//! it sends SIGTERM, and every proxy learns it a little later. So:
//! 1. **Draining** (at the signal): health says NOT_SERVING, and every request
//!    is still served, through the grace period, while traffic moves away.
//! 2. **Closing** (after the grace): the listeners close, the engine refuses
//!    what still arrives on open connections (UNAVAILABLE), health `Watch`
//!    streams and the console's event streams end, and in-flight work finishes
//!    within the drain timeout; whatever is left then is cut.

use std::future::Future;

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    Draining,
    Closing,
}

/// A handle on the phase; clones share it.
#[derive(Clone)]
pub struct Shutdown {
    phase: watch::Sender<Phase>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            phase: watch::Sender::new(Phase::Serving),
        }
    }
}

impl Shutdown {
    /// Moves on to `phase` (never back).
    pub fn enter(&self, phase: Phase) {
        self.phase.send_if_modified(|p| {
            let later = phase > *p;
            if later {
                *p = phase;
            }
            later
        });
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Resolves once the phase is `phase` or later.
    pub fn reached(&self, phase: Phase) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.phase.subscribe();
        async move {
            // The sender lives as long as any handle; if all are gone, so is the server.
            let _ = rx.wait_for(|p| *p >= phase).await;
        }
    }

    /// Resolves when listeners must close.
    pub fn closing(&self) -> impl Future<Output = ()> + Send + 'static {
        self.reached(Phase::Closing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn phases_only_move_forward_and_late_waiters_resolve_at_once() {
        let s = Shutdown::default();
        let closing = tokio::spawn(s.closing());
        s.enter(Phase::Draining);
        tokio::task::yield_now().await;
        assert!(!closing.is_finished());
        s.enter(Phase::Closing);
        closing.await.unwrap();
        s.enter(Phase::Draining);
        assert_eq!(s.phase(), Phase::Closing);
        s.reached(Phase::Draining).await;
    }
}
