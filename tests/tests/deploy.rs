//! Offline checks of the Kubernetes install in `deploy/`: every overlay
//! renders (a small renderer for exactly the kustomize features deploy/
//! uses, cross-checked against `kubectl kustomize` where kubectl exists),
//! every object validates against the pinned Kubernetes version's schemas
//! (kubernetes-validate, strict, installed by `cargo xtask setup`), and the
//! RBAC grants equal the table in deploy/rbac-expectations.tsv — nothing
//! missing, nothing extra.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use serde_yaml::Value;

/// The Kubernetes version manifests are validated against.
const KUBERNETES_VERSION: &str = "1.34.0";
/// Pinned in xtask (`setup`), which installs it into this venv.
const VALIDATOR_VERSION: &str = "1.34.1";
/// Overlays a user applies.
const OVERLAYS: &[&str] = &["", "with-crds", "crds", "uninstall", "waypoint"];
/// API groups whose objects kubernetes-validate has no schema for (CRD
/// instances), skipped by name. deploy/ creates none today; an object of
/// any other non-built-in group fails the test.
const SKIP_GROUPS: &[&str] = &[];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("deploy")
}

/// Renders the kustomization in `dir`: `resources` (files, or directories
/// with their own kustomization) and `images` (name → newName/newTag).
/// Anything else in a kustomization is an error, so the renderer cannot
/// silently ignore a feature someone starts using.
fn render(dir: &Path) -> Vec<Value> {
    let path = dir.join("kustomization.yaml");
    let k: Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for key in k.as_mapping().unwrap().keys() {
        let key = key.as_str().unwrap();
        assert!(
            ["apiVersion", "kind", "resources", "images"].contains(&key),
            "{}: `{key}` is not supported by the test's renderer (extend render())",
            path.display()
        );
    }
    let mut out = Vec::new();
    for r in k["resources"].as_sequence().into_iter().flatten() {
        let p = dir.join(r.as_str().unwrap());
        if p.is_dir() {
            out.extend(render(&p));
        } else {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                if !v.is_null() {
                    out.push(v);
                }
            }
        }
    }
    for img in k["images"].as_sequence().into_iter().flatten() {
        let name = img["name"].as_str().unwrap();
        let new = format!("{}:{}", img["newName"].as_str().unwrap_or(name), img["newTag"].as_str().unwrap_or("latest"));
        for obj in &mut out {
            set_images(obj, name, &new);
        }
    }
    out
}

use serde::Deserialize as _;

fn set_images(v: &mut Value, name: &str, new: &str) {
    match v {
        Value::Mapping(m) => {
            for (k, val) in m.iter_mut() {
                if k.as_str() == Some("image") {
                    if let Some(s) = val.as_str() {
                        let base = s.split([':', '@']).next().unwrap_or(s);
                        if base == name {
                            *val = Value::String(new.to_owned());
                        }
                    }
                } else {
                    set_images(val, name, new);
                }
            }
        }
        Value::Sequence(s) => s.iter_mut().for_each(|x| set_images(x, name, new)),
        _ => {}
    }
}

fn key(v: &Value) -> (String, String, String) {
    let s = |x: &Value| x.as_str().unwrap_or("").to_owned();
    (s(&v["kind"]), s(&v["metadata"]["namespace"]), s(&v["metadata"]["name"]))
}

fn to_json(v: &Value) -> serde_json::Value {
    serde_json::to_value(v).unwrap()
}

fn ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

