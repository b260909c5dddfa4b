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

use serde_json::Value;

/// The Kubernetes version manifests are validated against.
const KUBERNETES_VERSION: &str = "1.34.0";
/// Pinned in xtask (`setup`), which installs it into this venv.
const VALIDATOR_VERSION: &str = "1.34.1";
/// Overlays a user applies.
const OVERLAYS: &[&str] = &["", "with-crds", "crds", "uninstall", "waypoint", "gateway", "monitoring"];
/// API groups whose objects kubernetes-validate has no schema for (CRD
/// instances), skipped by name: the Prometheus Operator's PodMonitors of
/// deploy/monitoring. An object of any other non-built-in group fails the
/// test.
const SKIP_GROUPS: &[&str] = &["monitoring.coreos.com"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("deploy")
}

/// Renders the kustomization in `dir`: `resources` (files, or directories
/// with their own kustomization) and `images` (name → newName/newTag).
/// Anything else in a kustomization is an error, so the renderer cannot
/// silently ignore a feature someone starts using.
fn render(dir: &Path) -> Vec<Value> {
    let path = dir.join("kustomization.yaml");
    let k: Value = serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for key in k.as_object().unwrap().keys() {
        let key = key.as_str();
        assert!(
            ["apiVersion", "kind", "resources", "images"].contains(&key),
            "{}: `{key}` is not supported by the test's renderer (extend render())",
            path.display()
        );
    }
    let mut out = Vec::new();
    for r in k["resources"].as_array().into_iter().flatten() {
        let p = dir.join(r.as_str().unwrap());
        if p.is_dir() {
            out.extend(render(&p));
        } else {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            for v in serde_saphyr::from_multiple::<Value>(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display())) {
                if !v.is_null() {
                    out.push(v);
                }
            }
        }
    }
    for img in k["images"].as_array().into_iter().flatten() {
        let name = img["name"].as_str().unwrap();
        let new = format!("{}:{}", img["newName"].as_str().unwrap_or(name), img["newTag"].as_str().unwrap_or("latest"));
        for obj in &mut out {
            set_images(obj, name, &new);
        }
    }
    out
}

