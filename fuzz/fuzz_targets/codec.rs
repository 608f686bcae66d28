//! The delta decoder on arbitrary bytes: an error or a delta within the element bound; a
//! lossless (f32) delta encodes back to exactly the bytes it came from (one canonical form).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tributary_shared::codec::{self, Codec};

const MAX_ELEMENTS: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Ok(delta) = codec::decode(data, MAX_ELEMENTS) else {
        return;
    };
    assert!(delta.element_count() <= MAX_ELEMENTS);
    if let Ok((Codec::F32, _)) = codec::peek_layout(data) {
        let again = codec::encode_to_vec(&delta, Codec::F32).expect("a decoded delta encodes");
        assert_eq!(again, data, "two encodings of one delta");
    }
});
