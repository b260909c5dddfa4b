//! `skiff install` / `skiff uninstall`: the Kubernetes install of
//! `deploy/` (built into this binary, so it needs no checkout), with the
//! image, the optional parts (Istio's CRDs, the ingress gateway, waypoints
//! by namespace) and the mesh CA chosen by flags. `--dry-run` prints what
//! would be applied (or, for uninstall, each step) and touches nothing;
//! otherwise the objects go to `kubectl apply -f -` (kubectl's own
//! credentials and context).

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use base64::Engine as _;
use serde_json::{json, Value};

const NAMESPACE: &str = include_str!("../../deploy/base/namespace.yaml");
const RBAC: &str = include_str!("../../deploy/base/rbac.yaml");
const NODE: &str = include_str!("../../deploy/base/node.yaml");
const SIGNER: &str = include_str!("../../deploy/base/signer.yaml");
const CRDS: &str = include_str!("../../deploy/crds/istio-crds.yaml");
const GATEWAY: &str = include_str!("../../deploy/gateway/gateway.yaml");
const WAYPOINT: &str = include_str!("../../deploy/waypoint/waypoint.yaml");
const UNINSTALL: &str = include_str!("../../deploy/uninstall/uninstall.yaml");

/// Where the mesh CA comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ca {
    /// The Secret `skiff-ca` and ConfigMap `skiff-ca-root` exist already
    /// (README "Create the CA"): nothing is rendered for them.
    Existing,
    /// A new root (P-256), generated here: its key goes into the Secret
    /// only, never to a file.
    Generate,
    /// A root from files (`--ca-key`, `--ca-cert`).
    Files(std::path::PathBuf, std::path::PathBuf),
}

#[derive(Clone, Debug)]
pub struct Options {
    /// `REGISTRY/skiff:TAG`.
    pub image: String,
    /// Minimal CRDs for the Istio kinds Skiff reads (clusters without
    /// Istio).
    pub crds: bool,
    /// The ingress gateway (istio-system/istio-ingressgateway).
    pub gateway: bool,
    /// Namespaces that get a waypoint.
    pub waypoints: Vec<String>,
    pub ca: Ca,
    pub trust_domain: String,
    /// With `--ca generate`: also write the new root's key and certificate
    /// here (`ca-key.pem` 0600, `ca-cert.pem`), to keep offline.
    pub ca_out: Option<std::path::PathBuf>,
}

fn docs(text: &str, what: &str) -> Result<Vec<Value>, String> {
    let v: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| format!("the built-in {what} manifests: {e}"))?;
    Ok(v.into_iter().filter(|d| !d.is_null()).collect())
}

/// Replaces the image `skiff` (any tag or digest) with `image`.
fn set_image(v: &mut Value, image: &str) {
    match v {
        Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                match val.as_str() {
                    Some(s) if k == "image" && s.split([':', '@']).next() == Some("skiff") => *val = Value::String(image.to_owned()),
                    _ => set_image(val, image),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| set_image(x, image)),
        _ => {}
    }
}

/// The processes that take `--trust-domain` (identities are
/// `spiffe://DOMAIN/ns/NS/sa/SA`): each gets the chosen one; the default,
/// `cluster.local`, is left as the manifests have it.
fn set_trust_domain(v: &mut Value, domain: &str) {
    const TAKE_IT: [&str; 4] = ["skiff-ztunnel", "skiff-waypoint", "skiff-gateway", "skiff-signer"];
    if domain == "cluster.local" {
        return;
    }
    let Some(containers) = v.pointer_mut("/spec/template/spec/containers").and_then(Value::as_array_mut) else { return };
    for c in containers {
        let takes = c["command"].get(0).and_then(Value::as_str).is_some_and(|cmd| TAKE_IT.contains(&cmd));
        if !takes {
            continue;
        }
        let mut args: Vec<Value> = c["args"].as_array().cloned().unwrap_or_default();
        args.retain(|a| !a.as_str().is_some_and(|a| a.starts_with("--trust-domain")));
        args.push(Value::String(format!("--trust-domain={domain}")));
        c["args"] = Value::Array(args);
    }
}

/// A DNS-1123 label (a namespace name).
fn is_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && !s.starts_with('-') && !s.ends_with('-')
}

