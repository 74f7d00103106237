//! Text as an operator's files: a `model.toml`, a `state.json` and the event
//! rules. Each is parsed and validated; refusals are fine.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rws::model::repo::ModelConfig;
use rws::serve::events::Rules;
use rws::serve::state::Saved;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = ModelConfig::parse(text);
    let _ = Rules::parse(text);
    if let Ok(state) = Saved::parse(text) {
        // A state that parses writes back to one that parses the same.
        let json = serde_json::to_string(&state).expect("a state serializes");
        let again = Saved::parse(&json).expect("a written state parses");
        assert_eq!(serde_json::to_string(&again).unwrap(), json);
    }
});
