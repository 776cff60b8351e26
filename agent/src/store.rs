//! The node's blob store: verified blob files on disk and a rocksdb index beside them.
//!
//! ```text
//! <data_dir>/blobs/sha256/<xx>/<hex>   complete blobs, each verified against its name before it got there
//! <data_dir>/partial/<hex>.<n>         downloads in progress (removed on start: they cannot be trusted)
//! <data_dir>/index/                    rocksdb: column families `blobs`, `pieces`, and (`records.rs`) `tags`, `links`, `pins`
//! ```
//!
//! `pieces` holds each complete blob's piece hashes (see [`crate::pieces`]) as they were computed when its bytes
//! were first written here, for serving the blob to peers.
//!
//! A blob becomes visible only by an atomic rename after its sha256 matched, and is recorded in the index after
//! the rename; on start, [`Store::open`] reconciles the two: index records without a file of the right size go,
//! files without a record (a crash between rename and record) go, partials go. Every method here blocks (file
//! system and rocksdb): async callers run them on the blocking pool.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rocksdb::{ColumnFamilyDescriptor, DB, IteratorMode, Options};
use serde::{Deserialize, Serialize};

use crate::oci::{Digest, RegistryHost};
use crate::pieces::PieceTable;

mod records;

pub use records::{LinkRecord, PinRecord, TagRecord};

const CF_BLOBS: &str = "blobs";
const CF_TAGS: &str = "tags";
const CF_LINKS: &str = "links";
const CF_PIECES: &str = "pieces";
const CF_PINS: &str = "pins";

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// rocksdb failed.
    #[error("index: {0}")]
    Index(#[from] rocksdb::Error),
    /// An index record could not be decoded (it is then treated as absent and rewritten).
    #[error("index record for {key}: {source}")]
    Record {
        /// The record's key.
        key: String,
        /// The decoding error.
        source: serde_json::Error,
    },
    /// The data dir was written by a newer agent (or is not a store): nothing was touched.
    #[error(
        "{path} says store format {found:?}; this agent reads format {FORMAT} and older: run the newer agent, or \
         point data_dir elsewhere (nothing was changed)"
    )]
    Format {
        /// The format file.
        path: PathBuf,
        /// What it says.
        found: String,
    },
}

/// The store's format: written to `<data_dir>/FORMAT` when created, checked before anything is touched at start.
/// Format 1: blobs/sha256, partial, index (rocksdb: blobs, tags, links, pieces). Stores from before the file was
/// written are format 1.
pub const FORMAT: u32 = 1;
const FORMAT_FILE: &str = "FORMAT";

/// Checks (and on a new or older store, records) the store's format, before anything else is touched.
fn check_format(root: &Path) -> Result<(), StoreError> {
    let path = root.join(FORMAT_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => match text.trim().parse::<u32>() {
            Ok(n) if n <= FORMAT => Ok(()),
            _ => Err(StoreError::Format { path, found: text.trim().chars().take(64).collect() }),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(root).map_err(io_err("create", root))?;
            fs::write(&path, format!("{FORMAT}\n")).map_err(io_err("write", &path))
        }
        Err(e) => Err(StoreError::Io { op: "read", path, source: e }),
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { op, path: path.to_owned(), source }
}

/// What the index knows about a complete blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobMeta {
    /// Size in bytes.
    pub size: u64,
    /// The media type upstream gave (manifests need it back; layers may have none).
    pub media_type: Option<String>,
    /// Last time it was served, seconds since the epoch (the LRU order).
    pub last_access: u64,
    /// Whether it was fetched without a client's credentials (peers may give it to anyone).
    #[serde(default)]
    pub public: bool,
    /// The registry it was fetched from, when that took a client's credentials: the one registry besides the
    /// configured ones whose word unlocks it for other clients (see `resolver/access.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryHost>,
}

/// Counts from a start-up reconciliation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reconciled {
    /// Blobs kept.
    pub blobs: u64,
    /// Index records dropped because their file was missing or the wrong size.
    pub dangling_records: u64,
    /// Files deleted because the index did not know them.
    pub orphan_files: u64,
    /// Partial downloads deleted.
    pub partials: u64,
}

/// What [`Store::check`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Blobs in the index.
    pub blobs: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Partial downloads present (a running or crashed agent's; a started agent removes them).
    pub partials: u64,
    /// Everything that does not agree, one line each.
    pub problems: Vec<String>,
}

