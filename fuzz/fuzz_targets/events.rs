//! Bytes as a reported event (JSON, as `POST /v1/events` takes it): parsed,
//! checked, and decided on by the example rules against the shipped model's
//! profiles.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use rws::serve::events::{Event, Events, Rules};
use rws::serve::registry::Registry;

/// 2026-11-27T06:00:00Z, among the seed events' observation times.
const NOW_MS: u64 = 1_795_759_200_000;

fn fixture() -> &'static (Events, Registry) {
    static F: OnceLock<(Events, Registry)> = OnceLock::new();
    F.get_or_init(|| {
        let rules = include_str!("../../examples/events/rules.toml");
        let events = Events::new(Rules::parse(rules).expect("the example rules"));
        let registry = Registry::new(Arc::clone(rws_fuzz::model()), 4).expect("a registry");
        (events, registry)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(event) = serde_json::from_slice::<Event>(data) else {
        return;
    };
    let Ok(checked) = event.check(NOW_MS) else {
        return;
    };
    let (events, registry) = fixture();
    let _ = events.decide(&checked, &registry.snapshot(), NOW_MS);
});
