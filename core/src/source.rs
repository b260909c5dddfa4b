//! Config sources: where the mesh learns about namespaces, pods and
//! services. Every source produces the same [`Snapshot`]; the Kubernetes API
//! source plugs in behind [`ConfigSource`] too.

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    io,
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use crate::{
    k8s::{self, Object},
    model::{ModelErrors, Snapshot},
};

/// Why a new config could not be taken. The previous snapshot stays in force.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file or directory could not be read.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A manifest file is not valid YAML or has a field of the wrong type.
    #[error("{path}: invalid manifest")]
    Parse {
        path: PathBuf,
        #[source]
        source: k8s::ParseError,
    },
    /// An object read from the Kubernetes API has a field of the wrong type.
    #[error("{origin}: invalid object")]
    Object {
        /// The object's API path.
        origin: String,
        #[source]
        source: k8s::ParseError,
    },
    /// Objects failed validation.
    #[error("config rejected")]
    Invalid(#[source] ModelErrors),
}

impl SourceError {
    /// The error with its whole chain of causes, on one line.
    pub fn report(&self) -> String {
        crate::report(self)
    }
}

/// A source of cluster state.
pub trait ConfigSource: Send {
    /// Waits up to `timeout` for a change. `Ok(Some)` is a new, valid
    /// snapshot; `Ok(None)` means nothing changed; `Err` means the source
    /// changed but the new state was rejected (reported once per change).
    fn poll(&mut self, timeout: Duration) -> Result<Option<Arc<Snapshot>>, SourceError>;
}

/// A directory of Kubernetes manifests (`*.yaml`, `*.yml`, `*.json`, searched
/// recursively; names starting with `.` are ignored so writers can rename a
/// temporary file into place).
pub struct LocalDirSource {
    dir: PathBuf,
    interval: Duration,
    last_fingerprint: Option<u64>,
}

impl LocalDirSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LocalDirSource { dir: dir.into(), interval: Duration::from_millis(200), last_fingerprint: None }
    }

    /// How often the directory is re-read.
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Reads and validates the directory now, regardless of changes.
    pub fn load(dir: &Path) -> Result<Snapshot, SourceError> {
        let files = read_files(dir)?;
        build(&files)
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), SourceError> {
    let read = |source| SourceError::Read { path: dir.to_owned(), source };
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let entry = entry.map_err(read)?;
        let path = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let ft = entry.file_type().map_err(read)?;
        if ft.is_dir() {
            collect(&path, out)?;
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
            out.push(path);
        }
    }
    Ok(())
}

fn read_files(dir: &Path) -> Result<Vec<(PathBuf, String)>, SourceError> {
    let mut paths = Vec::new();
    collect(dir, &mut paths)?;
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).map_err(|source| SourceError::Read { path: p.clone(), source })?;
            Ok((p, text))
        })
        .collect()
}

fn build(files: &[(PathBuf, String)]) -> Result<Snapshot, SourceError> {
    let mut objects: Vec<(String, Object)> = Vec::new();
    for (path, text) in files {
        let docs = k8s::parse_documents(text).map_err(|source| SourceError::Parse { path: path.clone(), source })?;
        objects.extend(docs.into_iter().map(|o| (path.display().to_string(), o)));
    }
    Snapshot::from_objects(objects).map_err(SourceError::Invalid)
}

impl ConfigSource for LocalDirSource {
    fn poll(&mut self, timeout: Duration) -> Result<Option<Arc<Snapshot>>, SourceError> {
        let deadline = Instant::now() + timeout;
        loop {
            let files = read_files(&self.dir)?;
            let mut h = DefaultHasher::new();
            files.hash(&mut h);
            let fp = h.finish();
            if self.last_fingerprint != Some(fp) {
                self.last_fingerprint = Some(fp);
                return build(&files).map(|s| Some(Arc::new(s)));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            thread::sleep(self.interval.min(deadline - now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary directory removed on drop, pass or fail.
    fn tmpdir(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new().prefix(&format!("skiff-core-{tag}-")).tempdir().unwrap()
    }

    #[test]
    fn reports_changes_once_and_rejects_bad_config() {
        let tmp = tmpdir("source");
        let d = tmp.path();
        std::fs::write(d.join("ns.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n").unwrap();
        let mut src = LocalDirSource::new(d).with_interval(Duration::from_millis(10));
        let s = src.poll(Duration::ZERO).unwrap().unwrap();
        assert!(s.namespaces.contains_key("a"));
        assert!(src.poll(Duration::from_millis(30)).unwrap().is_none());

        std::fs::write(d.join("bad.yaml"), "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: nope}\n")
            .unwrap();
        let err = src.poll(Duration::ZERO).unwrap_err();
        let msg = err.report();
        assert!(msg.contains("bad.yaml") && msg.contains("status.podIP"), "{msg}");
        // The same broken state is not reported again.
        assert!(src.poll(Duration::from_millis(30)).unwrap().is_none());

        std::fs::write(d.join(".hidden.yaml"), "garbage: [").unwrap();
        std::fs::remove_file(d.join("bad.yaml")).unwrap();
        assert!(src.poll(Duration::ZERO).unwrap().is_some());
    }
}