/// One indexed blob against its file: of its size, hashing to its name. The problem, if any.
fn check_blob(path: &Path, digest: &Digest, size: u64) -> Result<Option<String>, StoreError> {
    match fs::metadata(path) {
        Ok(m) if m.len() != size => Ok(Some(format!("{digest}: file has {} bytes, index says {size}", m.len()))),
        Ok(_) => {
            let got = sha256_file(path)?;
            Ok((got != *digest).then(|| format!("{digest}: file content hashes to {got}")))
        }
        Err(e) => Ok(Some(format!("{digest}: indexed but its file cannot be read: {e}"))),
    }
}

fn sha256_file(path: &Path) -> Result<Digest, StoreError> {
    use sha2::Digest as _;
    use std::io::Read as _;
    let mut file = File::open(path).map_err(io_err("open", path))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        match file.read(&mut buf).map_err(io_err("read", path))? {
            0 => return Ok(Digest::from_sha256(&hasher.finalize())),
            n => hasher.update(&buf[..n]),
        }
    }
}

/// The blob store. Shared behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    db: DB,
    bytes: AtomicU64,
    blobs: AtomicU64,
    partial_seq: AtomicU64,
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Store {
    /// Opens (creating if needed) the store under `root` and reconciles files with the index.
    pub fn open(root: &Path) -> Result<(Self, Reconciled), StoreError> {
        check_format(root)?;
        // Only the agent reads the store: private layers must not be readable by other users of the node.
        for dir in ["", "blobs", "blobs/sha256", "partial", "index"] {
            let p = root.join(dir);
            fs::create_dir_all(&p).map_err(io_err("create", &p))?;
            fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(io_err("chmod", &p))?;
        }
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_keep_log_file_num(3);
        opts.set_max_log_file_size(1 << 20);
        let cfs = [CF_BLOBS, CF_TAGS, CF_LINKS, CF_PIECES, CF_PINS]
            .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, root.join("index"), cfs)?;
        let store = Self {
            root: root.to_owned(),
            db,
            bytes: AtomicU64::new(0),
            blobs: AtomicU64::new(0),
            partial_seq: AtomicU64::new(0),
        };
        let rec = store.reconcile()?;
        Ok((store, rec))
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column families are created in Store::open")
    }

    /// Where a complete blob lives.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join("blobs/sha256").join(&hex[..2]).join(hex)
    }

    fn reconcile(&self) -> Result<Reconciled, StoreError> {
        let mut rec = Reconciled::default();
        let partial = self.root.join("partial");
        for entry in fs::read_dir(&partial).map_err(io_err("list", &partial))? {
            let entry = entry.map_err(io_err("list", &partial))?;
            remove_path(&entry.path())?;
            rec.partials += 1;
        }
        let mut known = HashSet::new();
        let mut dangling = Vec::new();
        let (mut bytes, mut blobs) = (0, 0);
        for item in self.db.iterator_cf(self.cf(CF_BLOBS), IteratorMode::Start) {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let meta = serde_json::from_slice::<BlobMeta>(&v).ok();
            let digest = Digest::parse(&key).ok().filter(Digest::is_sha256);
            let ok = match (&digest, &meta) {
                (Some(d), Some(m)) => {
                    fs::metadata(self.blob_path(d)).is_ok_and(|fm| fm.is_file() && fm.len() == m.size)
                }
                _ => false,
            };
            if ok {
                known.insert(key);
                bytes += meta.map_or(0, |m| m.size);
                blobs += 1;
            } else {
                dangling.push(k);
            }
        }
        for k in &dangling {
            self.db.delete_cf(self.cf(CF_BLOBS), k)?;
            self.db.delete_cf(self.cf(CF_PIECES), k)?;
        }
        rec.dangling_records = dangling.len() as u64;
        let base = self.root.join("blobs/sha256");
        for shard in fs::read_dir(&base).map_err(io_err("list", &base))? {
            let shard = shard.map_err(io_err("list", &base))?.path();
            if !shard.is_dir() {
                remove_path(&shard)?;
                rec.orphan_files += 1;
                continue;
            }
            for f in fs::read_dir(&shard).map_err(io_err("list", &shard))? {
                let f = f.map_err(io_err("list", &shard))?.path();
                let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                if !known.contains(&format!("sha256:{name}")) {
                    remove_path(&f)?;
                    rec.orphan_files += 1;
                }
            }
        }
        rec.blobs = blobs;
        self.bytes.store(bytes, Ordering::Relaxed);
        self.blobs.store(blobs, Ordering::Relaxed);
        Ok(rec)
    }

    /// [`Store::check`]'s per-blob check on the open store (`shoal verify`): every indexed blob's file exists, has
    /// its size and hashes to its name. Blobs evicted while it runs are skipped; `partials` counts the running
    /// downloads' files.
    pub fn verify(&self) -> Result<Checked, StoreError> {
        let mut c = Checked::default();
        for (digest, meta) in self.list_blobs()? {
            let found = check_blob(&self.blob_path(&digest), &digest, meta.size);
            // Evicted meanwhile: nothing to check.
            if self.blob(&digest)?.is_none() {
                continue;
            }
            c.blobs += 1;
            c.bytes += meta.size;
            match found {
                Ok(p) => c.problems.extend(p),
                Err(e) => c.problems.push(format!("{digest}: {e}")),
            }
        }
        c.partials = fs::read_dir(self.root.join("partial")).map_or(0, |d| d.count() as u64);
        Ok(c)
    }

    /// Checks a stopped agent's store without changing it (the index is opened read-only): every index record has
    /// its file, of its size, whose sha256 is its name; every file has a record; no partial is left. A store that
    /// an agent restarted into after a crash must pass.
    pub fn check(root: &Path) -> Result<Checked, StoreError> {
        let cfs = [CF_BLOBS, CF_TAGS, CF_LINKS, CF_PIECES, CF_PINS];
        let db = DB::open_cf_for_read_only(&Options::default(), root.join("index"), cfs, false)?;
        let cf = db.cf_handle(CF_BLOBS).expect("opened with this column family");
        let mut c = Checked::default();
        let mut known = HashSet::new();
        let blob_path = |hex: &str| root.join("blobs/sha256").join(&hex[..2]).join(hex);
        for item in db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let (Some(digest), Ok(meta)) =
                (Digest::parse(&key).ok().filter(Digest::is_sha256), serde_json::from_slice::<BlobMeta>(&v))
            else {
                c.problems.push(format!("index record {key:?} is not a sha256 digest with a readable record"));
                continue;
            };
            c.problems.extend(check_blob(&blob_path(digest.hex()), &digest, meta.size)?);
            known.insert(digest.hex().to_owned());
            c.blobs += 1;
            c.bytes += meta.size;
        }
        let base = root.join("blobs/sha256");
        for shard in fs::read_dir(&base).map_err(io_err("list", &base))? {
            let shard = shard.map_err(io_err("list", &base))?.path();
            for f in fs::read_dir(&shard).map_err(io_err("list", &shard))? {
                let f = f.map_err(io_err("list", &shard))?.path();
                let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                if !known.contains(name) {
                    c.problems.push(format!("{} is not in the index", f.display()));
                }
            }
        }
        let partial = root.join("partial");
        c.partials = fs::read_dir(&partial).map_err(io_err("list", &partial))?.count() as u64;
        Ok(c)
    }

    /// Bytes an unprivileged writer may still write on the store's file system.
    pub fn free_bytes(&self) -> Result<u64, StoreError> {
        let s = nix::sys::statvfs::statvfs(&self.root).map_err(|e| StoreError::Io {
            op: "statvfs",
            path: self.root.clone(),
            source: e.into(),
        })?;
        Ok(s.blocks_available().saturating_mul(s.fragment_size()))
    }

    /// Creates a new partial file for a download of `digest`.
    pub fn create_partial(&self, digest: &Digest) -> Result<(PathBuf, File), StoreError> {
        let n = self.partial_seq.fetch_add(1, Ordering::Relaxed);
        let path = self.root.join("partial").join(format!("{}.{n}", digest.hex()));
        let file =
            std::os::unix::fs::OpenOptionsExt::mode(File::options().create_new(true).read(true).write(true), 0o600)
                .open(&path)
                .map_err(io_err("create", &path))?;
        Ok((path, file))
    }

    /// Makes a verified partial file a complete blob: fsync, rename into place, fsync the directory, record it.
    /// The caller has checked the file's sha256 against `digest`.
    /// Its piece hashes go into the index first, so a recorded blob always has them.
    pub fn commit(
        &self,
        partial: &Path,
        file: &File,
        digest: &Digest,
        meta: &BlobMeta,
        pieces: Option<&PieceTable>,
    ) -> Result<(), StoreError> {
        file.sync_all().map_err(io_err("fsync", partial))?;
        if let Some(p) = pieces {
            self.db.put_cf(self.cf(CF_PIECES), digest.as_str(), p.encode())?;
        }
        let dest = self.blob_path(digest);
        let shard = dest.parent().expect("a blob path has a shard directory");
        fs::create_dir_all(shard).map_err(io_err("create", shard))?;
        let existed = dest.exists();
        fs::rename(partial, &dest).map_err(io_err("rename", partial))?;
        File::open(shard).and_then(|d| d.sync_all()).map_err(io_err("fsync", shard))?;
        let value = serde_json::to_vec(meta).expect("BlobMeta serializes");
        self.db.put_cf(self.cf(CF_BLOBS), digest.as_str(), value)?;
        if !existed {
            self.bytes.fetch_add(meta.size, Ordering::Relaxed);
            self.blobs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The index record of a complete blob.
    pub fn blob(&self, digest: &Digest) -> Result<Option<BlobMeta>, StoreError> {
        self.get(CF_BLOBS, digest.as_str())
    }

    /// A complete blob's piece hashes, if recorded (blobs committed before pieces existed have none).
    pub fn pieces(&self, digest: &Digest) -> Result<Option<PieceTable>, StoreError> {
        Ok(self.db.get_cf(self.cf(CF_PIECES), digest.as_str())?.and_then(|v| PieceTable::decode(&v)))
    }

    /// Records a complete blob's piece hashes (computed from its verified file).
    pub fn put_pieces(&self, digest: &Digest, table: &PieceTable) -> Result<(), StoreError> {
        self.db.put_cf(self.cf(CF_PIECES), digest.as_str(), table.encode())?;
        Ok(())
    }

    /// Every complete blob with its record.
    pub fn list_blobs(&self) -> Result<Vec<(Digest, BlobMeta)>, StoreError> {
        Ok(self.scan(CF_BLOBS)?.into_iter().filter_map(|(k, m)| Some((Digest::parse(&k).ok()?, m))).collect())
    }

    /// Every record of column family `cf` whose key is UTF-8 and whose value parses (others are skipped: a list
    /// never fails on one bad record).
    fn scan<T: for<'de> Deserialize<'de>>(&self, cf: &str) -> Result<Vec<(String, T)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(cf), IteratorMode::Start) {
            let (k, v) = item?;
            if let (Ok(k), Ok(r)) = (String::from_utf8(k.to_vec()), serde_json::from_slice::<T>(&v)) {
                out.push((k, r));
            }
        }
        Ok(out)
    }

    /// Records that a blob was just served (its place in the LRU order).
    pub fn touch(&self, digest: &Digest) -> Result<(), StoreError> {
        if let Some(mut meta) = self.blob(digest)? {
            let now = now_secs();
            // One write per second per blob at most: enough precision for LRU.
            if meta.last_access != now {
                meta.last_access = now;
                self.put(CF_BLOBS, digest.as_str(), &meta)?;
            }
        }
        Ok(())
    }

    fn get<T: for<'de> Deserialize<'de>>(&self, cf: &str, key: &str) -> Result<Option<T>, StoreError> {
        match self.db.get_cf(self.cf(cf), key)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|source| StoreError::Record { key: key.to_owned(), source }),
        }
    }

    fn put<T: Serialize>(&self, cf: &str, key: &str, value: &T) -> Result<(), StoreError> {
        let v = serde_json::to_vec(value).expect("index records serialize");
        self.db.put_cf(self.cf(cf), key, v)?;
        Ok(())
    }

    /// Bytes of complete blobs on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Number of complete blobs.
    pub fn blob_count(&self) -> u64 {
        self.blobs.load(Ordering::Relaxed)
    }

    /// Evicts blobs, skipping `in_use`, until at most `target` bytes remain: those in `first` (least recently
    /// used first), then the rest by LRU. Returns the evicted blobs and the bytes freed.
    pub fn evict_to(
        &self,
        target: u64,
        in_use: &HashSet<Digest>,
        first: &HashSet<Digest>,
    ) -> Result<(Vec<Digest>, u64), StoreError> {
        if self.bytes() <= target {
            return Ok((Vec::new(), 0));
        }
        let mut all = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_BLOBS), IteratorMode::Start) {
            let (k, v) = item?;
            let (Ok(d), Ok(m)) = (Digest::parse(&String::from_utf8_lossy(&k)), serde_json::from_slice::<BlobMeta>(&v))
            else {
                continue;
            };
            if !in_use.contains(&d) {
                all.push((!first.contains(&d), m.last_access, m.size, d));
            }
        }
        all.sort();
        let (mut evicted, mut freed) = (Vec::new(), 0);
        for (_, _, size, d) in all {
            if self.bytes() <= target {
                break;
            }
            self.drop_blob(&d, size)?;
            freed += size;
            evicted.push(d);
        }
        Ok((evicted, freed))
    }

    /// Removes one complete blob (`shoal evict`). Returns its size, `None` if it is not stored.
    pub fn remove(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let Some(meta) = self.blob(digest)? else { return Ok(None) };
        self.drop_blob(digest, meta.size)?;
        Ok(Some(meta.size))
    }

    fn drop_blob(&self, d: &Digest, size: u64) -> Result<(), StoreError> {
        // Index first: a crash after this leaves an orphan file, which start-up removes.
        self.db.delete_cf(self.cf(CF_BLOBS), d.as_str())?;
        self.db.delete_cf(self.cf(CF_PIECES), d.as_str())?;
        let path = self.blob_path(d);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::Io { op: "remove", path, source: e }),
        }
        self.bytes.fetch_sub(size, Ordering::Relaxed);
        self.blobs.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    /// Flushes the index's memtables to disk (at shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