#[test]
fn every_overlay_renders_and_matches_kubectl_kustomize() {
    for o in OVERLAYS {
        let objs = render(&deploy_dir().join(o));
        assert!(!objs.is_empty(), "overlay {o:?} renders nothing");
        let mut keys: Vec<_> = objs.iter().map(key).collect();
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n, "overlay {o:?} has duplicate objects");
        for obj in &objs {
            if let Some(img) = obj["spec"]["template"]["spec"]["containers"][0]["image"].as_str() {
                assert_eq!(img, "skiff:dev", "{:?}: images go through the kustomize images transformer", key(obj));
            }
        }
        // Cross-check against the real kustomize when it is installed.
        let Ok(out) = Command::new("kubectl").arg("kustomize").arg(deploy_dir().join(o)).output() else {
            eprintln!("kubectl not installed: rendered {o:?} with the test's renderer only");
            continue;
        };
        assert!(out.status.success(), "kubectl kustomize {o:?}: {}", String::from_utf8_lossy(&out.stderr));
        let theirs: BTreeMap<_, _> = serde_yaml::Deserializer::from_slice(&out.stdout)
            .map(|d| Value::deserialize(d).unwrap())
            .filter(|v| !v.is_null())
            .map(|v| (key(&v), to_json(&v)))
            .collect();
        let ours: BTreeMap<_, _> = objs.iter().map(|v| (key(v), to_json(v))).collect();
        let differ: Vec<_> = ours
            .keys()
            .chain(theirs.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|k| ours.get(*k) != theirs.get(*k))
            .map(|k| format!("{k:?}:\n  ours:   {:?}\n  kubectl: {:?}", ours.get(k), theirs.get(k)))
            .collect();
        assert!(differ.is_empty(), "overlay {o:?}: the test's renderer and kubectl kustomize disagree:\n{}", differ.join("\n"));
    }
}

fn validator() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from)?;
    let bin = home.join(".cache/skiff/venv/bin/kubernetes-validate");
    let version = Command::new(&bin).arg("--version").output().ok()?;
    let v = String::from_utf8_lossy(&version.stdout).to_string() + &String::from_utf8_lossy(&version.stderr);
    assert!(v.contains(VALIDATOR_VERSION), "{} is {v:?}, want {VALIDATOR_VERSION}: run `cargo xtask setup`", bin.display());
    Some(bin)
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let Some(bin) = validator() else {
        assert!(!ci(), "kubernetes-validate {VALIDATOR_VERSION} is not installed in ~/.cache/skiff/venv: run `cargo xtask setup`");
        eprintln!("SKIPPED: kubernetes-validate not installed (run `cargo xtask setup`)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("skiff-deploy-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let builtin = |api: &str| {
        let group = api.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        !group.contains('.') || group.ends_with(".k8s.io")
    };
    let mut files = Vec::new();
    for o in OVERLAYS {
        for (i, obj) in render(&deploy_dir().join(o)).iter().enumerate() {
            let api = obj["apiVersion"].as_str().unwrap_or("");
            let group = api.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
            if SKIP_GROUPS.contains(&group) {
                eprintln!("skipped (CRD instance, listed in SKIP_GROUPS): {:?}", key(obj));
                continue;
            }
            assert!(builtin(api), "{:?} ({api}) has no built-in schema and is not in SKIP_GROUPS", key(obj));
            let f = dir.join(format!("{}-{i}.yaml", if o.is_empty() { "deploy" } else { o }));
            std::fs::write(&f, serde_yaml::to_string(obj).unwrap()).unwrap();
            files.push(f);
        }
    }
    let out = Command::new(&bin).args(["--strict", "--kubernetes-version", KUBERNETES_VERSION]).args(&files).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let bad: Vec<&str> = text.lines().filter(|l| !l.starts_with("INFO")).collect();
    assert!(out.status.success() && bad.is_empty(), "kubernetes-validate --strict (Kubernetes {KUBERNETES_VERSION}):\n{text}");
    let passed = text.lines().filter(|l| l.starts_with("INFO") && l.contains("passed")).count();
    assert_eq!(passed, files.len(), "{text}");
}

/// (subject, verb, apiGroup, resource, resourceName) — "core" for the "" group, "*" for any name.
type Grant = (String, String, String, String, String);

/// The table in deploy/rbac-expectations.tsv.
pub fn expected_grants() -> BTreeSet<Grant> {
    let text = std::fs::read_to_string(deploy_dir().join("rbac-expectations.tsv")).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 6, "rbac-expectations.tsv: line without a used-by column: {l:?}");
            (f[0].into(), f[1].into(), f[2].into(), f[3].into(), f[4].into())
        })
        .collect()
}

