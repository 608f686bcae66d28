//! ed25519 identities and the exact bytes each signature covers.
//!
//! Every signed message starts with a domain tag, so a signature made for one purpose (answering
//! a connection challenge) can never be replayed as another (vouching for an upload).

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::{CryptoRng, RngCore};

use crate::frame::to_payload;
use crate::ids::TrainerId;
use crate::wire::{SubmissionHeader, UploadHeader};

/// Domain tag for the connection challenge.
pub const HELLO_DOMAIN: &[u8] = b"tributary/1 hello\0";
/// Domain tag for submission headers.
pub const SUBMISSION_DOMAIN: &[u8] = b"tributary/1 submission\0";
/// Domain tag for operator commands.
pub const OPERATOR_DOMAIN: &[u8] = b"tributary/1 operator\0";
/// Domain separation for the coordinator's signatures over ledger entries.
pub const LEDGER_DOMAIN: &[u8] = b"tributary/1 ledger\0";

/// A signature that does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The public key bytes are not a valid ed25519 point.
    #[error("invalid public key {key}")]
    InvalidKey {
        /// The key, hex.
        key: String,
    },
    /// The signature is not 64 bytes.
    #[error("signature has {len} bytes, expected 64")]
    SignatureLength {
        /// Its length.
        len: usize,
    },
    /// The signature does not verify under the key.
    #[error("signature does not verify for {key}")]
    Mismatch {
        /// The key, hex.
        key: String,
    },
    /// The message could not be serialized.
    #[error("cannot serialize the signed message: {detail}")]
    Serialize {
        /// Why.
        detail: String,
    },
    /// A secret key file's contents are not 32 bytes of hex.
    #[error("secret key must be 64 hex characters")]
    BadSecret,
}

/// A signing identity: a trainer's, or the operator's.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "Identity({})", self.id().short())
    }
}

impl Identity {
    /// A fresh random identity.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        Self {
            signing: SigningKey::generate(rng),
        }
    }

    /// An identity from its 32 secret bytes.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(&secret),
        }
    }

    /// Parses the hex form written by [`Identity::secret_hex`].
    pub fn from_secret_hex(text: &str) -> Result<Self, IdentityError> {
        let mut secret = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut secret).map_err(|_| IdentityError::BadSecret)?;
        Ok(Self::from_secret(secret))
    }

    /// The secret as hex, for the identity file. Handle with care.
    pub fn secret_hex(&self) -> String {
        hex::encode(self.signing.to_bytes())
    }

    /// The public identity.
    pub fn id(&self) -> TrainerId {
        TrainerId(self.signing.verifying_key().to_bytes())
    }

    /// Signs `domain || message`.
    pub fn sign(&self, domain: &[u8], message: &[u8]) -> Vec<u8> {
        let mut signed = Vec::with_capacity(domain.len() + message.len());
        signed.extend_from_slice(domain);
        signed.extend_from_slice(message);
        self.signing.sign(&signed).to_bytes().to_vec()
    }

    /// Signs a connection challenge from the coordinator whose certificate has SHA-256
    /// `server_certificate`.
    pub fn sign_hello(&self, nonce: &[u8; 32], server_certificate: &[u8; 32]) -> Vec<u8> {
        self.sign(
            HELLO_DOMAIN,
            &hello_message(nonce, &self.id(), server_certificate),
        )
    }

    /// Signs a submission header into an upload header.
    pub fn sign_submission(&self, header: SubmissionHeader) -> Result<UploadHeader, IdentityError> {
        let message = submission_message(&header)?;
        let signature = self.sign(SUBMISSION_DOMAIN, &message);
        Ok(UploadHeader { header, signature })
    }
}

/// The bytes a hello signature covers: the nonce, the claimed key, and the SHA-256 of the
/// certificate the trainer saw. Binding the certificate means a rogue coordinator cannot relay
/// another coordinator's challenge and log in as the trainer there.
pub fn hello_message(
    nonce: &[u8; 32],
    trainer: &TrainerId,
    server_certificate: &[u8; 32],
) -> Vec<u8> {
    let mut message = Vec::with_capacity(96);
    message.extend_from_slice(nonce);
    message.extend_from_slice(&trainer.0);
    message.extend_from_slice(server_certificate);
    message
}

/// The bytes a submission signature covers: the header's canonical serialization.
pub fn submission_message(header: &SubmissionHeader) -> Result<Vec<u8>, IdentityError> {
    to_payload(header).map_err(|error| IdentityError::Serialize {
        detail: error.to_string(),
    })
}

