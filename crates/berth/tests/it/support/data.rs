//! Digests and deterministic data: seeded, seekable byte streams.

use super::*;

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn finish_digest(h: Sha256) -> String {
    format!("sha256:{}", hex::encode(h.finalize()))
}

#[inline]
pub(crate) fn mix(seed: u64, word: u64) -> u64 {
    let mut z = seed ^ word.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` with the bytes at `offset..offset+len` of an infinite, seekable
/// pseudo-random stream identified by `seed`.
pub fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0;
    // unaligned head
    while i < buf.len() && !pos.is_multiple_of(8) {
        buf[i] = mix(seed, pos / 8).to_le_bytes()[(pos % 8) as usize];
        i += 1;
        pos += 1;
    }
    let first_word = pos / 8;
    for (word, chunk) in (first_word..).zip(buf[i..].chunks_mut(8)) {
        let w = mix(seed, word).to_le_bytes();
        let n = chunk.len();
        chunk.copy_from_slice(&w[..n]);
    }
}

pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(seed, 0, &mut v);
    v
}

/// A seed that differs between calls (and between test processes).
pub fn fresh_seed() -> u64 {
    rand::random::<u64>()
}

/// Digest of `len` bytes of the pattern stream `seed`, computed chunk by chunk.
pub fn pattern_digest(seed: u64, len: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(buf.len());
        fill_pattern(seed, off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    finish_digest(h)
}

/// A request body streaming `len` bytes of the pattern `seed`, in `chunk` sized pieces.
pub fn pattern_body(seed: u64, len: u64, chunk: usize) -> reqwest::Body {
    let stream = futures_util::stream::unfold(0u64, move |off| async move {
        if off >= len {
            return None;
        }
        let n = ((len - off) as usize).min(chunk);
        let mut buf = vec![0u8; n];
        fill_pattern(seed, off, &mut buf);
        Some((
            Ok::<Bytes, std::io::Error>(Bytes::from(buf)),
            off + n as u64,
        ))
    });
    reqwest::Body::wrap_stream(stream)
}