fn set_images(v: &mut Value, name: &str, new: &str) {
    match v {
        Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                if k == "image" {
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
        Value::Array(s) => s.iter_mut().for_each(|x| set_images(x, name, new)),
        _ => {}
    }
}

fn key(v: &Value) -> (String, String, String) {
    let s = |x: &Value| x.as_str().unwrap_or("").to_owned();
    (s(&v["kind"]), s(&v["metadata"]["namespace"]), s(&v["metadata"]["name"]))
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
        let theirs: BTreeMap<_, _> = serde_saphyr::from_multiple::<Value>(&String::from_utf8_lossy(&out.stdout))
            .unwrap()
            .into_iter()
            .filter(|v| !v.is_null())
            .map(|v| (key(&v), v))
            .collect();
        let ours: BTreeMap<_, _> = objs.iter().map(|v| (key(v), v.clone())).collect();
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
    let objs: Vec<(String, Value)> = OVERLAYS
        .iter()
        .flat_map(|o| render(&deploy_dir().join(o)).into_iter().map(move |v| ((if o.is_empty() { "deploy" } else { o }).to_string(), v)))
        .collect();
    validate(&objs);
}

/// Validates each object (named by where it came from) strictly against
/// the pinned Kubernetes schemas; CRD instances of SKIP_GROUPS are
/// skipped by name.
fn validate(objs: &[(String, Value)]) {
    let Some(bin) = validator() else {
        assert!(!ci(), "kubernetes-validate {VALIDATOR_VERSION} is not installed in ~/.cache/skiff/venv: run `cargo xtask setup`");
        eprintln!("SKIPPED: kubernetes-validate not installed (run `cargo xtask setup`)");
        return;
    };
    // Removed however the test ends.
    let tmp = tempfile::Builder::new().prefix("skiff-deploy-validate-").tempdir().unwrap();
    let dir = tmp.path();
    let builtin = |api: &str| {
        let group = api.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        !group.contains('.') || group.ends_with(".k8s.io")
    };
    let mut files = Vec::new();
    for (i, (from, obj)) in objs.iter().enumerate() {
        let api = obj["apiVersion"].as_str().unwrap_or("");
        let group = api.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        if SKIP_GROUPS.contains(&group) {
            eprintln!("skipped (CRD instance, listed in SKIP_GROUPS): {:?}", key(obj));
            continue;
        }
        assert!(builtin(api), "{:?} ({api}) has no built-in schema and is not in SKIP_GROUPS", key(obj));
        let f = dir.join(format!("{from}-{i}.yaml"));
        std::fs::write(&f, serde_saphyr::to_string(obj).unwrap()).unwrap();
        files.push(f);
    }
    let out = Command::new(&bin).args(["--strict", "--kubernetes-version", KUBERNETES_VERSION]).args(&files).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let bad: Vec<&str> = text.lines().filter(|l| !l.starts_with("INFO")).collect();
    assert!(out.status.success() && bad.is_empty(), "kubernetes-validate --strict (Kubernetes {KUBERNETES_VERSION}):\n{text}");
    let passed = text.lines().filter(|l| l.starts_with("INFO") && l.contains("passed")).count();
    assert_eq!(passed, files.len(), "{text}");
}

/// `skiff install --dry-run ARGS`: the objects it would apply.
fn skiff_install(args: &[&str]) -> Vec<Value> {
    let skiff = skiff_e2e::bin_dir().join("skiff");
    let out = Command::new(&skiff).args(["install", "--dry-run"]).args(args).output().unwrap_or_else(|e| panic!("{}: {e} (cargo build --bins)", skiff.display()));
    assert!(out.status.success(), "skiff install {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_saphyr::from_multiple::<Value>(&String::from_utf8_lossy(&out.stdout)).unwrap().into_iter().filter(|v| !v.is_null()).collect()
}

/// `skiff install` renders exactly what the overlays render (it carries
/// deploy/ inside it), with the image and the waypoint's namespace
/// chosen by flags.
#[test]
fn skiff_install_renders_the_overlays() {
    let by_key = |objs: Vec<Value>| -> BTreeMap<(String, String, String), Value> { objs.into_iter().map(|v| (key(&v), v)).collect() };
    let overlay = |o: &str| render(&deploy_dir().join(o));
    let cases: Vec<(Vec<&str>, Vec<Value>)> = vec![
        (vec![], overlay("")),
        (vec!["--crds"], overlay("with-crds")),
        (vec!["--gateway"], [overlay(""), overlay("gateway")].concat()),
        (vec!["--waypoint", "shop"], [overlay(""), overlay("waypoint")].concat()),
    ];
    for (args, want) in cases {
        let (got, want) = (by_key(skiff_install(&args)), by_key(want));
        let differ: Vec<_> = got.keys().chain(want.keys()).collect::<BTreeSet<_>>().into_iter().filter(|k| got.get(*k) != want.get(*k)).collect();
        assert!(differ.is_empty(), "skiff install {args:?} and the overlays differ on {differ:?}");
    }
    // Another namespace and image: every waypoint object moves, every
    // image is the one given.
    let objs = skiff_install(&["--waypoint", "payments", "--image", "registry.example/skiff:1.2"]);
    assert!(objs.iter().all(|v| v["metadata"]["namespace"] != "shop" && !v["metadata"]["name"].as_str().unwrap_or("").contains("shop")), "nothing left in shop");
    assert!(objs.iter().any(|v| key(v) == ("Deployment".into(), "payments".into(), "waypoint".into())));
    let text = serde_json::to_string(&objs).unwrap();
    assert_eq!(text.matches(r#""image":"registry.example/skiff:1.2""#).count(), 4, "node-agent, ztunnel, signer, waypoint");
    assert!(!text.contains(r#""image":"skiff"#));
}

/// `skiff install --dry-run --ca generate` with every part: valid for the
/// Kubernetes schemas, offline; the new root's public half wherever it is
/// read, its key in the Secret only (and redacted from the dry run's
/// output), in `--ca-out` to keep offline; the trust domain given to every
/// process that takes one.
#[test]
fn skiff_install_dry_run_validates_and_carries_a_new_root() {
    let keep = tempfile::tempdir().unwrap();
    let out = keep.path().join("root");
    let objs = skiff_install(&["--ca", "generate", "--ca-out", out.to_str().unwrap(), "--gateway", "--waypoint", "shop", "--waypoint", "payments", "--crds"]);
    let secret = objs.iter().find(|v| key(v) == ("Secret".into(), "skiff-system".into(), "skiff-ca".into())).expect("the CA Secret");
    let (key_pem, cert_pem) = (std::fs::read_to_string(out.join("ca-key.pem")).unwrap(), std::fs::read_to_string(out.join("ca-cert.pem")).unwrap());
    assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(out.join("ca-key.pem")).unwrap().permissions().mode() & 0o777, 0o600);
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let printed = serde_json::to_string(&objs).unwrap();
    assert!(!printed.contains(&b64(&key_pem)) && !printed.contains("PRIVATE KEY"), "the key never printed");
    assert_eq!(secret["data"]["ca-key.pem"], "UkVEQUNURUQ=", "redacted in the dry run");
    // The pair is a CA the signer can load and sign with.
    let ca = skiff_hbone::identity::Ca::load(&out.join("ca-key.pem"), &out.join("ca-cert.pem"), "cluster.local").unwrap();
    ca.issue(&skiff_hbone::identity::Identity::new("cluster.local", "shop", "client"), std::time::Duration::from_secs(60)).unwrap();
    let roots: BTreeSet<String> = objs
        .iter()
        .filter(|v| v["kind"] == "ConfigMap" && v["metadata"]["name"] == "skiff-ca-root")
        .map(|v| {
            assert_eq!(v["data"]["ca-cert.pem"].as_str(), Some(cert_pem.as_str()));
            v["metadata"]["namespace"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(roots, ["istio-system", "payments", "shop", "skiff-system"].map(String::from).into(), "ztunnel's, the gateway's and each waypoint's");
    let two = skiff_install(&["--ca", "generate"]);
    let other = two.iter().find(|v| v["kind"] == "ConfigMap").unwrap();
    assert_ne!(other["data"]["ca-cert.pem"].as_str(), Some(cert_pem.as_str()), "a new root each time");
    validate(&objs.into_iter().map(|v| ("install".to_owned(), v)).collect::<Vec<_>>());
    // Another trust domain: every process that takes one gets it.
    let objs = skiff_install(&["--trust-domain", "prod.example.com", "--gateway", "--waypoint", "shop"]);
    let text = serde_json::to_string(&objs).unwrap();
    assert_eq!(text.matches("--trust-domain=prod.example.com").count(), 4, "signer, ztunnel, gateway, waypoint");
    assert!(!text.contains("--trust-domain=cluster.local"));
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
        for s in b["subjects"].as_array().unwrap() {
            assert_eq!(s["kind"], "ServiceAccount", "{bk} {bn}: only service accounts are bound");
            let subject = format!("{}/{}", s["namespace"].as_str().unwrap(), s["name"].as_str().unwrap());
            for r in role["rules"].as_array().unwrap() {
                let list = |k: &str| -> Vec<String> {
                    r[k].as_array().map(|s| s.iter().map(|x| x.as_str().unwrap().to_owned()).collect()).unwrap_or_default()
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
    // The install and the ingress gateway (which binds the install's
    // config reader role and adds its own Secrets role).
    let mut objs = render(&deploy_dir());
    objs.extend(render(&deploy_dir().join("gateway")));
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
    let containers = spec["containers"].as_array().unwrap();
    let c = |name: &str| containers.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("container {name}"));
    for name in ["node-agent", "ztunnel"] {
        let env = c(name)["env"].as_array().unwrap();
        let node = env.iter().find(|e| e["name"] == "SKIFF_NODE_NAME").expect("SKIFF_NODE_NAME");
        assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
        let args: Vec<&str> = c(name)["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert!(args.contains(&"--kube"), "{name}: {args:?}");
    }
    // Probes on the ports and path the code serves.
    assert_eq!(c("node-agent")["readinessProbe"]["httpGet"]["port"], 15022);
    assert_eq!(c("ztunnel")["readinessProbe"]["httpGet"]["port"], 15021);
    for name in ["node-agent", "ztunnel"] {
        assert_eq!(c(name)["readinessProbe"]["httpGet"]["path"], "/healthz/ready");
    }
    // The CNI plugin's socket and state file are where skiff-cni (on the host) looks by default.
    let na: Vec<&str> = c("node-agent")["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(na.contains(&format!("--cni-socket={}", skiff_cni::DEFAULT_SOCKET).as_str()), "{na:?}");
    assert!(na.contains(&format!("--cni-state-file={}", skiff_cni::DEFAULT_STATE_FILE).as_str()), "{na:?}");
}

/// The other direction of the RBAC check: run the code that talks to the
/// API — the Kubernetes config source as node-agent and ztunnel run it, and
/// the signer through every path it has (ztunnel by node-name, ztunnel by
/// bound pod, a waypoint for its own identity) — against the fake API
/// server, record every request, and compare with the table, per service
/// account. A call the table (and so the RBAC) lacks, or a grant no code
/// uses, fails here.
#[test]
fn rbac_table_equals_what_the_code_asks_of_the_api() {
    use skiff_kube_fake::{FakeApiServer, TokenIdentity};
    use skiff_hbone::identity::{Ca, Identity};
    use std::time::{Duration, Instant};

    let table = |subject: &str| -> BTreeSet<(String, String, String)> {
        expected_grants()
            .into_iter()
            .filter(|g| g.0 == subject)
            .map(|(_, verb, group, res, _)| (verb, if group == "core" { String::new() } else { group }, res))
            .collect()
    };
    let asked = |fake: &FakeApiServer| -> BTreeSet<(String, String, String)> {
        fake.requests().into_iter().map(|r| (r.verb, r.group, r.resource)).collect()
    };
    let pod = |ns: &str, name: &str, node: &str, sa: &str, labels: serde_json::Value| {
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": labels},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": "10.244.1.10"}})
    };

    // node-agent / ztunnel (service account skiff-system/ztunnel).
    let fake = FakeApiServer::start().unwrap();
    fake.apply(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "app"}})).unwrap();
    fake.apply(pod("app", "web-1", "node-1", "web", serde_json::json!({}))).unwrap();
    // As ztunnel runs it (node-agent asks the same but the mesh config).
    let mut src = skiff_kube_source::SourceChoice::from_args(None, false, Some(fake.url())).unwrap().pods_on_node("node-1").mesh_config_in("istio-system").open().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "the Kubernetes source published no snapshot");
        if let Ok(Some(s)) = src.poll(Duration::from_millis(200)) {
            if s.namespaces.contains_key("app") {
                break;
            }
        }
    }
    // Every kind's watch is open by now or soon: wait until the set stops growing.
    let want = table("skiff-system/ztunnel");
    let deadline = Instant::now() + Duration::from_secs(10);
    while asked(&fake) != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(asked(&fake), want, "the config source's requests vs deploy/rbac-expectations.tsv (skiff-system/ztunnel)");
    drop(src);

    // The ingress gateway (istio-system/istio-ingressgateway): the same
    // config source, and its own namespace's Secrets.
    let fake = FakeApiServer::start().unwrap();
    fake.apply(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}})).unwrap();
    let mut src = skiff_kube_source::SourceChoice::from_args(None, false, Some(fake.url())).unwrap().secrets_in("istio-system").mesh_config_in("istio-system").telemetry().open().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "the gateway's Kubernetes source published no snapshot");
        if let Ok(Some(s)) = src.poll(Duration::from_millis(200)) {
            if s.namespaces.contains_key("istio-system") {
                break;
            }
        }
    }
    let want = table("istio-system/istio-ingressgateway");
    let deadline = Instant::now() + Duration::from_secs(10);
    while asked(&fake) != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(asked(&fake), want, "the gateway's requests vs deploy/rbac-expectations.tsv (istio-system/istio-ingressgateway)");
    assert!(fake.requests().iter().filter(|r| r.resource == "secrets").all(|r| r.namespace.as_deref() == Some("istio-system")), "Secrets are read in the gateway's namespace only");
    drop(src);

    // The signer (service account skiff-system/skiff-signer), every path.
    let fake = FakeApiServer::start().unwrap();
    fake.apply(pod("app", "web-1", "node-1", "web", serde_json::json!({}))).unwrap();
    fake.apply(pod("skiff-system", "ztunnel-a", "node-1", "ztunnel", serde_json::json!({}))).unwrap();
    fake.apply(pod("app", "waypoint-1", "node-1", "waypoint", serde_json::json!({"gateway.networking.k8s.io/gateway-name": "waypoint"}))).unwrap();
    let zt = || TokenIdentity::service_account("skiff-system", "ztunnel");
    fake.add_token("zt", zt().bound_to_pod("ztunnel-a", "uid-ztunnel-a", "node-1").with_audiences(&["skiff-ca"]));
    let mut pod_only = zt().with_audiences(&["skiff-ca"]);
    pod_only.extra.insert("authentication.kubernetes.io/pod-name".into(), vec!["ztunnel-a".into()]);
    pod_only.extra.insert("authentication.kubernetes.io/pod-uid".into(), vec!["uid-ztunnel-a".into()]);
    fake.add_token("zt-pod-only", pod_only);
    fake.add_token("wp", TokenIdentity::service_account("app", "waypoint").bound_to_pod("waypoint-1", "uid-waypoint-1", "node-1").with_audiences(&["skiff-ca"]));
    // Removed however the test ends.
    let tmp = tempfile::Builder::new().prefix("skiff-rbac-test-").tempdir().unwrap();
    let dir = tmp.path();
    for t in ["zt", "zt-pod-only", "wp"] {
        std::fs::write(dir.join(t), t).unwrap();
    }
    let ca = Ca::generate("cluster.local").unwrap();
    let root = ca.root();
    let tls = skiff_signer::tls_config(&ca, &["signer.test".to_owned()]).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let kube = rt.block_on(skiff_kube_source::connect(Some(&fake.url()))).unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    rt.spawn(skiff_signer::Signer::new(skiff_signer::Config::default(), ca, kube).serve(listener, tls));
    let issue = |token: &str, id: Identity| {
        skiff_hbone::signer_client::SignerClient::new(&url, "signer.test", dir.join(token), std::slice::from_ref(&root))
            .unwrap()
            .issue(&id, Duration::from_secs(600))
            .unwrap_or_else(|e| panic!("{token}: {}", skiff_core::report(&e)))
    };
    issue("zt", Identity::new("cluster.local", "app", "web"));
    issue("zt-pod-only", Identity::new("cluster.local", "app", "web"));
    issue("wp", Identity::new("cluster.local", "app", "waypoint"));
    assert_eq!(asked(&fake), table("skiff-system/skiff-signer"), "the signer's requests vs deploy/rbac-expectations.tsv (skiff-system/skiff-signer)");
}

