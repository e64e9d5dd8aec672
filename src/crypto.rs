//! The master key ring and the AES-256-GCM envelope that protects every stored API key.
//!
//! A ciphertext is `nonce (12 bytes) || ciphertext || tag`, sealed under one master key whose id
//! is stored beside it. The associated data binds it to its organization and its key id, so a
//! ciphertext copied to another org's row, or relabelled with another key id, fails to open.
//! Master keys never leave this module except as their ids.

use std::fmt;

use base64::Engine as _;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use secrecy::{ExposeSecret, SecretString};

/// Environment variable holding one or more base64 master keys, comma-separated, active first.
pub const MASTER_KEY_ENV: &str = "COPILOT_MASTER_KEY";
/// Environment variable naming a file with one base64 master key per line, active first.
pub const MASTER_KEY_FILE_ENV: &str = "COPILOT_MASTER_KEY_FILE";

const AAD_DOMAIN: &[u8] = b"copilot-workers/provider-api-key/v1";

/// Why a key could not be loaded or a ciphertext could not be opened. No variant carries key
/// material or plaintext.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error(
        "no master key: set {MASTER_KEY_ENV} (base64 of 32 random bytes, e.g. `openssl rand -base64 32`) or {MASTER_KEY_FILE_ENV}"
    )]
    MissingMasterKey,
    #[error("master key #{position} is malformed: {reason} (expected base64 of exactly 32 bytes)")]
    MalformedMasterKey { position: usize, reason: String },
    #[error("cannot read master key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error(
        "a stored API key was sealed with master key id {0}, which is not in the key ring; add that master key to {MASTER_KEY_ENV} (after the active one) and run `copilot-workers keys rotate`"
    )]
    UnknownKeyId(String),
    #[error(
        "stored API key does not decrypt: it was tampered with, copied from another org, or sealed with a different master key"
    )]
    Decrypt,
    #[error("encryption failed")]
    Encrypt,
}

/// One master key, known by a fingerprint id.
struct MasterKey {
    id: String,
    key: LessSafeKey,
}

/// The master keys this process holds: the first one seals, all of them open.
pub struct KeyRing {
    keys: Vec<MasterKey>,
    rng: SystemRandom,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("key_ids", &self.key_ids())
            .finish()
    }
}

/// An API key as stored: which master key sealed it, and the envelope.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    pub blob: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("key_id", &self.key_id)
            .field("blob_len", &self.blob.len())
            .finish()
    }
}

impl KeyRing {
    /// Loads the ring from `COPILOT_MASTER_KEY`, else `COPILOT_MASTER_KEY_FILE`.
    pub fn from_env() -> Result<KeyRing, CryptoError> {
        if let Ok(value) = std::env::var(MASTER_KEY_ENV)
            && !value.trim().is_empty()
        {
            return KeyRing::parse(&SecretString::from(value));
        }
        if let Ok(path) = std::env::var(MASTER_KEY_FILE_ENV)
            && !path.trim().is_empty()
        {
            let text = std::fs::read_to_string(&path).map_err(|err| CryptoError::KeyFile {
                path: path.clone(),
                reason: err.to_string(),
            })?;
            return KeyRing::parse(&SecretString::from(text.replace('\n', ",")));
        }
        Err(CryptoError::MissingMasterKey)
    }

