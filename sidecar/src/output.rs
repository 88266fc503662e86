//! Writing the output files atomically, the way Kubernetes projects volumes:
//!
//! ```text
//! cert_dir/
//!   ..data -> ..2026_11_23_14_05_01.000000001   (swapped with one rename)
//!   ..2026_11_23_14_05_01.000000001/{tls.crt, tls.key, svid_bundle.pem, key.jwt, jwt_svid.token}
//!   tls.crt -> ..data/tls.crt                    (and one such link per file)
//! ```
//!
//! Every version directory holds the complete set of swapped files, each file written, given its
//! mode and fsynced before the swap. A reader therefore never sees a partial file, and a reader that
//! resolves `..data` once (or opens files through one directory handle) never sees a certificate
//! with the key of another version. Replaced versions are kept for [`RETAIN`] before they are
//! removed, so a reader that resolved an older directory just before a swap can still finish.
//!
//! A file can instead be written **in place** ([`WriteMode::InPlace`]): a regular file at the top
//! of the directory whose content is replaced by one `pwrite` of the whole new content at offset
//! 0 (then cut to length if it got shorter) and fsynced. That is for readers that follow a file by
//! watching its inode for data writes, as SLIM's `static_jwt` provider does: it never sees a
//! symlink swap or a rename, and re-reads the file on each data-write event.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

/// The link that names the current version.
pub const DATA_LINK: &str = "..data";

/// How long a replaced version stays readable.
pub const RETAIN: std::time::Duration = std::time::Duration::from_secs(5);

pub use slim_identity_contract::config::WriteMode;

/// One output file's wanted content, mode, and how it is replaced.
#[derive(Clone, PartialEq, Eq)]
pub struct FileContent {
    pub bytes: Vec<u8>,
    pub mode: u32,
    pub write: WriteMode,
}

impl FileContent {
    /// Content replaced by the version swap.
    pub fn swapped(bytes: Vec<u8>, mode: u32) -> Self {
        Self { bytes, mode, write: WriteMode::Swap }
    }
}

impl std::fmt::Debug for FileContent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Contents are keys and tokens: never printed.
        write!(f, "FileContent({} bytes, mode {:o}, {:?})", self.bytes.len(), self.mode, self.write)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("output directory {path} does not exist (spiffe-helper requires cert_dir to exist)")]
    MissingDir { path: PathBuf },
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{0:?} is not a plain file name")]
    BadName(String),
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> OutputError + 'a {
    move |source| OutputError::Io { action, path: path.to_owned(), source }
}

/// The output directory and the set of files it must hold.
#[derive(Debug)]
pub struct OutputDir {
    dir: PathBuf,
    wanted: BTreeMap<String, FileContent>,
    current: Option<String>,
    /// Replaced versions and when they were replaced, oldest first.
    retired: std::collections::VecDeque<(String, std::time::Instant)>,
    writes: u64,
}

