//! Who may join, decided at each trainer's hello (pure; the hub owns it and persists token
//! bindings, `service` loads the files).
//!
//! - `open`: anyone; `token`: a trainer presents an enrollment token whose blake3 hash is in the
//!   tokens file, and each token admits at most its number of identities (the first ones to
//!   present it are bound to it for good); `allowlist`: only listed keys.
//! - In every mode, at most `identities_per_address` trainer identities are connected at once
//!   from one IPv4 address or IPv6 /64, so one machine cannot field a crowd of Sybils.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use tributary_shared::config::AdmissionMode;
use tributary_shared::wire::RejectReason;
use tributary_shared::TrainerId;

use crate::engine::Refusal;

/// A token's blake3 hash: all the coordinator keeps of a token.
pub type TokenHash = [u8; 32];

/// A token and the identities it may admit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    /// The token's hash.
    pub hash: TokenHash,
    /// How many identities it may admit.
    pub max_identities: u32,
}

/// A new, durable binding of an identity to a token, for the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBinding {
    /// The token's hash.
    pub token: TokenHash,
    /// The identity now bound to it.
    pub trainer: TrainerId,
}

#[derive(Debug, Clone)]
struct TokenState {
    max_identities: u32,
    bound: BTreeSet<TrainerId>,
}

/// The admission rules and who is connected from where; see the module docs.
#[derive(Debug, Clone)]
pub struct Admission {
    mode: AdmissionMode,
    tokens: HashMap<TokenHash, TokenState>,
    allowlist: BTreeSet<TrainerId>,
    identities_per_address: u32,
    /// Connected identities per address key, with their connection counts.
    connected: BTreeMap<IpAddr, BTreeMap<TrainerId, u32>>,
}

impl Admission {
    /// Rules for `mode`: `tokens` with the bindings already made (`bound`), or `allowlist`.
    pub fn new(
        mode: AdmissionMode,
        tokens: Vec<TokenGrant>,
        bound: Vec<TokenBinding>,
        allowlist: BTreeSet<TrainerId>,
        identities_per_address: u32,
    ) -> Self {
        let mut tokens: HashMap<TokenHash, TokenState> = tokens
            .into_iter()
            .map(|grant| {
                (
                    grant.hash,
                    TokenState {
                        max_identities: grant.max_identities,
                        bound: BTreeSet::new(),
                    },
                )
            })
            .collect();
        for binding in bound {
            // A binding to a token no longer in the file is kept out (the token was revoked).
            if let Some(state) = tokens.get_mut(&binding.token) {
                state.bound.insert(binding.trainer);
            }
        }
        Self {
            mode,
            tokens,
            allowlist,
            identities_per_address: identities_per_address.max(1),
            connected: BTreeMap::new(),
        }
    }

    /// Decides a hello from `trainer` at `address` (already reduced to its /64 or IPv4 key)
    /// presenting `token`. On success the identity counts as connected from `address` until
    /// [`Admission::left`]; a token binding that must be stored is returned.
    pub fn admit(
        &mut self,
        trainer: TrainerId,
        token: Option<&str>,
        address: IpAddr,
    ) -> Result<Option<TokenBinding>, Refusal> {
        let here = self.connected.entry(address).or_default();
        if !here.contains_key(&trainer) && here.len() >= self.identities_per_address as usize {
            return Err(Refusal::new(
                RejectReason::RateLimited,
                format!(
                    "{} identities are already connected from this address",
                    here.len()
                ),
            ));
        }
        let binding = match self.mode {
            AdmissionMode::Open => None,
            AdmissionMode::Allowlist => {
                if !self.allowlist.contains(&trainer) {
                    return Err(Refusal::new(
                        RejectReason::UnknownTrainer,
                        "this experiment admits listed trainers only",
                    ));
                }
                None
            }
            AdmissionMode::Token => {
                let presented = token.unwrap_or_default();
                let hash = *blake3::hash(presented.as_bytes()).as_bytes();
                let Some(state) = self.tokens.get_mut(&hash).filter(|_| !presented.is_empty())
                else {
                    return Err(Refusal::new(
                        RejectReason::UnknownTrainer,
                        "a valid enrollment token is required",
                    ));
                };
                if state.bound.contains(&trainer) {
                    None
                } else if state.bound.len() < state.max_identities as usize {
                    state.bound.insert(trainer);
                    Some(TokenBinding {
                        token: hash,
                        trainer,
                    })
                } else {
                    return Err(Refusal::new(
                        RejectReason::UnknownTrainer,
                        format!(
                            "this enrollment token has admitted its {} identities",
                            state.max_identities
                        ),
                    ));
                }
            }
        };
        *self
            .connected
            .entry(address)
            .or_default()
            .entry(trainer)
            .or_default() += 1;
        Ok(binding)
    }

    /// A connection admitted from `address` ended.
    pub fn left(&mut self, trainer: TrainerId, address: IpAddr) {
        let Some(here) = self.connected.get_mut(&address) else {
            return;
        };
        if let Some(count) = here.get_mut(&trainer) {
            *count -= 1;
            if *count == 0 {
                here.remove(&trainer);
            }
        }
        if here.is_empty() {
            self.connected.remove(&address);
        }
    }
}

