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
    /// Waits up to `timeout` for a change. `Ok(Some)` is a new snapshot
    /// (objects that failed validation are refused each on its own and
    /// listed in its `rejected`); `Ok(None)` means nothing changed; `Err`
    /// means the source could not be read at all (reported once per change).
    fn poll(&mut self, timeout: Duration) -> Result<Option<Arc<Snapshot>>, SourceError>;
}

/// A directory of Kubernetes manifests (`*.yaml`, `*.yml`, `*.json`, searched
/// recursively; names starting with `.` are ignored so writers can rename a
/// temporary file into place).
pub struct LocalDirSource {
    dir: PathBuf,
    interval: Duration,
    last_fingerprint: Option<u64>,
    /// The last snapshot published: its accepted objects stand in for
    /// refused ones.
    previous: Option<Arc<Snapshot>>,
    /// Each file's text as last read successfully: a file that is no
    /// longer valid YAML keeps serving the objects it held then.
    last_good: std::collections::HashMap<PathBuf, String>,
    /// The namespace whose Secrets are read (the ingress gateway's own);
    /// None: no Secret is (every other process).
    secrets_namespace: Option<String>,
}

/// Whether a parsed object is kept: every object but Secrets outside the
/// namespace whose Secrets the process reads.
pub fn keep_object(obj: &Object, secrets_namespace: Option<&str>) -> bool {
    let (is_secret, ns) = match obj {
        Object::Secret(s) => (true, s.metadata.namespace.as_deref()),
        Object::Invalid(o) if o.kind == "Secret" && o.api_version == "v1" => (true, o.namespace.as_deref()),
        _ => (false, None),
    };
    !is_secret || secrets_namespace.is_some_and(|want| ns.unwrap_or("default") == want)
}