impl OutputDir {
    pub fn new(dir: &Path) -> Result<Self, OutputError> {
        if !dir.is_dir() {
            return Err(OutputError::MissingDir { path: dir.to_owned() });
        }
        let current = std::fs::read_link(dir.join(DATA_LINK)).ok().map(|p| p.to_string_lossy().into_owned());
        let out =
            Self { dir: dir.to_owned(), wanted: BTreeMap::new(), current, retired: Default::default(), writes: 0 };
        out.remove_strays();
        Ok(out)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many updates were written (version swaps, or in-place rewrites alone).
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Sets several files at once and writes a new version when anything changed.
    /// Returns whether a new version was written.
    pub fn update(&mut self, files: impl IntoIterator<Item = (String, FileContent)>) -> Result<bool, OutputError> {
        let mut swap = false;
        let mut in_place = Vec::new();
        for (name, content) in files {
            if name.is_empty() || name.contains('/') || name.starts_with("..") {
                return Err(OutputError::BadName(name));
            }
            if self.wanted.get(&name) != Some(&content) {
                match content.write {
                    WriteMode::Swap => swap = true,
                    WriteMode::InPlace => in_place.push(name.clone()),
                }
                self.wanted.insert(name, content);
            }
        }
        if swap {
            self.write_version()?;
        }
        for name in &in_place {
            self.write_in_place(name)?;
        }
        if !swap && !in_place.is_empty() {
            // A version swap counts itself; an update of in-place files only is counted here.
            self.writes += 1;
        }
        Ok(swap || !in_place.is_empty())
    }

    /// Checks what is on disk against what must be there; rewrites a full version when anything
    /// was deleted or changed behind our back. Returns whether it had to.
    pub fn restore_if_tampered(&mut self) -> Result<bool, OutputError> {
        if self.wanted.is_empty() || self.intact() {
            return Ok(false);
        }
        self.write_version()?;
        let in_place: Vec<String> =
            self.wanted.iter().filter(|(_, c)| c.write == WriteMode::InPlace).map(|(n, _)| n.clone()).collect();
        for name in &in_place {
            self.write_in_place(name)?;
        }
        self.remove_strays();
        Ok(true)
    }

    /// Rewrites one in-place file: one write of the whole content at offset 0, then the length.
    fn write_in_place(&self, name: &str) -> Result<(), OutputError> {
        use std::os::unix::fs::FileExt;
        let Some(content) = self.wanted.get(name) else { return Ok(()) };
        let path = self.dir.join(name);
        // A link left by the swap mode (an earlier run) is replaced by a regular file.
        if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) {
            std::fs::remove_file(&path).map_err(io("replacing", &path))?;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("opening", &path))?;
        file.set_permissions(std::fs::Permissions::from_mode(content.mode)).map_err(io("chmod", &path))?;
        file.write_all_at(&content.bytes, 0).map_err(io("writing", &path))?;
        let length = content.bytes.len() as u64;
        if file.metadata().map_err(io("reading", &path))?.len() != length {
            file.set_len(length).map_err(io("truncating", &path))?;
        }
        file.sync_all().map_err(io("syncing", &path))
    }

    fn intact(&self) -> bool {
        let Some(current) = &self.current else { return false };
        if std::fs::read_link(self.dir.join(DATA_LINK)).ok().map(|p| p.to_string_lossy().into_owned()).as_ref()
            != Some(current)
        {
            return false;
        }
        self.wanted.iter().all(|(name, content)| {
            if content.write == WriteMode::InPlace {
                let path = self.dir.join(name);
                let is_file = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
                let content_ok = std::fs::read(&path).is_ok_and(|bytes| bytes == content.bytes);
                let mode_ok = std::fs::metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o7777 == content.mode);
                return is_file && content_ok && mode_ok;
            }
            let link_ok = std::fs::read_link(self.dir.join(name)).is_ok_and(|t| t == Path::new(DATA_LINK).join(name));
            let path = self.dir.join(current).join(name);
            let content_ok = std::fs::read(&path).is_ok_and(|bytes| bytes == content.bytes);
            let mode_ok = std::fs::metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o7777 == content.mode);
            link_ok && content_ok && mode_ok
        })
    }

    fn write_version(&mut self) -> Result<(), OutputError> {
        let name = version_name();
        let version = self.dir.join(&name);
        std::fs::create_dir(&version).map_err(io("creating", &version))?;
        std::fs::set_permissions(&version, std::fs::Permissions::from_mode(0o755)).map_err(io("chmod", &version))?;
        for (file, content) in self.swapped() {
            let path = version.join(file);
            let mut handle =
                std::fs::OpenOptions::new().write(true).create_new(true).open(&path).map_err(io("creating", &path))?;
            // The mode is set explicitly on every write (not left to the umask, nor only at creation).
            handle.set_permissions(std::fs::Permissions::from_mode(content.mode)).map_err(io("chmod", &path))?;
            handle.write_all(&content.bytes).map_err(io("writing", &path))?;
            handle.sync_all().map_err(io("syncing", &path))?;
        }
        sync_dir(&version)?;
        // Swap: a temporary link renamed over `..data` (rename is atomic).
        let temporary = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&temporary);
        symlink(&name, &temporary).map_err(io("linking", &temporary))?;
        std::fs::rename(&temporary, self.dir.join(DATA_LINK)).map_err(io("swapping", &temporary))?;
        // One stable link per file.
        for (file, _) in self.swapped() {
            let link = self.dir.join(file);
            let target = Path::new(DATA_LINK).join(file);
            if std::fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
                let temporary = self.dir.join(format!("..{file}.tmp"));
                let _ = std::fs::remove_file(&temporary);
                symlink(&target, &temporary).map_err(io("linking", &temporary))?;
                std::fs::rename(&temporary, &link).map_err(io("linking", &link))?;
            }
        }
        sync_dir(&self.dir)?;
        // Replaced versions stay readable for a while: a reader may have resolved one just before.
        if let Some(old) = self.current.replace(name) {
            self.retired.push_back((old, std::time::Instant::now()));
        }
        while self.retired.front().is_some_and(|(_, at)| at.elapsed() > RETAIN) {
            if let Some((old, _)) = self.retired.pop_front() {
                let _ = std::fs::remove_dir_all(self.dir.join(old));
            }
        }
        self.writes += 1;
        Ok(())
    }

    fn swapped(&self) -> impl Iterator<Item = (&String, &FileContent)> {
        self.wanted.iter().filter(|(_, c)| c.write == WriteMode::Swap)
    }

    /// Version directories we do not know about (from an earlier run, or a tamperer).
    fn remove_strays(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = Some(&name) == self.current.as_ref() || self.retired.iter().any(|(r, _)| *r == name);
            if name.starts_with("..20") && !ours && entry.path().is_dir() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), OutputError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("syncing", dir))
}

