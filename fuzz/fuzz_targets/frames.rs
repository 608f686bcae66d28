//! Length-prefixed frames arriving in arbitrary pieces: the decoder never panics, never holds
//! more than its cap, and yields the same messages however the bytes are split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tributary_shared::frame::FrameDecoder;
use tributary_shared::wire::ClientMessage;

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let decode = |pieces: &[&[u8]]| {
        let mut decoder = FrameDecoder::new(16 * 1024);
        let mut out = Vec::new();
        for piece in pieces {
            decoder.push(piece);
            loop {
                match decoder.next_message::<ClientMessage>() {
                    // Compared by their debug form: a message may hold a NaN.
                    Ok(Some(message)) => out.push(Ok(format!("{message:?}"))),
                    Ok(None) => break,
                    Err(error) => {
                        out.push(Err(error.to_string()));
                        return out;
                    }
                }
            }
        }
        out
    };
    let whole = decode(&[bytes]);
    let at = usize::from(split).min(bytes.len());
    let (head, tail) = bytes.split_at(at);
    let pieces = decode(&[head, tail]);
    assert_eq!(whole, pieces, "splitting the stream changed what it decodes to");
});