/// The objects to apply, in order (namespaces and CRDs first).
pub fn render(o: &Options) -> Result<Vec<Value>, String> {
    if o.image.is_empty() || o.image.contains(char::is_whitespace) {
        return Err(format!("--image {:?}: not an image reference", o.image));
    }
    let dns = |d: &str| !d.is_empty() && d.len() <= 253 && d.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
    if !dns(&o.trust_domain) {
        return Err(format!("--trust-domain {:?}: not a DNS name", o.trust_domain));
    }
    let mut out = Vec::new();
    if o.crds {
        out.extend(docs(CRDS, "CRD")?);
    }
    for (text, what) in [(NAMESPACE, "namespace"), (RBAC, "RBAC"), (NODE, "node"), (SIGNER, "signer")] {
        out.extend(docs(text, what)?);
    }
    if o.gateway {
        out.extend(docs(GATEWAY, "gateway")?);
    }
    for ns in &o.waypoints {
        if !is_label(ns) {
            return Err(format!("--waypoint {ns:?}: not a namespace name (a DNS label)"));
        }
        // The template is written for the namespace `shop`.
        let text = WAYPOINT.replace("namespace: shop", &format!("namespace: {ns}")).replace("skiff-waypoint-shop", &format!("skiff-waypoint-{ns}"));
        out.extend(docs(&text, "waypoint")?);
    }
    for d in &mut out {
        set_image(d, &o.image);
        set_trust_domain(d, &o.trust_domain);
    }
    let pems = match &o.ca {
        Ca::Existing => None,
        Ca::Generate => {
            let ca = skiff_hbone::identity::Ca::generate(&o.trust_domain).map_err(|e| format!("generating the mesh root: {}", skiff_core::report(&e)))?;
            if let Some(dir) = &o.ca_out {
                std::fs::create_dir_all(dir).map_err(|e| format!("--ca-out {}: {e}", dir.display()))?;
                ca.write_files(&dir.join("ca-key.pem"), &dir.join("ca-cert.pem")).map_err(|e| format!("--ca-out {}: {}", dir.display(), skiff_core::report(&e)))?;
            }
            Some(ca.to_pem())
        }
        Ca::Files(key, cert) => {
            let ca = skiff_hbone::identity::Ca::load(key, cert, &o.trust_domain).map_err(|e| format!("--ca-key/--ca-cert: {}", skiff_core::report(&e)))?;
            Some(ca.to_pem())
        }
    };
    if let Some((key, cert)) = pems {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        out.push(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "skiff-ca", "namespace": "skiff-system"},
            "type": "Opaque",
            "data": {"ca-key.pem": b64(&key), "ca-cert.pem": b64(&cert)},
        }));
        // The public root: ztunnel's trust bundle, and the waypoints' and
        // the gateway's check of the signer.
        let mut root_in = vec!["skiff-system".to_owned()];
        if o.gateway {
            root_in.push("istio-system".into());
        }
        root_in.extend(o.waypoints.iter().cloned());
        for ns in root_in {
            out.push(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "skiff-ca-root", "namespace": ns},
                "data": {"ca-cert.pem": cert},
            }));
        }
    }
    Ok(out)
}

/// `Kind namespace/name` of an object.
pub fn key(v: &Value) -> String {
    let s = |x: &Value| x.as_str().unwrap_or("").to_owned();
    match v["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{} {ns}/{}", s(&v["kind"]), s(&v["metadata"]["name"])),
        None => format!("{} {}", s(&v["kind"]), s(&v["metadata"]["name"])),
    }
}

/// The objects as one YAML stream.
pub fn to_yaml(objs: &[Value]) -> Result<String, String> {
    let mut out = String::new();
    for o in objs {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(o).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let mut c = Command::new("kubectl");
    c.args(args).stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = c.spawn().map_err(|e| format!("kubectl: {e} (is it installed and on the PATH?)"))?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(text.as_bytes()).map_err(|e| format!("kubectl: {e}"))?;
    }
    let st = child.wait().map_err(|e| format!("kubectl: {e}"))?;
    if st.success() { Ok(()) } else { Err(format!("`kubectl {}` failed ({st})", args.join(" "))) }
}

/// The objects with every Secret's values replaced: what `--dry-run`
/// prints (a root key never goes to a terminal or a log).
fn redacted(objs: &[Value]) -> Vec<Value> {
    objs.iter()
        .cloned()
        .map(|mut v| {
            if v["kind"] == "Secret" {
                if let Some(data) = v["data"].as_object_mut() {
                    for val in data.values_mut() {
                        // Valid base64, so the object still validates.
                        *val = Value::String("UkVEQUNURUQ=".into());
                    }
                }
            }
            v
        })
        .collect()
}

