//! The metadata of a backup: the snapshot's records, in chunks of a few
//! MiB, each stored as a content-addressed blob of the target (so it is
//! verified by its digest when read back, and shared by nothing else).
//!
//! A chunk is `BERTHMETA1\n` followed by records, each a 4-byte big-endian
//! key length, the key, a 4-byte big-endian value length and the value:
//! binary-safe, and read back record by record.

use bytes::{BufMut, Bytes, BytesMut};

use super::BackupError;

const MAGIC: &[u8] = b"BERTHMETA1\n";

/// A chunk is closed once it holds this much.
pub const CHUNK_TARGET: usize = 4 * 1024 * 1024;

/// The most a chunk may hold when read back: the target plus one record of
/// the largest size a key and value may have.
pub const MAX_CHUNK: u64 = 64 * 1024 * 1024;

/// Largest key or value accepted when reading a chunk.
const MAX_FIELD: usize = 32 * 1024 * 1024;

/// Collects records into chunks.
pub struct ChunkWriter {
    buf: BytesMut,
    records: u64,
}

impl Default for ChunkWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkWriter {
    pub fn new() -> Self {
        let mut buf = BytesMut::with_capacity(CHUNK_TARGET + 64 * 1024);
        buf.put_slice(MAGIC);
        Self { buf, records: 0 }
    }

    pub fn push(&mut self, key: &[u8], value: &[u8]) {
        self.buf.put_u32(key.len() as u32);
        self.buf.put_slice(key);
        self.buf.put_u32(value.len() as u32);
        self.buf.put_slice(value);
        self.records += 1;
    }

    pub fn is_full(&self) -> bool {
        self.buf.len() >= CHUNK_TARGET
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// The chunk's bytes and record count; the writer starts a new one.
    pub fn take(&mut self) -> (Bytes, u64) {
        let done = std::mem::take(self);
        (done.buf.freeze(), done.records)
    }
}

/// A record: its key and value.
pub type Record = (Vec<u8>, Vec<u8>);

/// The records of a chunk, in order.
pub fn parse(chunk: &[u8]) -> Result<Vec<Record>, BackupError> {
    let corrupt = |why: &str| BackupError::Corrupt(format!("metadata chunk: {why}"));
    let mut rest = chunk
        .strip_prefix(MAGIC)
        .ok_or_else(|| corrupt("not a Berth metadata chunk"))?;
    let mut records = Vec::new();
    let field = |rest: &mut &[u8]| -> Result<Vec<u8>, BackupError> {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| corrupt("truncated"))?;
        let len = u32::from_be_bytes(*len) as usize;
        if len > MAX_FIELD || len > tail.len() {
            return Err(corrupt("truncated or oversized record"));
        }
        let (value, tail) = tail.split_at(len);
        *rest = tail;
        Ok(value.to_vec())
    };
    while !rest.is_empty() {
        let key = field(&mut rest)?;
        let value = field(&mut rest)?;
        records.push((key, value));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_binary_records_and_refuse_damage() {
        let mut writer = ChunkWriter::new();
        assert!(writer.is_empty());
        writer.push(b"tag/a:1", b"{}");
        writer.push(&[0, 255], &[]);
        let (bytes, count) = writer.take();
        assert_eq!(count, 2);
        assert!(writer.is_empty());
        let records = parse(&bytes).unwrap();
        assert_eq!(
            records,
            vec![
                (b"tag/a:1".to_vec(), b"{}".to_vec()),
                (vec![0, 255], vec![])
            ]
        );
        assert!(parse(&bytes[..bytes.len() - 1]).is_err());
        assert!(parse(b"something else").is_err());
        let mut long = bytes.to_vec();
        long[MAGIC.len()..MAGIC.len() + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse(&long).is_err());
    }
}
