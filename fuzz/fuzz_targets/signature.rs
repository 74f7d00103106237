//! Bytes as an uploaded signature file: parsed, written back, checked against
//! the shipped model and, when it fits, folded into a stem. Refusals are
//! fine; a panic, a hang or an over-allocation is a finding.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use rws::patch::signature::Signature;

fuzz_target!(|data: &[u8]| {
    let Ok(sig) = Signature::from_bytes(data) else {
        return;
    };
    // What parses writes back to a file that parses to the same signature.
    let bytes = sig.to_bytes().expect("a parsed signature serializes");
    let again = Signature::from_bytes(&bytes).expect("a written signature parses");
    assert_eq!(again.to_bytes().unwrap(), bytes, "round trip");
    let model = rws_fuzz::model();
    if model.check_signature(&sig, true).is_ok() {
        let sig = Arc::new(sig);
        let alpha = sig.meta.default_alpha;
        let _ = model.materialize(&[(&sig, alpha)]);
    }
});