fn remove_path(p: &Path) -> Result<(), StoreError> {
    let r = if p.is_dir() { fs::remove_dir_all(p) } else { fs::remove_file(p) };
    r.map_err(io_err("remove", p))
}

/// Writes all of `buf` to `file` (a helper for the blocking download writer).
pub fn write_all(file: &mut File, buf: &[u8], path: &Path) -> Result<(), StoreError> {
    file.write_all(buf).map_err(io_err("write", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest as _, Sha256};

    pub(super) fn put_blob(store: &Store, data: &[u8]) -> Digest {
        let d = Digest::from_sha256(&Sha256::digest(data));
        let (path, mut file) = store.create_partial(&d).unwrap();
        write_all(&mut file, data, &path).unwrap();
        let meta = BlobMeta {
            size: data.len() as u64,
            media_type: None,
            last_access: now_secs(),
            public: true,
            registry: None,
        };
        let mut h = crate::pieces::PieceHasher::new(crate::pieces::MIN_PIECE);
        h.update(data);
        store.commit(&path, &file, &d, &meta, Some(&h.finish(data.len() as u64))).unwrap();
        d
    }

    #[test]
    fn a_store_of_a_newer_format_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            put_blob(&store, b"kept");
        }
        assert_eq!(fs::read_to_string(dir.path().join(FORMAT_FILE)).unwrap().trim(), FORMAT.to_string());
        fs::write(dir.path().join(FORMAT_FILE), "2\n").unwrap();
        let before = fs::read_dir(dir.path().join("blobs/sha256")).unwrap().count();
        let Err(e) = Store::open(dir.path()) else { panic!("a newer format is refused") };
        assert!(e.to_string().contains("format \"2\"") && e.to_string().contains("nothing was changed"), "{e}");
        assert_eq!(fs::read_dir(dir.path().join("blobs/sha256")).unwrap().count(), before);
        // A store from before the format file: format 1, recorded, opened.
        fs::remove_file(dir.path().join(FORMAT_FILE)).unwrap();
        let (store, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.blobs, 1);
        drop(store);
        assert_eq!(fs::read_to_string(dir.path().join(FORMAT_FILE)).unwrap().trim(), "1");
    }

    #[test]
    fn only_the_agent_can_read_the_store() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let d = put_blob(&store, b"private layer");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&store.blob_path(&d)), 0o600);
        for sub in ["", "blobs", "blobs/sha256", "partial", "index"] {
            assert_eq!(mode(&dir.path().join(sub)), 0o700, "{sub}");
        }
    }

    #[test]
    fn commit_reopen_and_reconcile() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b);
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            a = put_blob(&store, b"hello");
            b = put_blob(&store, b"world!");
            assert_eq!(store.bytes(), 11);
            // A partial left behind, an orphan file, and a record whose file vanished.
            let (_p, _f) = store.create_partial(&a).unwrap();
            let orphan = Digest::from_sha256(&Sha256::digest(b"orphan"));
            let op = store.blob_path(&orphan);
            fs::create_dir_all(op.parent().unwrap()).unwrap();
            fs::write(&op, b"orphan").unwrap();
            fs::remove_file(store.blob_path(&b)).unwrap();
        }
        let (store, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec, Reconciled { blobs: 1, dangling_records: 1, orphan_files: 1, partials: 1 });
        assert!(store.blob(&a).unwrap().is_some());
        assert!(store.blob(&b).unwrap().is_none());
        assert_eq!(store.bytes(), 5);
    }

    #[test]
    fn check_reports_what_disagrees_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c);
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            a = put_blob(&store, b"hello");
            b = put_blob(&store, b"world!");
            c = put_blob(&store, b"third");
            // Same size, other bytes; a file the index does not know; an indexed file gone; a partial.
            fs::write(store.blob_path(&a), b"jello").unwrap();
            let orphan = Digest::from_sha256(&Sha256::digest(b"orphan"));
            fs::create_dir_all(store.blob_path(&orphan).parent().unwrap()).unwrap();
            fs::write(store.blob_path(&orphan), b"orphan").unwrap();
            fs::remove_file(store.blob_path(&b)).unwrap();
            drop(store.create_partial(&c).unwrap());
        }
        let found = Store::check(dir.path()).unwrap();
        assert_eq!((found.blobs, found.partials, found.problems.len()), (3, 1, 3), "{:?}", found.problems);
        assert!(found.problems.iter().any(|p| p.starts_with(&format!("{a}: file content hashes to"))));
        assert!(found.problems.iter().any(|p| p.starts_with(&format!("{b}: indexed but"))));
        assert!(found.problems.iter().any(|p| p.ends_with("is not in the index")));
        // A store an agent opened (reconciled) and a clean one pass.
        fs::write(dir.path().join("blobs/sha256").join(&a.hex()[..2]).join(a.hex()), b"hello").unwrap();
        drop(Store::open(dir.path()).unwrap());
        let clean = Store::check(dir.path()).unwrap();
        assert_eq!((clean.blobs, clean.partials, clean.problems), (2, 0, Vec::<String>::new()));
    }

    #[test]
    fn truncated_file_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let a;
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            a = put_blob(&store, b"hello");
            fs::write(store.blob_path(&a), b"hel").unwrap();
        }
        let (store, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.dangling_records, 1);
        assert!(store.blob(&a).unwrap().is_none());
        assert!(!store.blob_path(&a).exists());
    }

    /// Four blobs of 100 bytes, last used in the order they are returned.
    fn blobs_used_in_order(store: &Store) -> Vec<Digest> {
        let ds: Vec<_> = (0..4u8).map(|i| put_blob(store, &[i; 100])).collect();
        for (i, d) in ds.iter().enumerate() {
            let mut m = store.blob(d).unwrap().unwrap();
            m.last_access = i as u64;
            store.put(CF_BLOBS, d.as_str(), &m).unwrap();
        }
        ds
    }

    #[test]
    fn evicts_lru_but_not_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let ds = blobs_used_in_order(&store);
        let in_use = HashSet::from([ds[0].clone()]);
        assert_eq!(store.evict_to(200, &in_use, &HashSet::new()).unwrap(), (vec![ds[1].clone(), ds[2].clone()], 200));
        assert!(store.pieces(&ds[1]).unwrap().is_none());
        assert!(store.pieces(&ds[0]).unwrap().is_some());
        assert!(store.blob(&ds[0]).unwrap().is_some());
        assert!(store.blob(&ds[1]).unwrap().is_none());
        assert!(store.blob(&ds[2]).unwrap().is_none());
        assert!(store.blob(&ds[3]).unwrap().is_some());
    }

    #[test]
    fn copies_containerd_also_holds_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let ds = blobs_used_in_order(&store);
        // The most recently used blob is also in containerd: it goes before older ones that only we hold.
        let first = HashSet::from([ds[3].clone()]);
        assert_eq!(store.evict_to(200, &HashSet::new(), &first).unwrap(), (vec![ds[3].clone(), ds[0].clone()], 200));
    }

    #[test]
    fn public_links_stay_public() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        store.put_link("r/x@d", LinkRecord { public: true, at: 1 }).unwrap();
        store.put_link("r/x@d", LinkRecord { public: false, at: 2 }).unwrap();
        assert!(store.link("r/x@d").unwrap().unwrap().public);
    }
}
