//! PEFT adapters a stranger may hand over: `adapter_model.safetensors` and
//! `adapter_config.json` read from arbitrary bytes give an error or a valid value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tributary_shared::peft::{self, AdapterConfig};

fuzz_target!(|data: &[u8]| {
    if let Ok(delta) = peft::from_safetensors(data) {
        let again = peft::to_safetensors(&delta).expect("a read adapter writes");
        let back = peft::from_safetensors(&again).expect("a written adapter reads");
        assert_eq!(peft::to_safetensors(&back).expect("writes"), again);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = AdapterConfig::from_json(text);
    }
});
