//! Putting `skiff-cni` into the node's CNI chain and taking it out again.
//!
//! The container runtime uses the lexically first `*.conf`, `*.conflist` or
//! `*.json` file in its config directory (libcni's order), so that file is
//! the one Skiff edits. Edits are textual — the plugin entry is spliced into
//! the `plugins` array, and cut out of it — so everything else in the file
//! (key order, formatting, fields Skiff does not know) stays byte for byte;
//! every result is re-parsed before it is written. A lone network config
//! (`.conf`) becomes a `.conflist` with the original object as its first
//! plugin; the original is kept beside it as `<name>.skiff-orig` (an
//! extension the runtime ignores) and put back on uninstall. Files are
//! replaced by rename, so the runtime never reads half a file.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use serde_json::Value;

use crate::PLUGIN_TYPE;

/// Suffix of a lone `.conf` Skiff turned into a `.conflist`.
pub const ORIG_SUFFIX: &str = ".skiff-orig";

/// Errors editing CNI configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    /// A file or the directory could not be read or written.
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A CNI config file is not JSON.
    #[error("{path}: not valid JSON")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The file is JSON but not a CNI network configuration (list).
    #[error("{path}: not a CNI network configuration: {what}")]
    NotCni { path: PathBuf, what: &'static str },
    /// No CNI configuration yet (the primary CNI has not written it).
    #[error("no CNI network configuration in {0}")]
    NoPrimary(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ConfError + '_ {
    move |source| ConfError::Io { path: path.to_owned(), source }
}

/// Whether the runtime would load `name` as a CNI config.
fn is_config_name(name: &str) -> bool {
    !name.starts_with('.') && [".conf", ".conflist", ".json"].iter().any(|ext| name.ends_with(ext))
}

/// The config file the runtime uses: the lexically first one.
pub fn primary(dir: &Path) -> Result<Option<PathBuf>, ConfError> {
    let mut names = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_config_name(&name) && entry.file_type().map_err(io(dir))?.is_file() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names.into_iter().next().map(|n| dir.join(n)))
}

/// Byte offsets of the top-level `plugins` array's `[` and `]`, and of each
/// element (start, end) inside it.
struct PluginsArray {
    open: usize,
    close: usize,
    elements: Vec<(usize, usize)>,
}