    /// Parses a comma-separated list of base64 keys, the active one first.
    pub fn parse(spec: &SecretString) -> Result<KeyRing, CryptoError> {
        let mut keys = Vec::new();
        let entries = spec
            .expose_secret()
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty());
        for (index, entry) in entries.enumerate() {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(entry)
                .map_err(|err| CryptoError::MalformedMasterKey {
                    position: index + 1,
                    reason: format!("not base64 ({err})"),
                })?;
            keys.push(MasterKey::new(&bytes).map_err(|reason| {
                CryptoError::MalformedMasterKey {
                    position: index + 1,
                    reason,
                }
            })?);
        }
        if keys.is_empty() {
            return Err(CryptoError::MissingMasterKey);
        }
        Ok(KeyRing {
            keys,
            rng: SystemRandom::new(),
        })
    }

    /// A ring holding one freshly generated key, for the demo and tests.
    pub fn generate() -> Result<KeyRing, CryptoError> {
        let rng = SystemRandom::new();
        let mut bytes = [0u8; 32];
        rng.fill(&mut bytes).map_err(|_| CryptoError::Encrypt)?;
        let key = MasterKey::new(&bytes).map_err(|_| CryptoError::Encrypt)?;
        Ok(KeyRing {
            keys: vec![key],
            rng,
        })
    }

    /// The id of the key that seals new ciphertexts.
    pub fn active_key_id(&self) -> &str {
        // `parse` and `generate` never build an empty ring.
        &self.keys[0].id
    }

    /// Every key id in the ring, active first.
    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.iter().map(|key| key.id.as_str()).collect()
    }

    /// Whether a key id can be opened by this ring.
    pub fn knows(&self, key_id: &str) -> bool {
        self.keys.iter().any(|key| key.id == key_id)
    }

    /// Seals `plaintext` for `org_id` under the active key.
    pub fn seal(&self, org_id: &str, plaintext: &SecretString) -> Result<Sealed, CryptoError> {
        let key = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| CryptoError::Encrypt)?;
        let mut buffer = plaintext.expose_secret().as_bytes().to_vec();
        key.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(&key.id, org_id)),
                &mut buffer,
            )
            .map_err(|_| CryptoError::Encrypt)?;
        let mut blob = Vec::with_capacity(NONCE_LEN + buffer.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&buffer);
        Ok(Sealed {
            key_id: key.id.clone(),
            blob,
        })
    }

    /// Opens a ciphertext sealed for `org_id`.
    pub fn open(&self, org_id: &str, sealed: &Sealed) -> Result<SecretString, CryptoError> {
        let key = self
            .keys
            .iter()
            .find(|key| key.id == sealed.key_id)
            .ok_or_else(|| CryptoError::UnknownKeyId(sealed.key_id.clone()))?;
        if sealed.blob.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(CryptoError::Decrypt);
        }
        let (nonce, ciphertext) = sealed.blob.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::Decrypt)?;
        let mut buffer = ciphertext.to_vec();
        let plaintext = key
            .key
            .open_in_place(nonce, Aad::from(aad(&key.id, org_id)), &mut buffer)
            .map_err(|_| CryptoError::Decrypt)?;
        let text = std::str::from_utf8(plaintext).map_err(|_| CryptoError::Decrypt)?;
        Ok(SecretString::from(text))
    }
}

impl MasterKey {
    fn new(bytes: &[u8]) -> Result<MasterKey, String> {
        if bytes.len() != 32 {
            return Err(format!("decodes to {} bytes", bytes.len()));
        }
        let unbound =
            UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| "rejected by AES-256-GCM")?;
        let mut fingerprint_input = b"copilot-workers/master-key-id/v1".to_vec();
        fingerprint_input.extend_from_slice(bytes);
        let digest = ring::digest::digest(&ring::digest::SHA256, &fingerprint_input);
        let id = digest.as_ref()[..6]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>();
        Ok(MasterKey {
            id: format!("mk_{id}"),
            key: LessSafeKey::new(unbound),
        })
    }
}

fn aad(key_id: &str, org_id: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_DOMAIN.len() + key_id.len() + org_id.len() + 2);
    aad.extend_from_slice(AAD_DOMAIN);
    aad.push(0);
    aad.extend_from_slice(key_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(org_id.as_bytes());
    aad
}

