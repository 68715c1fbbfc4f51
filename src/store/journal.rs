//! The embedded store's file: an append-only journal of changes, one record per change, each
//! framed as `len: u32 LE | crc32: u32 LE | body` behind an 8-byte magic.
//!
//! Crash safety: a record is acknowledged only after `fsync`; a torn last record (short, or its
//! CRC wrong at the very end of the file) is what a crash mid-write leaves and is cut off at
//! load; a bad record followed by more data is corruption and refuses to load, naming the file
//! and offset. Compaction writes the live keys to a temporary file, fsyncs it, renames it over
//! the journal and fsyncs the directory, so the journal is always either the old or the new one.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Revision, StoreError};

pub(crate) const FILE_NAME: &str = "state.journal";
const TMP_NAME: &str = "state.journal.tmp";
/// Held (an OS file lock) by the one process using the data directory: two processes
/// appending to one journal would interleave records and corrupt it.
const LOCK_NAME: &str = "state.lock";
const MAGIC: &[u8; 8] = b"LGSTORE1";
/// Length + CRC.
const FRAME: usize = 8;

const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;
const OP_REVISION: u8 = 3;

/// One decoded change.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Record {
    Put {
        key: String,
        value: Vec<u8>,
        create: Revision,
        modified: Revision,
        /// Where the value starts in the journal file (the store reads it back from there
        /// instead of keeping a copy in memory).
        at: u64,
    },
    Delete {
        key: String,
        revision: Revision,
    },
    /// The store revision at a snapshot (deletes before it left no record).
    Revision(Revision),
}

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32 (IEEE 802.3, the zlib one).
pub(crate) fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    c ^ 0xFFFF_FFFF
}

fn frame(out: &mut [u8], body_start: usize) {
    let body_len = out.len() - body_start - FRAME;
    let crc = crc32(&out[body_start + FRAME..]);
    out[body_start..body_start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[body_start + 4..body_start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Bytes of a put record before its value: frame, op, revisions, key length, key.
pub(crate) fn put_value_offset(key: &str) -> usize {
    FRAME + 1 + 16 + 2 + key.len()
}

/// How far before a put record's value its revisions are (modified, then create, each u64
/// LE), for a key of `klen` bytes.
pub(crate) const fn put_revisions_back(klen: usize) -> usize {
    16 + 2 + klen
}

/// The (create, modified) revisions of a put record from its 16 revision bytes.
pub(crate) fn put_revisions(b: &[u8]) -> Option<(Revision, Revision)> {
    Some((u64_at(b, 8)?, u64_at(b, 0)?))
}

/// Bytes before the first record of a journal file.
pub(crate) const HEADER: u64 = MAGIC.len() as u64;

/// Appends a framed put record to `out`; returns its size.
pub(crate) fn encode_put(
    out: &mut Vec<u8>,
    key: &str,
    value: &[u8],
    create: Revision,
    modified: Revision,
) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME]);
    out.push(OP_PUT);
    out.extend_from_slice(&modified.to_le_bytes());
    out.extend_from_slice(&create.to_le_bytes());
    // Keys are bounded by MAX_KEY (1 KiB), so u16 holds them.
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(value);
    frame(out, start);
    out.len() - start
}

pub(crate) fn encode_delete(out: &mut Vec<u8>, key: &str, revision: Revision) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME]);
    out.push(OP_DELETE);
    out.extend_from_slice(&revision.to_le_bytes());
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    frame(out, start);
    out.len() - start
}

pub(crate) fn encode_revision(out: &mut Vec<u8>, revision: Revision) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME]);
    out.push(OP_REVISION);
    out.extend_from_slice(&revision.to_le_bytes());
    frame(out, start);
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Decodes one record body found at file offset `body_at`.
fn decode_body(b: &[u8], body_at: u64) -> Result<Record, &'static str> {
    let op = *b.first().ok_or("empty record")?;
    let key_at = |at: usize| -> Result<(String, usize), &'static str> {
        let len = b.get(at..at + 2).ok_or("short record")?;
        let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
        let key = b.get(at + 2..at + 2 + len).ok_or("short key")?;
        let key = std::str::from_utf8(key).map_err(|_| "key is not UTF-8")?;
        Ok((key.to_string(), at + 2 + len))
    };
    match op {
        OP_PUT => {
            let modified = u64_at(b, 1).ok_or("short record")?;
            let create = u64_at(b, 9).ok_or("short record")?;
            let (key, end) = key_at(17)?;
            Ok(Record::Put {
                key,
                value: b[end..].to_vec(),
                create,
                modified,
                at: body_at + end as u64,
            })
        }
        OP_DELETE => {
            let revision = u64_at(b, 1).ok_or("short record")?;
            let (key, end) = key_at(9)?;
            if end != b.len() {
                return Err("trailing bytes in delete record");
            }
            Ok(Record::Delete { key, revision })
        }
        OP_REVISION => Ok(Record::Revision(u64_at(b, 1).ok_or("short record")?)),
        _ => Err("unknown record type"),
    }
}

/// Decodes a whole journal image. Returns the records and the length of the good prefix (a
/// torn tail after it is to be cut off), or the corruption.
pub(crate) fn decode_all(path: &Path, data: &[u8]) -> Result<(Vec<Record>, usize), StoreError> {
    let corrupt = |offset: usize, reason| StoreError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    if data.len() < MAGIC.len() {
        // A crash before the magic was synced: nothing was ever acknowledged.
        if MAGIC.starts_with(data) {
            return Ok((Vec::new(), 0));
        }
        return Err(corrupt(0, "not a Legate state journal"));
    }
    if &data[..MAGIC.len()] != MAGIC {
        return Err(corrupt(0, "not a Legate state journal"));
    }
    let mut records = Vec::new();
    let mut at = MAGIC.len();
    while at < data.len() {
        let Some(head) = data.get(at..at + FRAME) else {
            break; // torn frame header
        };
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let end = at + FRAME + len;
        let Some(body) = data.get(at + FRAME..end) else {
            break; // torn body: the length runs past the end
        };
        if crc32(body) != crc {
            if end == data.len() {
                break; // the last record, half written
            }
            return Err(corrupt(at, "checksum mismatch"));
        }
        records.push(decode_body(body, (at + FRAME) as u64).map_err(|r| corrupt(at, r))?);
        at = end;
    }
    Ok((records, at))
}