/// A small JSON scanner: enough structure (strings, nesting) to find the
/// top-level `plugins` array in text that already parsed as JSON.
fn plugins_array(text: &str) -> Option<PluginsArray> {
    let b = text.as_bytes();
    let (mut depth, mut i) = (0usize, 0usize);
    let mut last_key: Option<(usize, usize)> = None;
    let mut pending_plugins = false;
    let mut arr: Option<PluginsArray> = None;
    let mut elem_start: Option<usize> = None;
    while i < b.len() {
        let c = b[i];
        // Array elements are recorded at depth 2 (inside `[` of plugins).
        if arr.is_some() && depth == 2 && elem_start.is_none() && !c.is_ascii_whitespace() && c != b',' && c != b']' {
            elem_start = Some(i);
        }
        match c {
            b'"' => {
                let start = i;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                if depth == 1 {
                    last_key = Some((start + 1, i));
                }
            }
            b':' if depth == 1 => {
                pending_plugins = last_key.take().is_some_and(|(s, e)| &text[s..e] == "plugins");
            }
            b',' if depth == 1 => pending_plugins = false,
            b',' if depth == 2 && arr.is_some() => {
                if let (Some(a), Some(s)) = (arr.as_mut(), elem_start.take()) {
                    a.elements.push((s, trim_end(b, i)));
                }
            }
            b'{' | b'[' => {
                if c == b'[' && depth == 1 && pending_plugins && arr.is_none() {
                    arr = Some(PluginsArray { open: i, close: 0, elements: Vec::new() });
                }
                depth += 1;
            }
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if c == b']' && depth == 1 {
                    if let Some(mut a) = arr.take().filter(|a| a.close == 0) {
                        if let Some(s) = elem_start.take() {
                            a.elements.push((s, trim_end(b, i)));
                        }
                        a.close = i;
                        return Some(a);
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn trim_end(b: &[u8], mut end: usize) -> usize {
    while end > 0 && b[end - 1].is_ascii_whitespace() {
        end -= 1;
    }
    end
}

fn is_skiff(v: &Value) -> bool {
    v.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn parse(path: &Path, text: &str) -> Result<Value, ConfError> {
    serde_json::from_str(text).map_err(|source| ConfError::Json { path: path.to_owned(), source })
}

/// Adds `entry` (a JSON object, compact) as the last plugin of the conflist
/// `text`. `Ok(None)`: a Skiff entry is already there.
pub fn insert(path: &Path, text: &str, entry: &str) -> Result<Option<String>, ConfError> {
    let v = parse(path, text)?;
    let plugins = v
        .get("plugins")
        .and_then(Value::as_array)
        .ok_or(ConfError::NotCni { path: path.to_owned(), what: "no `plugins` array" })?;
    if plugins.iter().any(is_skiff) {
        return Ok(None);
    }
    let arr = plugins_array(text).ok_or(ConfError::NotCni { path: path.to_owned(), what: "no top-level `plugins` array" })?;
    let out = match arr.elements.last() {
        Some(&(start, end)) => {
            // Same indentation as the entry before ours.
            let before = &text[..start];
            let ws_from = before.trim_end().len();
            let indent = &text[ws_from..start];
            format!("{},{indent}{entry}{}", &text[..end], &text[end..])
        }
        None => format!("{}{entry}{}", &text[..=arr.open], &text[arr.close..]),
    };
    check(path, &out, true)?;
    Ok(Some(out))
}

/// Removes every Skiff entry from the conflist `text`. `Ok(None)`: there was none.
pub fn remove(path: &Path, text: &str) -> Result<Option<String>, ConfError> {
    let v = parse(path, text)?;
    if !v.get("plugins").and_then(Value::as_array).is_some_and(|p| p.iter().any(is_skiff)) {
        return Ok(None);
    }
    let arr = plugins_array(text).ok_or(ConfError::NotCni { path: path.to_owned(), what: "no top-level `plugins` array" })?;
    let mut out = text.to_owned();
    let els = &arr.elements;
    for k in (0..els.len()).rev() {
        let (s, e) = els[k];
        if !serde_json::from_str::<Value>(&text[s..e]).is_ok_and(|v| is_skiff(&v)) {
            continue;
        }
        // Cut the entry with the comma that joins it to its neighbour.
        let (cut_s, cut_e) = if k > 0 {
            (els[k - 1].1, e)
        } else if els.len() > 1 {
            (s, els[1].0)
        } else {
            (s, e)
        };
        out.replace_range(cut_s..cut_e, "");
    }
    check(path, &out, false)?;
    Ok(Some(out))
}

fn check(path: &Path, text: &str, want_skiff: bool) -> Result<(), ConfError> {
    let v = parse(path, text)?;
    let has = v.get("plugins").and_then(Value::as_array).is_some_and(|p| p.iter().any(is_skiff));
    if has != want_skiff {
        return Err(ConfError::NotCni { path: path.to_owned(), what: "edit did not produce the expected plugin list" });
    }
    Ok(())
}

/// Turns a lone network configuration into a conflist whose only plugin is
/// that configuration (the original text kept as it was).
pub fn conf_to_conflist(path: &Path, text: &str) -> Result<String, ConfError> {
    let v = parse(path, text)?;
    let s = |k: &str| v.get(k).and_then(Value::as_str);
    let (Some(version), Some(name), Some(_)) = (s("cniVersion"), s("name"), s("type")) else {
        return Err(ConfError::NotCni { path: path.to_owned(), what: "a network configuration needs cniVersion, name and type" });
    };
    let q = |x: &str| Value::String(x.to_owned()).to_string();
    let body = text.trim().lines().collect::<Vec<_>>().join("\n    ");
    Ok(format!(
        "{{\n  \"cniVersion\": {},\n  \"name\": {},\n  \"plugins\": [\n    {body}\n  ]\n}}\n",
        q(version),
        q(name)
    ))
}

/// Writes `text` to `path` by rename (same directory, so the rename is atomic).
pub fn write_atomic(path: &Path, text: &[u8], mode: u32) -> Result<(), ConfError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.skiff-tmp-{}", std::process::id()));
    let res = (|| {
        let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(io(&tmp))?;
        f.write_all(text).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, path).map_err(io(path))
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

fn file_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644)
}

/// What [`ensure_installed`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Installed {
    /// The primary config already chains Skiff.
    AlreadyThere(PathBuf),
    /// Skiff was added to this conflist.
    Inserted(PathBuf),
    /// A lone `.conf` became this conflist with Skiff in it.
    Converted(PathBuf),
}

/// Makes the primary CNI config chain `entry`.
pub fn ensure_installed(dir: &Path, entry: &str) -> Result<Installed, ConfError> {
    let path = primary(dir)?.ok_or_else(|| ConfError::NoPrimary(dir.to_owned()))?;
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    let v = parse(&path, &text)?;
    if v.get("plugins").is_some() {
        return match insert(&path, &text, entry)? {
            None => Ok(Installed::AlreadyThere(path)),
            Some(out) => {
                write_atomic(&path, out.as_bytes(), file_mode(&path))?;
                Ok(Installed::Inserted(path))
            }
        };
    }
    // A lone network config: the conflist takes its place (same stem, so it
    // sorts where the original did), the original is set aside.
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let list_path = dir.join(format!("{stem}.conflist"));
    let list = conf_to_conflist(&path, &text)?;
    let out = insert(&list_path, &list, entry)?.unwrap_or(list);
    write_atomic(&list_path, out.as_bytes(), file_mode(&path))?;
    let orig = dir.join(format!("{}{ORIG_SUFFIX}", path.file_name().unwrap_or_default().to_string_lossy()));
    fs::rename(&path, &orig).map_err(io(&path))?;
    Ok(Installed::Converted(list_path))
}

/// Takes Skiff out of every CNI config in `dir` and puts back any `.conf`
/// it converted. Returns the files changed.
pub fn uninstall(dir: &Path) -> Result<Vec<PathBuf>, ConfError> {
    let mut changed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(changed),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut names: Vec<String> = entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    for name in &names {
        let path = dir.join(name);
        if let Some(conf) = name.strip_suffix(ORIG_SUFFIX) {
            // Skiff made `<stem>.conflist` out of this file: restore it.
            let stem = Path::new(conf).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let list = dir.join(format!("{stem}.conflist"));
            match fs::remove_file(&list) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&list)(e)),
                _ => {}
            }
            fs::rename(&path, dir.join(conf)).map_err(io(&path))?;
            changed.push(dir.join(conf));
        }
    }
    for name in names.iter().filter(|n| is_config_name(n)) {
        let path = dir.join(name);
        let Ok(text) = fs::read_to_string(&path) else { continue };
        let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
        if v.get("plugins").is_none() {
            continue;
        }
        if let Some(out) = remove(&path, &text)? {
            write_atomic(&path, out.as_bytes(), file_mode(&path))?;
            changed.push(path);
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTRY: &str = r#"{"type":"skiff-cni","agentSocket":"/var/run/skiff/cni.sock"}"#;
    const FLANNEL: &str = r#"{
  "name": "cbr0",
  "cniVersion": "1.0.0",
  "plugins": [
    {
      "type": "flannel",
      "delegate": {"hairpinMode": true, "isDefaultGateway": true}
    },
    {
      "type": "portmap",
      "capabilities": {"portMappings": true}
    }
  ],
  "x-unknown": ["plugins", {"plugins": []}]
}
"#;

    fn p() -> PathBuf {
        PathBuf::from("10-flannel.conflist")
    }

    #[test]
    fn insert_keeps_everything_else_and_is_idempotent() {
        let out = insert(&p(), FLANNEL, ENTRY).unwrap().unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        let types: Vec<&str> = v["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["flannel", "portmap", "skiff-cni"]);
        // Everything but the insertion is byte-identical.
        let added = format!(",\n    {ENTRY}");
        assert_eq!(out.replacen(&added, "", 1), FLANNEL);
        // Again: nothing to do.
        assert!(insert(&p(), &out, ENTRY).unwrap().is_none());
        // Removal gives back the original bytes.
        assert_eq!(remove(&p(), &out).unwrap().unwrap(), FLANNEL);
        assert!(remove(&p(), FLANNEL).unwrap().is_none());
    }

    #[test]
    fn insert_into_empty_and_compact_lists() {
        let empty = r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#;
        let out = insert(&p(), empty, ENTRY).unwrap().unwrap();
        assert_eq!(out, format!(r#"{{"cniVersion":"1.0.0","name":"n","plugins":[{ENTRY}]}}"#));
        assert_eq!(remove(&p(), &out).unwrap().unwrap(), empty);
        let compact = r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"a"},{"type":"b"}]}"#;
        let out = insert(&p(), compact, ENTRY).unwrap().unwrap();
        assert!(out.ends_with(&format!(r#"{{"type":"b"}},{ENTRY}]}}"#)), "{out}");
        assert_eq!(remove(&p(), &out).unwrap().unwrap(), compact);
    }

    #[test]
    fn remove_from_the_front_or_middle() {
        let list = format!(r#"{{"cniVersion":"1.0.0","name":"n","plugins":[{ENTRY}, {{"type":"a"}}, {ENTRY}, {{"type":"b"}}]}}"#);
        let out = remove(&p(), &list).unwrap().unwrap();
        assert_eq!(out, r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"a"}, {"type":"b"}]}"#);
    }

    #[test]
    fn strings_with_brackets_do_not_confuse_the_scanner() {
        let tricky = r#"{"name":"a]\"plugins\"[","cniVersion":"1.0.0","plugins":[{"type":"x","k":"]},{"}]}"#;
        let out = insert(&p(), tricky, ENTRY).unwrap().unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["plugins"][0]["k"], "]},{");
        assert_eq!(v["plugins"][1]["type"], "skiff-cni");
        assert_eq!(remove(&p(), &out).unwrap().unwrap(), tricky);
    }

    #[test]
    fn not_a_conflist_is_an_error_naming_the_file() {
        let e = insert(Path::new("/etc/cni/net.d/x.conflist"), "{\"name\":1}", ENTRY).unwrap_err();
        assert!(e.to_string().contains("x.conflist") && e.to_string().contains("plugins"), "{e}");
        let e = insert(Path::new("/etc/cni/net.d/y.conflist"), "{", ENTRY).unwrap_err();
        assert!(e.to_string().contains("y.conflist"), "{e}");
    }

    fn tmp(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new().prefix(&format!("skiff-cni-{tag}-")).tempdir().unwrap()
    }

    #[test]
    fn install_edits_the_lexically_first_config_and_uninstall_restores_it() {
        let t = tmp("first");
        fs::write(t.path().join("10-flannel.conflist"), FLANNEL).unwrap();
        fs::write(t.path().join("20-other.conflist"), FLANNEL).unwrap();
        fs::write(t.path().join("00-notes.txt"), "ignored").unwrap();
        assert_eq!(ensure_installed(t.path(), ENTRY).unwrap(), Installed::Inserted(t.path().join("10-flannel.conflist")));
        assert_eq!(ensure_installed(t.path(), ENTRY).unwrap(), Installed::AlreadyThere(t.path().join("10-flannel.conflist")));
        assert_eq!(fs::read_to_string(t.path().join("20-other.conflist")).unwrap(), FLANNEL);
        uninstall(t.path()).unwrap();
        assert_eq!(fs::read_to_string(t.path().join("10-flannel.conflist")).unwrap(), FLANNEL);
        let mut left: Vec<_> = fs::read_dir(t.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, ["00-notes.txt", "10-flannel.conflist", "20-other.conflist"]);
    }

    #[test]
    fn a_lone_conf_becomes_a_conflist_and_comes_back() {
        let t = tmp("conf");
        let conf = "{\n  \"cniVersion\": \"0.4.0\",\n  \"name\": \"bridge\",\n  \"type\": \"bridge\",\n  \"ipam\": {\"type\": \"host-local\"}\n}\n";
        fs::write(t.path().join("10-bridge.conf"), conf).unwrap();
        let list_path = t.path().join("10-bridge.conflist");
        assert_eq!(ensure_installed(t.path(), ENTRY).unwrap(), Installed::Converted(list_path.clone()));
        // The runtime now picks the conflist: the .conf is out of the way.
        assert_eq!(primary(t.path()).unwrap(), Some(list_path.clone()));
        let v: Value = serde_json::from_str(&fs::read_to_string(&list_path).unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["name"], "bridge");
        assert_eq!(v["plugins"][0]["ipam"]["type"], "host-local");
        assert_eq!(v["plugins"][1]["type"], "skiff-cni");
        assert_eq!(ensure_installed(t.path(), ENTRY).unwrap(), Installed::AlreadyThere(list_path.clone()));
        uninstall(t.path()).unwrap();
        assert_eq!(fs::read_to_string(t.path().join("10-bridge.conf")).unwrap(), conf);
        assert!(!list_path.exists());
    }

    #[test]
    fn no_config_yet_is_reported() {
        let t = tmp("none");
        assert!(matches!(ensure_installed(t.path(), ENTRY), Err(ConfError::NoPrimary(_))));
        assert!(uninstall(&t.path().join("missing")).unwrap().is_empty());
    }
}
