//! The cluster key and the two ciphers built on it (reference §7): AES-256-GCM for
//! affiliate data and deterministic AES-ECB for KubeSpan endpoints.
//!
//! Both use the one AES block cipher keyed with the raw secret (no KDF), as Talos
//! does; anything else would not interoperate. The key stays inside this type: it
//! cannot be printed, and the `aes` crate wipes the expanded key on drop.

use std::fmt;
use std::net::SocketAddr;

use aes::Aes256;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::Rng;
use thiserror::Error;

use crate::payload::{self, PayloadError};

/// AES-256: Talos requires a 32-byte secret (§7.1).
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const BLOCK_LEN: usize = 16;

/// Why a secret was refused or a blob could not be opened. Messages never include
/// secret material.
#[derive(Debug, Error)]
pub enum CryptoError {
    #[error("secret is not valid base64")]
    SecretNotBase64,
    #[error("secret must decode to {KEY_LEN} bytes (AES-256), got {0}")]
    SecretLength(usize),
    #[error("short data: {0} bytes, an AES-GCM blob has at least {min}", min = NONCE_LEN + TAG_LEN)]
    ShortData(usize),
    #[error("decryption failure: wrong cluster secret or tampered data")]
    Decryption,
    #[error("endpoint size is not multiple of cipher block size: {0} bytes")]
    EndpointBlockSize(usize),
    #[error("endpoint length byte {size} exceeds the {available} decrypted bytes after it")]
    EndpointLength { size: usize, available: usize },
    #[error(transparent)]
    Endpoint(#[from] PayloadError),
}

/// The cluster secret, ready to seal and open. Build it once and share it (it is not
/// `Clone`, so copies of the key don't spread).
pub struct ClusterKey {
    block: Aes256,
    gcm: Aes256Gcm,
}

impl ClusterKey {
    /// From the config's `clusterSecret`: standard base64 of exactly 32 bytes.
    pub fn from_secret(secret: &str) -> Result<ClusterKey, CryptoError> {
        let mut key = STANDARD
            .decode(secret)
            .map_err(|_| CryptoError::SecretNotBase64)?;
        let result = ClusterKey::from_bytes(&key);
        key.fill(0);
        result
    }

    /// From the raw key bytes (the decoded secret).
    pub fn from_bytes(key: &[u8]) -> Result<ClusterKey, CryptoError> {
        if key.len() != KEY_LEN {
            return Err(CryptoError::SecretLength(key.len()));
        }
        let block = Aes256::new(GenericArray::from_slice(key));
        let gcm = Aes256Gcm::from(block.clone());
        Ok(ClusterKey { block, gcm })
    }

    /// Encrypts affiliate data: `nonce (12 random bytes) ‖ ciphertext ‖ tag (16)`, no
    /// associated data (§7.3).
    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.resize(NONCE_LEN, 0);
        rand::rng().fill(&mut out[..]);
        out.extend_from_slice(plaintext);
        let (nonce, body) = out.split_at_mut(NONCE_LEN);
        let tag = self
            .gcm
            .encrypt_in_place_detached(Nonce::from_slice(nonce), b"", body)
            .expect("AES-GCM refuses only plaintexts over 64 GiB");
        out.extend_from_slice(&tag);
        out
    }

    /// Decrypts what [`ClusterKey::seal`] (or any Talos node) wrote. Fails on short
    /// data, a different key or any changed byte.
    pub fn open(&self, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if data.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::ShortData(data.len()));
        }
        let (nonce, rest) = data.split_at(NONCE_LEN);
        let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut plaintext = body.to_vec();
        self.gcm
            .decrypt_in_place_detached(
                Nonce::from_slice(nonce),
                b"",
                &mut plaintext,
                Tag::from_slice(tag),
            )
            .map_err(|_| CryptoError::Decryption)?;
        Ok(plaintext)
    }

    /// Encrypts one KubeSpan endpoint deterministically (§7.4): the same key and
    /// endpoint always give the same blob, which lets the server deduplicate what
    /// several nodes report. A `SocketAddr` carries no zone name, so the blob is at
    /// most 32 bytes and always within the server's limit.
    pub fn seal_endpoint(&self, addr: SocketAddr) -> Vec<u8> {
        let mut blob = pad_endpoint(&payload::encode_endpoint(addr));
        for block in blob.chunks_exact_mut(BLOCK_LEN) {
            self.block
                .encrypt_block(GenericArray::from_mut_slice(block));
        }
        blob
    }

    /// Decrypts one endpoint blob. Unlike upstream, a bad length byte is an error,
    /// never a panic (Q11).
    pub fn open_endpoint(&self, blob: &[u8]) -> Result<SocketAddr, CryptoError> {
        if !blob.len().is_multiple_of(BLOCK_LEN) {
            return Err(CryptoError::EndpointBlockSize(blob.len()));
        }
        let mut plain = blob.to_vec();
        for block in plain.chunks_exact_mut(BLOCK_LEN) {
            self.block
                .decrypt_block(GenericArray::from_mut_slice(block));
        }
        Ok(payload::decode_endpoint(unpad_endpoint(&plain)?)?)
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<redacted>)")
    }
}