/// The open journal file.
pub(crate) struct JournalFile {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// Bytes in the file now.
    pub(crate) len: u64,
    /// A failed append could not be cut off: no more appends.
    broken: bool,
    /// The directory lock, held as long as the journal is open (the OS frees it when the
    /// process dies, so a `kill -9` leaves nothing to clean up).
    _lock: File,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl JournalFile {
    /// Opens (creating if needed) the journal in `dir`, returns it with its records; cuts off a
    /// torn tail.
    pub(crate) fn open(dir: &Path) -> Result<(Self, Vec<Record>), StoreError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK_NAME);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::InUse { path: lock_path })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }
        let path = dir.join(FILE_NAME);
        // A leftover of a compaction that crashed before its rename: the journal is intact.
        let _ = std::fs::remove_file(dir.join(TMP_NAME));
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let (records, good) = decode_all(&path, &data)?;
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut len = data.len() as u64;
        if good < MAGIC.len() {
            file.set_len(0).map_err(io_err(&path))?;
            file.write_all(MAGIC).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))?;
            sync_dir(dir)?;
            len = MAGIC.len() as u64;
        } else if (good as u64) < len {
            tracing::warn!(
                path = %path.display(),
                cut = len - good as u64,
                "state journal: torn last record cut off (a crash during a write)"
            );
            file.set_len(good as u64).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))?;
            len = good as u64;
        }
        Ok((
            Self {
                dir: dir.to_path_buf(),
                path,
                file,
                len,
                broken: false,
                _lock: lock,
            },
            records,
        ))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The journal opened for reading (values are read back from it by offset); open it
    /// again after a `replace`, which puts a new file at the path.
    pub(crate) fn open_reader(&self) -> Result<File, StoreError> {
        File::open(&self.path).map_err(io_err(&self.path))
    }

    /// Appends framed records and makes them durable. A failed write (a full disk) is cut
    /// back off, so later records never follow a half-written one (which the next start would
    /// have to call corruption); if even that fails, the journal takes no more writes.
    pub(crate) fn append(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        if self.broken {
            return Err(StoreError::Io {
                path: self.path.clone(),
                source: std::io::Error::other("an earlier failed write could not be cut off"),
            });
        }
        let r = self
            .file
            .write_all(bytes)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = r {
            if self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_data())
                .is_err()
            {
                self.broken = true;
            }
            return Err(io_err(&self.path)(e));
        }
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Replaces the journal with `records` (framed, without the magic): write-then-rename.
    pub(crate) fn replace(&mut self, records: &[u8]) -> Result<(), StoreError> {
        let tmp = self.dir.join(TMP_NAME);
        {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(MAGIC).map_err(io_err(&tmp))?;
            f.write_all(records).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io_err(&self.path))?;
        sync_dir(&self.dir)?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io_err(&self.path))?;
        self.len = (MAGIC.len() + records.len()) as u64;
        self.broken = false;
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    // Makes a create or rename durable; directories cannot be opened for sync on every
    // platform, so only a failing sync (not a failing open) is an error.
    if let Ok(d) = File::open(dir) {
        d.sync_all().map_err(io_err(dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn records_round_trip() {
        let mut b = MAGIC.to_vec();
        encode_put(&mut b, "k/1", b"v", 3, 7);
        encode_delete(&mut b, "k/2", 8);
        encode_revision(&mut b, 9);
        let (recs, good) = decode_all(Path::new("x"), &b).expect("decodes");
        assert_eq!(good, b.len());
        assert_eq!(
            recs,
            vec![
                Record::Put {
                    key: "k/1".into(),
                    value: b"v".to_vec(),
                    create: 3,
                    modified: 7,
                    at: (MAGIC.len() + put_value_offset("k/1")) as u64,
                },
                Record::Delete {
                    key: "k/2".into(),
                    revision: 8
                },
                Record::Revision(9),
            ]
        );
    }

    #[test]
    fn torn_tail_is_cut_and_middle_corruption_is_an_error_naming_the_file() {
        let mut b = MAGIC.to_vec();
        encode_put(&mut b, "a", b"1", 1, 1);
        let first_end = b.len();
        encode_put(&mut b, "b", b"2", 2, 2);
        // Torn: the last record is short.
        let (recs, good) = decode_all(Path::new("x"), &b[..b.len() - 3]).expect("torn is ok");
        assert_eq!((recs.len(), good), (1, first_end));
        // Torn: the last record is complete but its bytes are wrong.
        let mut last_bad = b.clone();
        let n = last_bad.len();
        last_bad[n - 1] ^= 0xFF;
        let (recs, good) = decode_all(Path::new("x"), &last_bad).expect("torn is ok");
        assert_eq!((recs.len(), good), (1, first_end));
        // Corrupt in the middle.
        let mut mid = b.clone();
        mid[first_end - 1] ^= 0xFF;
        let err = decode_all(Path::new("/d/state.journal"), &mid).expect_err("corrupt");
        let text = err.to_string();
        assert!(text.contains("/d/state.journal"), "{text}");
        assert!(text.contains("byte 8"), "{text}");
    }
}