/// What the rendered RBAC grants each service account.
fn granted(objs: &[Value]) -> BTreeSet<Grant> {
    let roles: BTreeMap<(String, String, String), &Value> = objs
        .iter()
        .filter(|o| matches!(o["kind"].as_str(), Some("ClusterRole" | "Role")))
        .map(|o| {
            let (k, ns, n) = key(o);
            ((k, ns, n), o)
        })
        .collect();
    let mut out = BTreeSet::new();
    for b in objs.iter().filter(|o| matches!(o["kind"].as_str(), Some("ClusterRoleBinding" | "RoleBinding"))) {
        let (bk, bns, bn) = key(b);
        let rk = b["roleRef"]["kind"].as_str().unwrap().to_owned();
        let rns = if rk == "Role" { bns.clone() } else { String::new() };
        let role = roles
            .get(&(rk.clone(), rns, b["roleRef"]["name"].as_str().unwrap().to_owned()))
            .unwrap_or_else(|| panic!("{bk} {bns}/{bn} refers to a missing {rk}"));
        for s in b["subjects"].as_sequence().unwrap() {
            assert_eq!(s["kind"], "ServiceAccount", "{bk} {bn}: only service accounts are bound");
            let subject = format!("{}/{}", s["namespace"].as_str().unwrap(), s["name"].as_str().unwrap());
            for r in role["rules"].as_sequence().unwrap() {
                let list = |k: &str| -> Vec<String> {
                    r[k].as_sequence().map(|s| s.iter().map(|x| x.as_str().unwrap().to_owned()).collect()).unwrap_or_default()
                };
                let names = list("resourceNames");
                let names = if names.is_empty() { vec!["*".to_owned()] } else { names };
                for verb in list("verbs") {
                    assert_ne!(verb, "*", "wildcard verb in {bk} {bn}");
                    for group in list("apiGroups") {
                        assert_ne!(group, "*", "wildcard apiGroup in {bk} {bn}");
                        let group = if group.is_empty() { "core".to_owned() } else { group };
                        for res in list("resources") {
                            assert!(!res.contains('*'), "wildcard resource in {bk} {bn}");
                            for name in &names {
                                out.insert((subject.clone(), verb.clone(), group.clone(), res.clone(), name.clone()));
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

#[test]
fn rbac_grants_exactly_what_the_code_uses() {
    let objs = render(&deploy_dir());
    let granted = granted(&objs);
    let expected = expected_grants();
    let missing: Vec<_> = expected.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&expected).collect();
    assert!(missing.is_empty() && extra.is_empty(), "RBAC vs deploy/rbac-expectations.tsv:\n missing: {missing:#?}\n extra: {extra:#?}");
    // Every bound service account exists in the install.
    let sas: BTreeSet<String> = objs
        .iter()
        .filter(|o| o["kind"] == "ServiceAccount")
        .map(|o| format!("{}/{}", o["metadata"]["namespace"].as_str().unwrap(), o["metadata"]["name"].as_str().unwrap()))
        .collect();
    for (s, ..) in &granted {
        assert!(sas.contains(s), "{s} is bound but not created");
    }
}

#[test]
fn node_daemonset_is_wired_as_the_code_expects() {
    let objs = render(&deploy_dir());
    let ds = objs.iter().find(|o| key(o) == ("DaemonSet".into(), "skiff-system".into(), "skiff-node".into())).expect("DaemonSet skiff-node");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["serviceAccountName"], "ztunnel");
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1);
    let containers = spec["containers"].as_sequence().unwrap();
    let c = |name: &str| containers.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("container {name}"));
    for name in ["node-agent", "ztunnel"] {
        let env = c(name)["env"].as_sequence().unwrap();
        let node = env.iter().find(|e| e["name"] == "SKIFF_NODE_NAME").expect("SKIFF_NODE_NAME");
        assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
        let args: Vec<&str> = c(name)["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert!(args.contains(&"--kube"), "{name}: {args:?}");
    }
    // Probes on the ports and path the code serves.
    assert_eq!(c("node-agent")["readinessProbe"]["httpGet"]["port"], 15022);
    assert_eq!(c("ztunnel")["readinessProbe"]["httpGet"]["port"], 15021);
    for name in ["node-agent", "ztunnel"] {
        assert_eq!(c(name)["readinessProbe"]["httpGet"]["path"], "/healthz/ready");
    }
    // The CNI plugin's socket and state file are where skiff-cni (on the host) looks by default.
    let na: Vec<&str> = c("node-agent")["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(na.contains(&format!("--cni-socket={}", skiff_cni::DEFAULT_SOCKET).as_str()), "{na:?}");
    assert!(na.contains(&format!("--cni-state-file={}", skiff_cni::DEFAULT_STATE_FILE).as_str()), "{na:?}");
}
