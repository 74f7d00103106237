//! Bytes as an uploaded image: decoded within the size limits and turned into
//! the model's input, for a grey and an RGB model. An accepted image gives
//! exactly C·H·W finite values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rws::serve::preprocess::{Input, to_chw};

fuzz_target!(|data: &[u8]| {
    let input = Input::Image(data.to_vec());
    for cfg in rws_fuzz::configs() {
        if let Ok(x) = to_chw(&input, cfg) {
            let [h, w] = cfg.input_size;
            assert_eq!(x.len(), cfg.channels * h * w);
            assert!(x.iter().all(|v| v.is_finite()));
        }
    }
});