/// Every Skiff container in every overlay runs a binary this workspace
/// builds, with a subcommand and flags that binary accepts (checked against
/// its own `--help`), so a renamed flag cannot leave deploy/ behind.
#[test]
fn every_container_command_line_is_accepted_by_its_binary() {
    let bins = skiff_e2e::bin_dir();
    let mut checked = 0;
    for o in OVERLAYS {
        for obj in render(&deploy_dir().join(o)) {
            let Some(containers) = obj["spec"]["template"]["spec"]["containers"].as_array() else { continue };
            for c in containers {
                let strs = |k: &str| -> Vec<String> {
                    c[k].as_array().map(|s| s.iter().map(|x| x.as_str().unwrap().to_owned()).collect()).unwrap_or_default()
                };
                let (command, args) = (strs("command"), strs("args"));
                let Some(program) = command.first().filter(|p| p.starts_with("skiff-")) else { continue };
                let bin = bins.join(program);
                assert!(bin.exists(), "{o:?} {:?}: {program} is not a binary of this workspace", key(&obj));
                let sub: Vec<&String> = command[1..].iter().chain(args.iter()).take_while(|a| !a.starts_with('-')).collect();
                let out = Command::new(&bin).args(&sub).arg("--help").output().unwrap();
                assert!(out.status.success(), "{program} {sub:?} --help: {}", String::from_utf8_lossy(&out.stderr));
                let help = String::from_utf8_lossy(&out.stdout);
                for a in command[1..].iter().chain(args.iter()).filter(|a| a.starts_with("--")) {
                    let flag = a.split('=').next().unwrap();
                    assert!(
                        help.lines().any(|l| l.split(|ch: char| ch.is_whitespace() || ch == ',' || ch == '=').any(|w| w == flag)),
                        "{o:?} {:?}: `{program} {}` has no {flag}:\n{help}",
                        key(&obj),
                        sub.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} flags checked");
}
