//! The GGUF reader on arbitrary files: an error, or metadata and tensors whose every
//! dequantization stays inside the file (no panic, no out-of-bounds read).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tributary_trainer::gguf::Gguf;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = Gguf::parse(data.to_vec()) else {
        return;
    };
    for tensor in &file.tensors {
        // Large claimed shapes are the reader's to refuse, not the fuzzer's to allocate.
        if tensor.element_count() <= 1 << 20 {
            let _ = file.dequantize(&tensor.name);
        }
    }
});