/// The bytes an operator's throttle order signs (under [`OPERATOR_DOMAIN`]): the command name,
/// the duty (millionths) and the time it was issued (milliseconds since the Unix epoch), so an
/// order cannot be replayed later.
pub fn throttle_message(duty_ppm: u32, issued_ms: u64) -> Vec<u8> {
    let mut message = Vec::with_capacity(21);
    message.extend_from_slice(b"throttle\0");
    message.extend_from_slice(&duty_ppm.to_le_bytes());
    message.extend_from_slice(&issued_ms.to_le_bytes());
    message
}

/// Verifies `signature` over `domain || message` by `key`.
pub fn verify(
    key: &TrainerId,
    domain: &[u8],
    message: &[u8],
    signature: &[u8],
) -> Result<(), IdentityError> {
    let verifying = VerifyingKey::from_bytes(&key.0)
        .map_err(|_| IdentityError::InvalidKey { key: key.to_hex() })?;
    let raw: [u8; 64] = signature
        .try_into()
        .map_err(|_| IdentityError::SignatureLength {
            len: signature.len(),
        })?;
    let mut signed = Vec::with_capacity(domain.len() + message.len());
    signed.extend_from_slice(domain);
    signed.extend_from_slice(message);
    verifying
        .verify_strict(&signed, &Signature::from_bytes(&raw))
        .map_err(|_| IdentityError::Mismatch { key: key.to_hex() })
}

/// Verifies a hello signature made towards the certificate with SHA-256 `server_certificate`.
pub fn verify_hello(
    trainer: &TrainerId,
    nonce: &[u8; 32],
    server_certificate: &[u8; 32],
    signature: &[u8],
) -> Result<(), IdentityError> {
    verify(
        trainer,
        HELLO_DOMAIN,
        &hello_message(nonce, trainer, server_certificate),
        signature,
    )
}

/// Verifies an upload header's signature against the key it names.
pub fn verify_submission(upload: &UploadHeader) -> Result<(), IdentityError> {
    let message = submission_message(&upload.header)?;
    verify(
        &upload.header.trainer,
        SUBMISSION_DOMAIN,
        &message,
        &upload.signature,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{BlobHash, ExperimentId, RoundId, TaskId};
    use crate::wire::TrainMetrics;
    use rand::SeedableRng;

    fn identity(seed: u64) -> Identity {
        Identity::generate(&mut rand::rngs::StdRng::seed_from_u64(seed))
    }

    fn header(trainer: TrainerId) -> SubmissionHeader {
        SubmissionHeader {
            experiment_uid: crate::ExperimentUid([3; 32]),
            coordinator: crate::CertificateHash([4; 32]),
            experiment: ExperimentId("e".into()),
            round: RoundId(2),
            task: TaskId(5),
            trainer,
            hash: BlobHash::of(b"delta"),
            byte_len: 5,
            sample_count: 10,
            metrics: TrainMetrics::default(),
        }
    }

    #[test]
    fn hello_signature_binds_nonce_and_key() {
        let alice = identity(1);
        let nonce = [3u8; 32];
        let server = [8u8; 32];
        let signature = alice.sign_hello(&nonce, &server);
        assert!(verify_hello(&alice.id(), &nonce, &server, &signature).is_ok());
        assert!(verify_hello(&alice.id(), &[4u8; 32], &server, &signature).is_err());
        assert!(verify_hello(&identity(2).id(), &nonce, &server, &signature).is_err());
        // Relayed to another coordinator: its certificate differs.
        assert!(verify_hello(&alice.id(), &nonce, &[9u8; 32], &signature).is_err());
        assert!(matches!(
            verify_hello(&alice.id(), &nonce, &server, &signature[..10]),
            Err(IdentityError::SignatureLength { len: 10 })
        ));
    }

    #[test]
    fn submission_signature_covers_every_field() {
        let alice = identity(1);
        let upload = alice.sign_submission(header(alice.id())).unwrap();
        assert!(verify_submission(&upload).is_ok());
        let mut tampered = upload.clone();
        tampered.header.sample_count += 1;
        assert!(verify_submission(&tampered).is_err());
        // Signed by someone else than the key it names.
        let mallory = identity(3);
        let forged = mallory.sign_submission(header(alice.id())).unwrap();
        assert!(verify_submission(&forged).is_err());
    }

    #[test]
    fn domains_separate_purposes() {
        let alice = identity(1);
        let nonce = [9u8; 32];
        let hello = alice.sign_hello(&nonce, &[1u8; 32]);
        let message = hello_message(&nonce, &alice.id(), &[1u8; 32]);
        assert!(verify(&alice.id(), OPERATOR_DOMAIN, &message, &hello).is_err());
    }

    #[test]
    fn secret_hex_round_trip() {
        let alice = identity(1);
        let again = Identity::from_secret_hex(&alice.secret_hex()).unwrap();
        assert_eq!(again.id(), alice.id());
        assert!(Identity::from_secret_hex("zz").is_err());
    }
}
