//! Every message type the coordinator or a trainer decodes from a peer: arbitrary payloads give
//! an error or a message whose encoding decodes and encodes to the same bytes (compared as bytes,
//! since a message may hold a NaN).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tributary_shared::frame::{from_payload, to_payload};
use tributary_shared::wire::{
    ClientMessage, DownloadRequest, DownloadResponse, ServerMessage, UploadHeader,
};

fn check<T>(data: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    if let Ok(message) = from_payload::<T>(data) {
        let again = to_payload(&message).expect("a decoded message encodes");
        let back: T = from_payload(&again).expect("an encoded message decodes");
        assert_eq!(to_payload(&back).expect("encodes"), again);
    }
}

fuzz_target!(|data: &[u8]| {
    check::<ClientMessage>(data);
    check::<ServerMessage>(data);
    check::<UploadHeader>(data);
    check::<DownloadRequest>(data);
    check::<DownloadResponse>(data);
});