/// The plaintext of an endpoint blob: one length byte, the message, zero padding to
/// a whole number of AES blocks.
fn pad_endpoint(message: &[u8]) -> Vec<u8> {
    let mut plain = Vec::with_capacity(BLOCK_LEN * 2);
    // Go writes `byte(len(m))`; an encoded Endpoint is at most 23 bytes.
    plain.push(message.len() as u8);
    plain.extend_from_slice(message);
    plain.resize(plain.len().next_multiple_of(BLOCK_LEN), 0);
    plain
}

/// The message inside a decrypted endpoint blob, checked against its length byte.
fn unpad_endpoint(plain: &[u8]) -> Result<&[u8], CryptoError> {
    let Some((&size, rest)) = plain.split_first() else {
        return Err(CryptoError::EndpointLength {
            size: 0,
            available: 0,
        });
    };
    rest.get(..usize::from(size))
        .ok_or(CryptoError::EndpointLength {
            size: usize::from(size),
            available: rest.len(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `TestReconcileConfig`'s secret and the key Talos derives from it (§7.2).
    const SECRET: &str = "kCQsKr4B28VUl7qw1sVkTDNF9fFH++ViIuKsss+C6kc=";
    const KEY_HEX: &str = "90242c2abe01dbc55497bab0d6c5644c3345f5f147fbe56222e2acb2cf82ea47";

    fn key() -> ClusterKey {
        ClusterKey::from_secret(SECRET).unwrap()
    }

    /// The secret is the key: no hashing. Encrypting under the secret must equal
    /// encrypting under the vector's raw key bytes.
    #[test]
    fn secret_decodes_to_the_reference_key() {
        let raw = hex::decode(KEY_HEX).unwrap();
        assert_eq!(STANDARD.decode(SECRET).unwrap(), raw);
        let from_raw = ClusterKey::from_bytes(&raw).unwrap();
        let addr: SocketAddr = "192.168.3.4:51820".parse().unwrap();
        assert_eq!(key().seal_endpoint(addr), from_raw.seal_endpoint(addr));
        assert_eq!(
            from_raw.open(&key().seal(b"same key")).unwrap(),
            b"same key"
        );
    }

    #[test]
    fn refuses_secrets_that_are_not_32_bytes_of_base64() {
        for len in [16, 24, 31, 33] {
            let secret = STANDARD.encode(vec![7u8; len]);
            let err = ClusterKey::from_secret(&secret).unwrap_err();
            assert!(
                matches!(err, CryptoError::SecretLength(n) if n == len),
                "{err}"
            );
            assert_eq!(
                err.to_string(),
                format!("secret must decode to 32 bytes (AES-256), got {len}")
            );
        }
        for bad in [
            "not base64!",
            "kCQsKr4B28VUl7qw1sVkTDNF9fFH-_ViIuKsss-C6kc=",
        ] {
            let err = ClusterKey::from_secret(bad).unwrap_err();
            assert!(matches!(err, CryptoError::SecretNotBase64));
            assert_eq!(err.to_string(), "secret is not valid base64");
        }
    }

    #[test]
    fn debug_never_shows_the_key() {
        let shown = format!("{:?}", key());
        assert_eq!(shown, "ClusterKey(<redacted>)");
    }

    #[test]
    fn gcm_round_trips_with_fresh_nonces() {
        let key = key();
        for plaintext in [&b""[..], b"x", &[0xAB; 2020]] {
            let sealed = key.seal(plaintext);
            assert_eq!(sealed.len(), plaintext.len() + 28);
            assert_eq!(key.open(&sealed).unwrap(), plaintext);
        }
        // Random nonces: sealing twice gives different blobs.
        assert_ne!(key.seal(b"data")[..12], key.seal(b"data")[..12]);
    }

    #[test]
    fn gcm_rejects_wrong_key_tampering_and_short_data() {
        let key = key();
        let sealed = key.seal(b"affiliate");

        let other = ClusterKey::from_bytes(&[1; 32]).unwrap();
        assert!(matches!(other.open(&sealed), Err(CryptoError::Decryption)));

        for at in [0, 12, sealed.len() - 1] {
            let mut tampered = sealed.clone();
            tampered[at] ^= 0x01;
            assert!(
                matches!(key.open(&tampered), Err(CryptoError::Decryption)),
                "{at}"
            );
        }

        for len in [0, 1, 27] {
            let err = key.open(&sealed[..len]).unwrap_err();
            assert!(matches!(err, CryptoError::ShortData(n) if n == len));
            assert!(err.to_string().starts_with("short data"));
        }
        // 28 bytes is the smallest blob: an empty plaintext.
        assert_eq!(key.open(&key.seal(b"")).unwrap(), b"");
    }

    /// Every row of the §7.4 table: the blocks before AES, then the blob.
    #[test]
    fn endpoint_blocks_match_the_reference() {
        let rows = [
            (
                Some("192.168.3.4:51820"),
                "0a0a04c0a8030410ec94030000000000",
            ),
            (Some("10.0.0.2:51820"), "0a0a040a00000210ec94030000000000"),
            (Some("1.1.1.1:343"), "090a040101010110d702000000000000"),
            (
                Some("[fd50:8d60:4238:6302:f857:23ff:fe21:d1e0]:51820"),
                "160a10fd508d6042386302f85723fffe21d1e010ec9403000000000000000000",
            ),
            // Empty ip, port 0: the message is empty.
            (None, "00000000000000000000000000000000"),
        ];
        let key = key();
        for (addr, blocks) in rows {
            let addr = addr.map(|a| a.parse::<SocketAddr>().unwrap());
            let message = addr.map(payload::encode_endpoint).unwrap_or_default();
            let plain = pad_endpoint(&message);
            assert_eq!(hex::encode(&plain), blocks, "{addr:?}");
            assert_eq!(unpad_endpoint(&plain).unwrap(), message);

            let Some(addr) = addr else { continue };
            let blob = key.seal_endpoint(addr);
            assert_eq!(blob.len(), plain.len());
            // Each block is encrypted on its own, with no IV or chaining.
            for (sealed, clear) in blob.chunks(16).zip(plain.chunks(16)) {
                let mut block = GenericArray::clone_from_slice(clear);
                key.block.encrypt_block(&mut block);
                assert_eq!(sealed, block.as_slice());
            }
            assert_eq!(key.seal_endpoint(addr), blob, "deterministic");
            assert_eq!(key.open_endpoint(&blob).unwrap(), addr);
        }
    }

    #[test]
    fn endpoint_blobs_differ_per_key_and_endpoint() {
        let a: SocketAddr = "10.0.0.2:51820".parse().unwrap();
        let b: SocketAddr = "10.0.0.3:51820".parse().unwrap();
        let other = ClusterKey::from_bytes(&[1; 32]).unwrap();
        assert_ne!(key().seal_endpoint(a), key().seal_endpoint(b));
        assert_ne!(key().seal_endpoint(a), other.seal_endpoint(a));
    }

    /// Q11: whatever the blob, opening it returns an error or an address.
    #[test]
    fn bad_endpoint_blobs_are_errors() {
        let key = key();
        for len in [1, 15, 17, 31] {
            assert!(matches!(
                key.open_endpoint(&vec![0; len]),
                Err(CryptoError::EndpointBlockSize(n)) if n == len
            ));
        }
        assert_eq!(
            key.open_endpoint(&[0; 20]).unwrap_err().to_string(),
            "endpoint size is not multiple of cipher block size: 20 bytes"
        );
        assert!(matches!(
            key.open_endpoint(&[]),
            Err(CryptoError::EndpointLength {
                size: 0,
                available: 0
            })
        ));

        let seal_plain = |plain: &[u8]| {
            let mut blob = plain.to_vec();
            for block in blob.chunks_exact_mut(16) {
                key.block.encrypt_block(GenericArray::from_mut_slice(block));
            }
            blob
        };
        // A length byte past the end of the decrypted data.
        let mut plain = pad_endpoint(&payload::encode_endpoint("1.1.1.1:343".parse().unwrap()));
        plain[0] = 16;
        assert!(matches!(
            key.open_endpoint(&seal_plain(&plain)),
            Err(CryptoError::EndpointLength {
                size: 16,
                available: 15
            })
        ));
        plain[0] = 0xFF;
        assert!(matches!(
            key.open_endpoint(&seal_plain(&plain)),
            Err(CryptoError::EndpointLength {
                size: 255,
                available: 15
            })
        ));
        // In range but not an endpoint message.
        assert!(matches!(
            key.open_endpoint(&seal_plain(&[
                0x03, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            ])),
            Err(CryptoError::Endpoint(_))
        ));

        let mut rng = rand::rng();
        for _ in 0..5_000 {
            let blocks = rng.random_range(0..4);
            let blob: Vec<u8> = (0..blocks * 16).map(|_| rng.random()).collect();
            let _ = key.open_endpoint(&blob);
        }
    }
}