impl LocalDirSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LocalDirSource {
            dir: dir.into(),
            interval: Duration::from_millis(200),
            last_fingerprint: None,
            previous: None,
            last_good: Default::default(),
            secrets_namespace: None,
        }
    }

    /// Reads the Secrets of `namespace` too (the ingress gateway's own).
    pub fn with_secrets_in(mut self, namespace: Option<String>) -> Self {
        self.secrets_namespace = namespace;
        self
    }

    /// How often the directory is re-read.
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Reads and validates the directory now, regardless of changes;
    /// strict: any refused object fails the load (tests, offline checks).
    pub fn load(dir: &Path) -> Result<Snapshot, SourceError> {
        let files = read_files(dir)?;
        build(&files)
    }

    /// Reads the directory once, object by object, as the running mesh
    /// would (`skiff analyze`): refused objects are listed in the
    /// snapshot's `rejected`, never fail the read.
    pub fn analyze(dir: &Path) -> Result<Snapshot, SourceError> {
        let files = read_files(dir)?;
        Ok(LocalDirSource::new(dir).build_lenient(&files, false).expect("lenient about files"))
    }

    /// Reads the directory object by object (see [`Snapshot::build`]): a
    /// file that is not valid YAML, or an object that fails, is refused on
    /// its own and reported in the snapshot.
    ///
    /// A file that is not valid YAML keeps serving the objects it held when
    /// it last parsed. With `hold_unknown`, a file that never parsed fails
    /// the whole read instead (what it holds is unknown: it may be the DENY
    /// policy or STRICT PeerAuthentication the mesh must not run without),
    /// so the previous snapshot stays, or nothing is served at start.
    fn build_lenient(&mut self, files: &[(PathBuf, String)], hold_unknown: bool) -> Result<Snapshot, SourceError> {
        let mut objects: Vec<(String, Object)> = Vec::new();
        let mut unreadable = Vec::new();
        for (path, text) in files {
            let want = self.secrets_namespace.clone();
            let keep = |o: &Object| keep_object(o, want.as_deref());
            match k8s::parse_documents(text) {
                Ok(docs) => {
                    self.last_good.insert(path.clone(), text.clone());
                    objects.extend(docs.into_iter().filter(keep).map(|o| (path.display().to_string(), o)));
                }
                Err(e) => {
                    let kept = self.last_good.get(path).and_then(|t| k8s::parse_documents(t).ok());
                    if kept.is_none() && hold_unknown {
                        return Err(SourceError::Parse { path: path.clone(), source: e });
                    }
                    unreadable.push((path.clone(), crate::report(&e), kept.is_some()));
                    objects.extend(kept.into_iter().flatten().filter(keep).map(|o| (path.display().to_string(), o)));
                }
            }
        }
        self.last_good.retain(|p, _| files.iter().any(|(f, _)| f == p));
        let mut snap = Snapshot::build(objects, self.previous.as_deref());
        for (path, why, kept) in unreadable {
            snap.rejected.push(crate::model::Rejection {
                error: crate::model::ModelError {
                    origin: path.display().to_string(),
                    object: "file".into(),
                    field: String::new(),
                    message: why,
                },
                key: crate::model::ObjectKey { kind: "File", namespace: String::new(), name: path.display().to_string() },
                instead: if kept { crate::model::Instead::Previous } else { crate::model::Instead::Nothing },
            });
        }
        Ok(snap)
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
        objects.extend(docs.into_iter().filter(|o| keep_object(o, None)).map(|o| (path.display().to_string(), o)));
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
                let snap = Arc::new(self.build_lenient(&files, true)?);
                self.previous = Some(snap.clone());
                return Ok(Some(snap));
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

    /// Only the process that asks for one namespace's Secrets (the ingress
    /// gateway) gets them; every other reads none from the directory.
    #[test]
    fn secrets_are_read_only_in_the_namespace_asked_for() {
        let tmp = tmpdir("secrets");
        let secret = |ns: &str, name: &str| format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\nstringData: {{cert: c, key: k}}\n");
        std::fs::write(tmp.path().join("s.yaml"), format!("{}---\n{}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n", secret("istio-system", "gw-cert"), secret("shop", "app-secret"))).unwrap();
        let mut plain = LocalDirSource::new(tmp.path());
        let s = plain.poll(Duration::from_secs(1)).unwrap().unwrap();
        assert!(s.secrets.is_empty() && s.namespaces.contains_key("shop"));
        let mut gw = LocalDirSource::new(tmp.path()).with_secrets_in(Some("istio-system".into()));
        let s = gw.poll(Duration::from_secs(1)).unwrap().unwrap();
        assert_eq!(s.secrets.keys().collect::<Vec<_>>(), ["istio-system/gw-cert"]);
        assert_eq!(s.secrets["istio-system/gw-cert"].data["cert"], b"c");
        assert!(!format!("{:?}", s.secrets).contains("\"c\""), "Debug names keys, never values");
        assert!(LocalDirSource::load(tmp.path()).unwrap().secrets.is_empty());
    }

    #[test]
    fn reports_changes_once_and_refuses_bad_objects_one_by_one() {
        let tmp = tmpdir("source");
        let d = tmp.path();
        std::fs::write(d.join("ns.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n").unwrap();
        let mut src = LocalDirSource::new(d).with_interval(Duration::from_millis(10));
        let s = src.poll(Duration::ZERO).unwrap().unwrap();
        assert!(s.namespaces.contains_key("a"));
        assert!(src.poll(Duration::from_millis(30)).unwrap().is_none());

        // A bad object is refused on its own: the rest is still served.
        std::fs::write(d.join("bad.yaml"), "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: nope}\n")
            .unwrap();
        let s = src.poll(Duration::ZERO).unwrap().unwrap();
        assert!(s.namespaces.contains_key("a"));
        let msg = s.rejected.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n");
        assert!(msg.contains("bad.yaml") && msg.contains("status.podIP"), "{msg}");
        // The same state is not published again.
        assert!(src.poll(Duration::from_millis(30)).unwrap().is_none());

        // A file that stops being YAML keeps serving what it held.
        std::fs::write(d.join("ns.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: a\n").unwrap();
        let s = src.poll(Duration::ZERO).unwrap().unwrap();
        assert!(s.namespaces.contains_key("a"), "the file's last good objects keep serving");
        assert!(s.rejected.iter().any(|r| r.key.kind == "File" && r.instead == crate::model::Instead::Previous), "{:?}", s.rejected);
        std::fs::write(d.join("ns.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n").unwrap();
        assert!(src.poll(Duration::ZERO).unwrap().unwrap().rejected.iter().all(|r| r.key.kind != "File"));
        // A file that never parsed holds everything back (it may hold a
        // DENY policy): the previous snapshot stays.
        std::fs::write(d.join("new.yaml"), "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d\n").unwrap();
        let err = src.poll(Duration::ZERO).unwrap_err().report();
        assert!(err.contains("new.yaml"), "{err}");
        std::fs::remove_file(d.join("new.yaml")).unwrap();

        std::fs::write(d.join(".hidden.yaml"), "garbage: [").unwrap();
        std::fs::remove_file(d.join("bad.yaml")).unwrap();
        assert!(src.poll(Duration::ZERO).unwrap().is_some());
    }
}