fn kubectl_ok(args: &[&str]) -> bool {
    Command::new("kubectl").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// `skiff install`. A root made here never replaces one in the cluster
/// unless `replace_ca` (every workload certificate would stop verifying
/// until the signer restarts).
pub fn install(o: &Options, dry_run: bool, replace_ca: bool) -> Result<(), String> {
    let objs = render(o)?;
    if dry_run {
        print!("{}", to_yaml(&redacted(&objs))?);
        eprintln!("skiff install --dry-run: {} object(s) would be applied (Secret values shown as REDACTED):", objs.len());
        for v in &objs {
            eprintln!("  {}", key(v));
        }
        if o.ca == Ca::Existing {
            eprintln!("  (the CA: Secret skiff-system/skiff-ca and ConfigMap skiff-ca-root must exist, skiff-ca-root also in istio-system with --gateway and in each waypoint's namespace; --ca generate makes them)");
        }
        return Ok(());
    }
    if o.ca != Ca::Existing && !replace_ca && kubectl_ok(&["-n", "skiff-system", "get", "secret", "skiff-ca"]) {
        return Err("the cluster has a mesh root already (Secret skiff-system/skiff-ca): a new one would break every workload certificate until the signer restarts; keep it (--ca existing), or pass --replace-ca".into());
    }
    if !kubectl_ok(&["get", "namespace", skiff_core::routing::DEFAULT_ROOT_NAMESPACE]) {
        return Err("the namespace istio-system does not exist (Istio's root namespace: mesh-wide policies and the mesh config live there): kubectl create namespace istio-system".into());
    }
    // Server-side: a client-side apply would copy the Secret, key
    // included, into an annotation.
    kubectl(&["apply", "--server-side", "--field-manager=skiff", "-f", "-"], Some(&to_yaml(&objs)?))
}

/// The image the installed node DaemonSet runs, from the cluster.
pub fn installed_image() -> Option<String> {
    let out = Command::new("kubectl")
        .args(["-n", "skiff-system", "get", "daemonset", "skiff-node", "-o", "jsonpath={.spec.template.spec.containers[0].image}"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let image = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !image.is_empty()).then_some(image)
}

/// The uninstall, step by step (README "Uninstall"). `o` names the parts
/// to remove, as given at install.
pub fn uninstall(o: &Options, dry_run: bool) -> Result<(), String> {
    let mut cleaner = docs(UNINSTALL, "uninstall")?;
    for d in &mut cleaner {
        set_image(d, &o.image);
    }
    let cleaner = to_yaml(&cleaner)?;
    let mut install = render(&Options { ca: Ca::Existing, ca_out: None, ..o.clone() })?;
    // Cluster-scoped CRDs last: deleting them deletes every object of
    // those kinds.
    install.reverse();
    let install = to_yaml(&install)?;
    let mut roots: Vec<String> = vec!["skiff-system".into()];
    if o.gateway {
        roots.push("istio-system".into());
    }
    roots.extend(o.waypoints.iter().cloned());
    let mut steps: Vec<(String, Vec<String>, Option<&str>)> = vec![
        (
            "stop capturing: the node DaemonSet goes, and its pods with it (enrolled pods' connections are refused until the cleaner ran on their node)".into(),
            ["-n", "skiff-system", "delete", "daemonset", "skiff-node", "--ignore-not-found", "--cascade=foreground", "--wait", "--timeout=5m"].map(String::from).to_vec(),
            None,
        ),
        ("on every node, skiff-node-agent uninstall: the CNI chain restored, programs detached, pins removed".into(), ["apply", "-f", "-"].map(String::from).to_vec(), Some(cleaner.as_str())),
        ("wait until it ran on every node".into(), ["-n", "skiff-system", "rollout", "status", "daemonset", "skiff-uninstall", "--timeout=10m"].map(String::from).to_vec(), None),
        ("remove the cleaner".into(), ["delete", "--ignore-not-found", "-f", "-"].map(String::from).to_vec(), Some(cleaner.as_str())),
    ];
    for ns in roots.iter().filter(|n| *n != "skiff-system") {
        steps.push((format!("remove the public root from {ns}"), vec!["-n".into(), ns.clone(), "delete".into(), "configmap".into(), "skiff-ca-root".into(), "--ignore-not-found".into()], None));
    }
    steps.push(("remove the install (the namespace skiff-system with the CA in it; with --crds, the CRDs and every object of those kinds)".into(), ["delete", "--ignore-not-found", "-f", "-"].map(String::from).to_vec(), Some(install.as_str())));
    if dry_run {
        println!("# First unlabel enrolled namespaces (kubectl label namespace NS skiff.dev/dataplane-mode- istio.io/dataplane-mode-): node-agent releases their pods.");
        println!("# The image of the cleaner: {} (the parts removed: as given; pass --gateway/--waypoint/--crds as at install).", o.image);
        for (i, (what, args, stdin)) in steps.iter().enumerate() {
            println!("# {}. {what}\nkubectl {}", i + 1, args.join(" "));
            if let Some(text) = stdin {
                print!("{text}");
            }
        }
        return Ok(());
    }
    for (what, args, stdin) in &steps {
        eprintln!("skiff uninstall: {what}");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        kubectl(&args, *stdin)?;
    }
    Ok(())
}
