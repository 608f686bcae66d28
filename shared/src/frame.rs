//! Length-prefixed frames and the one place that knows the message serialization (bincode 2).
//!
//! A frame is a little-endian `u32` payload length followed by the payload, a bincode-encoded
//! message. Every reader enforces a hard cap on the length before buffering the payload, so a
//! peer cannot make us allocate more than the cap. Moving to another serialization (postcard,
//! say) changes only [`to_payload`] and [`from_payload`].

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Bytes in the length prefix.
pub const PREFIX_LEN: usize = 4;
/// Default cap on a control frame's payload: 1 MiB.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// A frame that could not be written or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The announced or produced payload is above the cap.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The payload is not a valid message.
    #[error("malformed frame: {detail}")]
    Malformed {
        /// What the decoder reported.
        detail: String,
    },
    /// The payload decoded but left bytes over.
    #[error("frame has {extra} trailing bytes")]
    TrailingBytes {
        /// Unread bytes.
        extra: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes held when the stream ended.
        buffered: usize,
    },
}

fn bincode_config() -> impl bincode::config::Config {
    // The limit bounds any length bincode reads from the payload, so a hostile length can never
    // allocate more than a frame could carry.
    bincode::config::standard().with_limit::<{ DEFAULT_MAX_FRAME * 16 }>()
}

/// Deserializes a whole payload from trusted storage, where the network cap does not apply
/// (a ledger entry may list many refusals). Trailing bytes are an error.
pub fn from_payload_unbounded<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    decode_whole(
        payload,
        bincode::config::standard().with_limit::<{ 1 << 31 }>(),
    )
}

/// Serializes a message into its payload bytes (no prefix).
pub fn to_payload<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    bincode::serde::encode_to_vec(message, bincode_config()).map_err(|error| {
        FrameError::Malformed {
            detail: error.to_string(),
        }
    })
}

/// Deserializes a whole payload; trailing bytes are an error.
pub fn from_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    decode_whole(payload, bincode_config())
}

fn decode_whole<T: DeserializeOwned>(
    payload: &[u8],
    config: impl bincode::config::Config,
) -> Result<T, FrameError> {
    let (message, used) = bincode::serde::decode_from_slice(payload, config).map_err(|error| {
        FrameError::Malformed {
            detail: error.to_string(),
        }
    })?;
    if used != payload.len() {
        return Err(FrameError::TrailingBytes {
            extra: payload.len() - used,
        });
    }
    Ok(message)
}

/// Appends one frame (prefix + payload) holding `message` to `out`.
pub fn encode_frame<T: Serialize>(
    message: &T,
    max_len: usize,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let payload = to_payload(message)?;
    if payload.len() > max_len || payload.len() > u32::MAX as usize {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max: max_len,
        });
    }
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

/// One frame as a new buffer.
pub fn frame_bytes<T: Serialize>(message: &T, max_len: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode_frame(message, max_len, &mut out)?;
    Ok(out)
}

/// Incremental frame reader: push bytes as they arrive, pop whole messages.
#[derive(Debug)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    max_len: usize,
}

impl FrameDecoder {
    /// A decoder that rejects payloads longer than `max_len`.
    pub fn new(max_len: usize) -> Self {
        Self {
            buffer: Vec::new(),
            max_len,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Payload length the next frame announces, if its prefix is complete. Errors if it is over
    /// the cap, before any of the payload is buffered.
    pub fn announced_len(&self) -> Result<Option<usize>, FrameError> {
        let Some(prefix) = self.buffer.get(..PREFIX_LEN) else {
            return Ok(None);
        };
        let mut raw = [0u8; PREFIX_LEN];
        raw.copy_from_slice(prefix);
        let len = u32::from_le_bytes(raw) as usize;
        if len > self.max_len {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_len,
            });
        }
        Ok(Some(len))
    }

    /// Pops the next complete frame's payload, if one is buffered.
    pub fn next_payload(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(len) = self.announced_len()? else {
            return Ok(None);
        };
        if self.buffer.len() < PREFIX_LEN + len {
            return Ok(None);
        }
        let payload = self.buffer[PREFIX_LEN..PREFIX_LEN + len].to_vec();
        self.buffer.drain(..PREFIX_LEN + len);
        Ok(Some(payload))
    }

    /// Pops and deserializes the next complete frame, if one is buffered.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.next_payload()? {
            Some(payload) => from_payload(&payload).map(Some),
            None => Ok(None),
        }
    }

    /// Call at end of stream: an error if a partial frame is left.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buffer.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated {
                buffered: self.buffer.len(),
            })
        }
    }

    /// Takes whatever is buffered beyond the complete frames (e.g. a raw body after a header).
    pub fn take_rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    enum Sample {
        Ping(u64),
        Text { body: String, tags: Vec<u32> },
    }

    #[test]
    fn frames_split_anywhere_reassemble() {
        let messages = vec![
            Sample::Ping(7),
            Sample::Text {
                body: "hello".into(),
                tags: vec![1, 2, 3],
            },
        ];
        let mut wire = Vec::new();
        for message in &messages {
            encode_frame(message, DEFAULT_MAX_FRAME, &mut wire).unwrap();
        }
        for split in 0..wire.len() {
            let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
            let mut got = Vec::new();
            for chunk in [&wire[..split], &wire[split..]] {
                decoder.push(chunk);
                while let Some(message) = decoder.next_message::<Sample>().unwrap() {
                    got.push(message);
                }
            }
            assert_eq!(got, messages);
            decoder.finish().unwrap();
        }
    }

    #[test]
    fn oversized_prefix_is_refused_before_buffering() {
        let mut decoder = FrameDecoder::new(16);
        decoder.push(&17u32.to_le_bytes());
        assert_eq!(
            decoder.next_payload(),
            Err(FrameError::TooLarge { len: 17, max: 16 })
        );
        let big = Sample::Text {
            body: "x".repeat(64),
            tags: vec![],
        };
        assert!(matches!(
            frame_bytes(&big, 16),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn truncated_and_trailing_are_errors() {
        let mut wire = frame_bytes(&Sample::Ping(1), DEFAULT_MAX_FRAME).unwrap();
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
        decoder.push(&wire[..wire.len() - 1]);
        assert_eq!(decoder.next_message::<Sample>(), Ok(None));
        assert!(matches!(
            decoder.finish(),
            Err(FrameError::Truncated { .. })
        ));
        // A payload with one extra byte inside the frame.
        wire.push(0);
        let len = (wire.len() - PREFIX_LEN) as u32;
        wire[..PREFIX_LEN].copy_from_slice(&len.to_le_bytes());
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
        decoder.push(&wire);
        assert_eq!(
            decoder.next_message::<Sample>(),
            Err(FrameError::TrailingBytes { extra: 1 })
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut decoder = FrameDecoder::new(128);
            decoder.push(&bytes);
            for _ in 0..4 {
                match decoder.next_message::<Sample>() {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
            let _ = from_payload::<Sample>(&bytes);
        }
    }
}