/// `..YYYY_MM_DD_HH_MM_SS.nnnnnnnnn` plus a counter, unique within the process.
fn version_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = time::OffsetDateTime::now_utc();
    format!(
        "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{:09}_{}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.nanosecond(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(text: &str, mode: u32) -> FileContent {
        FileContent::swapped(text.as_bytes().to_vec(), mode)
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).expect("metadata").permissions().mode() & 0o7777
    }

    /// Data-write events on `path`, watched the way SLIM's `static_jwt` provider watches its
    /// token file (notify's recommended watcher on the path; only `Modify(Data)` counts).
    fn data_writes(path: &Path) -> (notify::RecommendedWatcher, std::sync::mpsc::Receiver<()>) {
        use notify::Watcher;
        let (tx, rx) = std::sync::mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event
                && matches!(event.kind, notify::EventKind::Modify(notify::event::ModifyKind::Data(_)))
            {
                let _ = tx.send(());
            }
        })
        .expect("watcher");
        watcher.watch(path, notify::RecursiveMode::NonRecursive).expect("watch");
        (watcher, rx)
    }

    fn in_place(text: &str) -> FileContent {
        FileContent { bytes: text.as_bytes().to_vec(), mode: 0o640, write: WriteMode::InPlace }
    }

    #[test]
    fn in_place_files_are_rewritten_where_an_inode_watcher_sees_them() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("jwt_svid.token");
        let mut out = OutputDir::new(dir.path()).expect("dir");
        out.update([("tls.crt".into(), content("cert-1", 0o644)), ("jwt_svid.token".into(), in_place("token-1-long"))])
            .expect("write");
        assert!(std::fs::symlink_metadata(&token).expect("meta").is_file(), "a regular file, not a link");
        assert_eq!(mode_of(&token), 0o640);
        let inode = std::fs::metadata(&token).expect("meta").ino();
        let (_watcher, events) = data_writes(&token);

        // A token-only update: one data write on the same inode, no new version directory.
        out.update([("jwt_svid.token".into(), in_place("token-2-long"))]).expect("write");
        events.recv_timeout(std::time::Duration::from_secs(5)).expect("the watcher saw the new token");
        assert_eq!(std::fs::read_to_string(&token).expect("read"), "token-2-long");
        assert_eq!(std::fs::metadata(&token).expect("meta").ino(), inode);
        // Shorter content is cut to length.
        out.update([("jwt_svid.token".into(), in_place("t3"))]).expect("write");
        events.recv_timeout(std::time::Duration::from_secs(5)).expect("seen");
        assert_eq!(std::fs::read_to_string(&token).expect("read"), "t3");
        assert_eq!(out.writes(), 3);

        // Tampering is repaired for in-place files too.
        std::fs::write(&token, "garbage").expect("tamper");
        assert!(out.restore_if_tampered().expect("restore"));
        assert_eq!(std::fs::read_to_string(&token).expect("read"), "t3");
    }

    #[test]
    fn a_swapped_file_is_invisible_to_an_inode_watcher() {
        // Why the in-place mode exists: the same watcher never hears of a version swap.
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("jwt_svid.token");
        let mut out = OutputDir::new(dir.path()).expect("dir");
        out.update([("jwt_svid.token".into(), content("token-1", 0o600))]).expect("write");
        let (_watcher, events) = data_writes(&token);
        out.update([("jwt_svid.token".into(), content("token-2", 0o600))]).expect("write");
        assert_eq!(std::fs::read_to_string(&token).expect("read"), "token-2", "a path reader sees it");
        assert!(events.recv_timeout(std::time::Duration::from_millis(500)).is_err(), "the watcher does not");
    }

    #[test]
    fn a_link_from_the_swap_mode_becomes_an_in_place_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("jwt_svid.token");
        OutputDir::new(dir.path()).expect("dir").update([("jwt_svid.token".into(), content("old", 0o600))]).expect("w");
        assert!(std::fs::symlink_metadata(&token).expect("meta").is_symlink());
        let mut out = OutputDir::new(dir.path()).expect("dir");
        out.update([("jwt_svid.token".into(), in_place("new"))]).expect("write");
        assert!(std::fs::symlink_metadata(&token).expect("meta").is_file());
        assert_eq!(std::fs::read_to_string(&token).expect("read"), "new");
    }

    #[test]
    fn versions_swap_and_modes_apply_on_every_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut out = OutputDir::new(dir.path()).expect("dir");
        assert!(
            out.update([("tls.crt".into(), content("cert-1", 0o644)), ("tls.key".into(), content("key-1", 0o600))])
                .expect("write")
        );
        assert_eq!(std::fs::read_to_string(dir.path().join("tls.crt")).expect("read"), "cert-1");
        assert_eq!(mode_of(&dir.path().join("tls.key")), 0o600);
        assert!(!out.update([("tls.crt".into(), content("cert-1", 0o644))]).expect("same"), "no change, no write");
        assert!(
            out.update([("tls.crt".into(), content("cert-2", 0o444)), ("tls.key".into(), content("key-2", 0o640))])
                .expect("write")
        );
        assert_eq!(std::fs::read_to_string(dir.path().join("tls.crt")).expect("read"), "cert-2");
        assert_eq!(mode_of(&dir.path().join("tls.crt")), 0o444, "a read-only mode does not block the next write");
        assert_eq!(mode_of(&dir.path().join("tls.key")), 0o640);
        assert!(out.update([("tls.crt".into(), content("cert-3", 0o444))]).expect("write"));
        let versions = std::fs::read_dir(dir.path())
            .expect("list")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("..20"))
            .count();
        assert_eq!(versions, 3, "the current version and the replaced ones, kept for RETAIN");
        assert_eq!(out.writes(), 3);
    }

    #[test]
    fn tampering_is_detected_and_repaired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut out = OutputDir::new(dir.path()).expect("dir");
        out.update([("jwt_svid.token".into(), content("token", 0o600)), ("key.jwt".into(), content("{}", 0o600))])
            .expect("write");
        assert!(!out.restore_if_tampered().expect("check"));
        std::fs::remove_file(dir.path().join("jwt_svid.token")).expect("delete link");
        assert!(out.restore_if_tampered().expect("restore"));
        assert_eq!(std::fs::read_to_string(dir.path().join("jwt_svid.token")).expect("read"), "token");
        std::fs::write(dir.path().join("key.jwt"), "tampered").expect("overwrite through the link");
        assert!(out.restore_if_tampered().expect("restore"));
        assert_eq!(std::fs::read_to_string(dir.path().join("key.jwt")).expect("read"), "{}");
        let path = std::fs::canonicalize(dir.path().join("key.jwt")).expect("resolve");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        assert!(out.restore_if_tampered().expect("restore"), "a changed mode counts as tampering");
        assert_eq!(mode_of(&dir.path().join("key.jwt")), 0o600);
    }

    #[test]
    fn missing_directory_and_bad_names_are_errors() {
        let error = OutputDir::new(Path::new("/nonexistent/svids")).expect_err("missing");
        assert!(error.to_string().contains("/nonexistent/svids"));
        let dir = tempfile::tempdir().expect("tempdir");
        let mut out = OutputDir::new(dir.path()).expect("dir");
        assert!(out.update([("../escape".into(), content("x", 0o600))]).is_err());
        assert!(out.update([("..data".into(), content("x", 0o600))]).is_err());
    }
}