/// Parses a tokens file: `BLAKE3-HEX MAX-IDENTITIES` per line; `#` comments and blank lines are
/// skipped. Errors name the line.
pub fn parse_tokens(text: &str) -> Result<Vec<TokenGrant>, String> {
    let mut grants = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(hash), Some(max), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(format!(
                "line {}: expected `BLAKE3-HEX MAX-IDENTITIES`",
                index + 1
            ));
        };
        let mut raw = [0u8; 32];
        hex::decode_to_slice(hash, &mut raw)
            .map_err(|_| format!("line {}: {hash:?} is not 64 hex digits", index + 1))?;
        let max_identities: u32 = max
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("line {}: {max:?} is not a positive count", index + 1))?;
        grants.push(TokenGrant {
            hash: raw,
            max_identities,
        });
    }
    Ok(grants)
}

/// Parses an allowlist file: trainer public keys, hex, one a line.
pub fn parse_allowlist(text: &str) -> Result<BTreeSet<TrainerId>, String> {
    let mut keys = BTreeSet::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut raw = [0u8; 32];
        hex::decode_to_slice(line, &mut raw)
            .map_err(|_| format!("line {}: {line:?} is not a 64-hex-digit key", index + 1))?;
        keys.insert(TrainerId(raw));
    }
    Ok(keys)
}

/// A new random enrollment token and its tokens-file line.
pub fn new_token(max_identities: u32) -> (String, String) {
    let token = hex::encode(rand::random::<[u8; 24]>());
    let line = format!(
        "{} {}",
        hex::encode(blake3::hash(token.as_bytes()).as_bytes()),
        max_identities.max(1)
    );
    (token, line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trainer(n: u8) -> TrainerId {
        TrainerId([n; 32])
    }

    fn address(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn a_token_admits_its_identities_and_no_more() {
        let (token, line) = new_token(2);
        let grants = parse_tokens(&format!("# comment\n\n{line}\n")).unwrap();
        let mut admission =
            Admission::new(AdmissionMode::Token, grants, vec![], BTreeSet::new(), 8);
        let bound = admission
            .admit(trainer(1), Some(&token), address(1))
            .unwrap();
        assert_eq!(bound.map(|b| b.trainer), Some(trainer(1)));
        assert_eq!(
            admission.admit(trainer(1), Some(&token), address(2)),
            Ok(None),
            "again"
        );
        assert!(admission
            .admit(trainer(2), Some(&token), address(3))
            .unwrap()
            .is_some());
        let refused = admission
            .admit(trainer(3), Some(&token), address(4))
            .unwrap_err();
        assert_eq!(refused.reason, RejectReason::UnknownTrainer);
        for wrong in [None, Some(""), Some("guess")] {
            assert!(admission.admit(trainer(4), wrong, address(5)).is_err());
        }
        // Bindings survive a restart through the store.
        let grants = parse_tokens(&line).unwrap();
        let stored = vec![
            TokenBinding {
                token: grants[0].hash,
                trainer: trainer(1),
            },
            TokenBinding {
                token: grants[0].hash,
                trainer: trainer(2),
            },
        ];
        let mut again = Admission::new(AdmissionMode::Token, grants, stored, BTreeSet::new(), 8);
        assert_eq!(again.admit(trainer(2), Some(&token), address(1)), Ok(None));
        assert!(again.admit(trainer(3), Some(&token), address(1)).is_err());
    }

    #[test]
    fn one_address_fields_a_bounded_number_of_identities() {
        let mut admission = Admission::new(AdmissionMode::Open, vec![], vec![], BTreeSet::new(), 2);
        admission.admit(trainer(1), None, address(1)).unwrap();
        admission.admit(trainer(2), None, address(1)).unwrap();
        // The same identity reconnecting is not a new one.
        admission.admit(trainer(2), None, address(1)).unwrap();
        assert_eq!(
            admission
                .admit(trainer(3), None, address(1))
                .unwrap_err()
                .reason,
            RejectReason::RateLimited
        );
        admission.admit(trainer(3), None, address(2)).unwrap();
        admission.left(trainer(1), address(1));
        admission.admit(trainer(3), None, address(1)).unwrap();
        admission.left(trainer(2), address(1));
        assert!(
            admission.admit(trainer(4), None, address(1)).is_err(),
            "2 still has a connection"
        );
    }

    #[test]
    fn an_allowlist_admits_listed_keys_only() {
        let list = parse_allowlist(&format!("{}\n", hex::encode([7u8; 32]))).unwrap();
        let mut admission = Admission::new(AdmissionMode::Allowlist, vec![], vec![], list, 8);
        admission.admit(trainer(7), None, address(1)).unwrap();
        assert!(admission.admit(trainer(8), None, address(1)).is_err());
        assert!(parse_allowlist("not hex\n").is_err());
        assert!(parse_tokens("abc 2\n").is_err());
        assert!(parse_tokens(&format!("{} 0\n", "00".repeat(32))).is_err());
    }
}
