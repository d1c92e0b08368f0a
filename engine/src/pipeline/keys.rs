//! Volume data keys and their wrapping under a key-encryption key (KEK).
//!
//! Each volume has one 32-byte AES-256-GCM data key. Only its wrapped form is stored
//! (in the volume's metadata on the nodes), so the nodes never see a plaintext key and a
//! DPU brought up from scratch needs only the KEK to serve the volume again.
//!
//! Wrapping is AES-256-GCM under the KEK with a random 96-bit nonce and the volume id in
//! the AAD, rather than AES-KW (RFC 3394): the AAD binds a wrapped key to its volume, so
//! a wrapped key copied into another volume's metadata does not unwrap. A KEK wraps at
//! most a few thousand keys in its life, far below the 2^32 messages for which random
//! 96-bit nonces stay safe. Blob layout: docs/format.md, section "Wrapped data key".
//!
//! Secret bytes held here are zeroized on drop. The AES key schedule inside aws-lc's
//! context is freed by aws-lc when the key object drops.

use std::fmt;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce as AeadNonce, UnboundKey, AES_256_GCM};
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::{PipelineError, VolumeId};

/// Length of AES-256 keys.
pub const KEY_LEN: usize = 32;
/// Length of a GCM tag.
pub const TAG_LEN: usize = 16;
/// Version byte of the wrapped-key blob.
pub const WRAP_VERSION: u8 = 1;
/// Length of a wrapped-key blob: version, nonce, encrypted key, tag.
pub const WRAPPED_LEN: usize = 1 + 12 + KEY_LEN + TAG_LEN;
const WRAP_AAD_PREFIX: &[u8; 16] = b"dpu-data-key-v1\0";

/// A volume's data key. Zeroized on drop; `Debug` does not print it.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; KEY_LEN]);

/// A key-encryption key. Zeroized on drop; `Debug` does not print it.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Kek([u8; KEY_LEN]);

macro_rules! secret_key_impl {
    ($t:ident) => {
        impl $t {
            /// Wraps raw key bytes (taking ownership; the caller should zeroize its copy).
            pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
                Self(bytes)
            }

            /// A fresh key from the system's CSPRNG.
            pub fn generate() -> Result<Self, PipelineError> {
                // Filled in place so no stray stack copy of the key is left behind.
                let mut k = Self([0u8; KEY_LEN]);
                aws_lc_rs::rand::fill(&mut k.0)
                    .map_err(|_| PipelineError::Crypto("random key generation"))?;
                Ok(k)
            }

            /// The raw key bytes.
            pub fn expose(&self) -> &[u8; KEY_LEN] {
                &self.0
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($t), "([redacted])"))
            }
        }
    };
}
secret_key_impl!(DataKey);
secret_key_impl!(Kek);

/// An AES-256-GCM key ready for use (the expanded schedule lives inside aws-lc).
pub struct AeadKey(LessSafeKey);

impl fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AeadKey([redacted])")
    }
}

impl AeadKey {
    /// Expands `key` for AES-256-GCM.
    pub fn new(key: &[u8; KEY_LEN]) -> Result<Self, PipelineError> {
        let unbound =
            UnboundKey::new(&AES_256_GCM, key).map_err(|_| PipelineError::Crypto("AES key"))?;
        Ok(Self(LessSafeKey::new(unbound)))
    }

    /// Encrypts `in_out` in place and returns the tag.
    pub fn seal_in_place(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], PipelineError> {
        let tag = self
            .0
            .seal_in_place_separate_tag(
                AeadNonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                in_out,
            )
            .map_err(|_| PipelineError::Crypto("AES-GCM seal"))?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Encrypts `src` into `dst` (`src.len() + TAG_LEN` bytes: ciphertext then tag)
    /// in one pass, leaving `src` untouched; saves the copy an in-place seal needs.
    pub fn seal_into(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<(), PipelineError> {
        if dst.len() != src.len() + TAG_LEN {
            return Err(PipelineError::Crypto("AES-GCM seal: output length"));
        }
        let (ct, tag) = dst.split_at_mut(src.len());
        self.0
            .seal_out_of_place_scatter(
                AeadNonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                src,
                ct,
                &[],
                tag,
            )
            .map_err(|_| PipelineError::Crypto("AES-GCM seal"))
    }

    /// Decrypts `ciphertext || tag` in place; returns the plaintext length.
    pub fn open_in_place(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<usize, PipelineError> {
        self.0
            .open_in_place(
                AeadNonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                in_out,
            )
            .map(|p| p.len())
            .map_err(|_| PipelineError::AeadFailure)
    }
}

/// A data key wrapped under a KEK, as stored in volume metadata.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey([u8; WRAPPED_LEN]);

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WrappedKey(v{}, {} bytes)", self.0[0], self.0.len())
    }
}

impl WrappedKey {
    /// The stored bytes.
    pub fn as_bytes(&self) -> &[u8; WRAPPED_LEN] {
        &self.0
    }

    /// Parses stored bytes (authenticity is checked by [`unwrap_data_key`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, PipelineError> {
        let arr: [u8; WRAPPED_LEN] = bytes
            .try_into()
            .map_err(|_| PipelineError::KeyUnwrap("wrapped key has the wrong length"))?;
        if arr[0] != WRAP_VERSION {
            return Err(PipelineError::KeyUnwrap("unknown wrapped key version"));
        }
        Ok(Self(arr))
    }
}

fn wrap_aad(volume: &VolumeId) -> [u8; 32] {
    let mut aad = [0u8; 32];
    aad[..16].copy_from_slice(WRAP_AAD_PREFIX);
    aad[16..].copy_from_slice(&volume.0);
    aad
}

/// Wraps `key` for `volume` under `kek`.
pub fn wrap_data_key(
    kek: &Kek,
    volume: &VolumeId,
    key: &DataKey,
) -> Result<WrappedKey, PipelineError> {
    let aead = AeadKey::new(kek.expose())?;
    let mut nonce = [0u8; 12];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| PipelineError::Crypto("random nonce"))?;
    let mut out = [0u8; WRAPPED_LEN];
    out[0] = WRAP_VERSION;
    out[1..13].copy_from_slice(&nonce);
    out[13..13 + KEY_LEN].copy_from_slice(key.expose());
    let tag = aead.seal_in_place(nonce, &wrap_aad(volume), &mut out[13..13 + KEY_LEN])?;
    out[13 + KEY_LEN..].copy_from_slice(&tag);
    Ok(WrappedKey(out))
}

/// Unwraps a data key; fails on a wrong KEK, another volume's blob or any tampering.
pub fn unwrap_data_key(
    kek: &Kek,
    volume: &VolumeId,
    wrapped: &WrappedKey,
) -> Result<DataKey, PipelineError> {
    let aead = AeadKey::new(kek.expose())?;
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&wrapped.0[1..13]);
    let mut buf = [0u8; KEY_LEN + TAG_LEN];
    buf.copy_from_slice(&wrapped.0[13..]);
    let opened = aead.open_in_place(nonce, &wrap_aad(volume), &mut buf);
    let result = match opened {
        Ok(_) => {
            let mut k = DataKey([0u8; KEY_LEN]);
            k.0.copy_from_slice(&buf[..KEY_LEN]);
            Ok(k)
        }
        Err(_) => Err(PipelineError::KeyUnwrap(
            "authentication failed (wrong KEK, wrong volume or damaged blob)",
        )),
    };
    buf.zeroize();
    result
}