/// The last four characters of a secret, for display (`…abcd`); shorter secrets show nothing.
pub fn mask(secret: &SecretString) -> String {
    let chars: Vec<char> = secret.expose_secret().chars().collect();
    if chars.len() < 12 {
        return "…".to_owned();
    }
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_from(bytes: [u8; 32]) -> KeyRing {
        let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
        KeyRing::parse(&SecretString::from(encoded)).unwrap()
    }

    fn secret(text: &str) -> SecretString {
        SecretString::from(text)
    }

    #[test]
    fn round_trip() {
        let ring = ring_from([7; 32]);
        let sealed = ring
            .seal("org_a", &secret("sk-live-1234567890abcd"))
            .unwrap();
        assert_eq!(sealed.key_id, ring.active_key_id());
        assert!(!sealed.blob.windows(4).any(|w| w == b"abcd"));
        let opened = ring.open("org_a", &sealed).unwrap();
        assert_eq!(opened.expose_secret(), "sk-live-1234567890abcd");
    }

    #[test]
    fn nonces_differ_between_seals() {
        let ring = ring_from([7; 32]);
        let a = ring.seal("org_a", &secret("same")).unwrap();
        let b = ring.seal("org_a", &secret("same")).unwrap();
        assert_ne!(a.blob, b.blob);
    }

    #[test]
    fn ciphertext_copied_to_another_org_fails() {
        let ring = ring_from([7; 32]);
        let sealed = ring.seal("org_a", &secret("sk-a")).unwrap();
        assert_eq!(
            ring.open("org_b", &sealed).unwrap_err(),
            CryptoError::Decrypt
        );
    }

    #[test]
    fn any_flipped_byte_fails() {
        let ring = ring_from([7; 32]);
        let sealed = ring.seal("org_a", &secret("sk-a-secret")).unwrap();
        for index in 0..sealed.blob.len() {
            let mut tampered = sealed.clone();
            tampered.blob[index] ^= 0x01;
            assert_eq!(
                ring.open("org_a", &tampered).unwrap_err(),
                CryptoError::Decrypt,
                "flip at {index}"
            );
        }
        let mut truncated = sealed.clone();
        truncated.blob.truncate(10);
        assert_eq!(
            ring.open("org_a", &truncated).unwrap_err(),
            CryptoError::Decrypt
        );
    }

    #[test]
    fn another_master_key_fails() {
        let sealed = ring_from([7; 32]).seal("org_a", &secret("sk-a")).unwrap();
        let other = ring_from([8; 32]);
        assert_eq!(
            other.open("org_a", &sealed).unwrap_err(),
            CryptoError::UnknownKeyId(sealed.key_id.clone())
        );
        // Even when relabelled with the other key's id, the tag does not verify.
        let relabelled = Sealed {
            key_id: other.active_key_id().to_owned(),
            blob: sealed.blob.clone(),
        };
        assert_eq!(
            other.open("org_a", &relabelled).unwrap_err(),
            CryptoError::Decrypt
        );
    }

    #[test]
    fn older_keys_in_the_ring_still_open() {
        let old = ring_from([1; 32]);
        let sealed = old.seal("org_a", &secret("sk-old")).unwrap();
        let spec = format!(
            "{},{}",
            base64::engine::general_purpose::STANDARD.encode([2u8; 32]),
            base64::engine::general_purpose::STANDARD.encode([1u8; 32])
        );
        let ring = KeyRing::parse(&SecretString::from(spec)).unwrap();
        assert_ne!(ring.active_key_id(), old.active_key_id());
        assert_eq!(
            ring.open("org_a", &sealed).unwrap().expose_secret(),
            "sk-old"
        );
    }

    #[test]
    fn malformed_keys_are_refused_with_their_position() {
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
        let err = KeyRing::parse(&SecretString::from(short)).unwrap_err();
        assert!(matches!(
            err,
            CryptoError::MalformedMasterKey { position: 1, .. }
        ));
        let err = KeyRing::parse(&SecretString::from("not base64!!")).unwrap_err();
        assert!(err.to_string().contains("not base64"));
        assert_eq!(
            KeyRing::parse(&SecretString::from(" , ")).unwrap_err(),
            CryptoError::MissingMasterKey
        );
    }

    #[test]
    fn debug_shows_ids_only() {
        let ring = ring_from([9; 32]);
        let text = format!("{ring:?}");
        assert!(text.contains(ring.active_key_id()));
        let encoded = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        assert!(!text.contains(&encoded));
    }

    #[test]
    fn mask_shows_last_four_only() {
        assert_eq!(mask(&secret("sk-proj-abcdefghijklWXYZ")), "…WXYZ");
        assert_eq!(mask(&secret("short")), "…");
    }
}
