//! A manifests directory as it sits in a repository — Deployments, pods
//! without a node or an address, Services without a ClusterIP — made into
//! a cluster view `skiff explain` can walk: each Deployment becomes one
//! pod of its template (named `<deployment>-offline`), every pod without
//! a node is on `offline-node` with an address from 10.244.0.0/16, every
//! Service without a ClusterIP gets one from 10.96.0.0/16. Objects are
//! read one by one as the mesh reads them (a refused object is left out
//! and reported, never fails the rest).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use skiff_core::{
    k8s::{self, Object},
    model::Snapshot,
};

/// The node offline pods are placed on.
pub const NODE: &str = "offline-node";

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in rd {
        let e = e.map_err(|e| format!("{}: {e}", dir.display()))?;
        let p = e.path();
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        // Not through symbolic links: a link to a parent would loop.
        let ft = e.file_type().map_err(|e| format!("{}: {e}", p.display()))?;
        if ft.is_dir() {
            collect(&p, out)?;
        } else if matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml" | "json")) {
            out.push(p);
        }
    }
    Ok(())
}

/// Reads `dir` into a cluster view; the notes say what was assigned and
/// what was refused.
pub fn load(dir: &Path) -> Result<(Snapshot, Vec<String>), String> {
    let mut files = Vec::new();
    collect(dir, &mut files)?;
    files.sort();
    let mut objects = Vec::new();
    let mut notes = Vec::new();
    for f in &files {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                notes.push(format!("{}: not read ({e}); its objects are left out", f.display()));
                continue;
            }
        };
        match k8s::parse_documents(&text) {
            Ok(docs) => objects.extend(docs.into_iter().map(|o| (f.display().to_string(), o))),
            Err(e) => notes.push(format!("{}: not read ({}); its objects are left out", f.display(), skiff_core::report(&e))),
        }
    }
    let (mut pod_n, mut svc_n) = (0u32, 0u32);
    let mut next_pod_ip = || {
        pod_n += 1;
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + pod_n)
    };
    let mut out = Vec::with_capacity(objects.len());
    let mut assigned = 0;
    for (origin, o) in objects {
        let o = match o {
            Object::Deployment(d) => {
                let name = d.metadata.name.clone().unwrap_or_default();
                let mut meta = d.spec.template.metadata.clone();
                meta.name = Some(format!("{name}-offline"));
                meta.namespace = d.metadata.namespace.clone();
                meta.owner_references = vec![k8s::OwnerReference { kind: "Deployment".into(), name }];
                let mut pod = k8s::Pod { metadata: meta, spec: d.spec.template.spec.clone(), status: Default::default() };
                place(&mut pod, &mut next_pod_ip);
                assigned += 1;
                Object::Pod(pod)
            }
            Object::Pod(mut p) => {
                if p.spec.node_name.is_none() || p.status.pod_ip.is_none() {
                    assigned += 1;
                }
                place(&mut p, &mut next_pod_ip);
                Object::Pod(p)
            }
            Object::Service(mut s) => {
                let external = s.spec.type_.as_deref() == Some("ExternalName");
                if s.spec.cluster_ip.is_none() && !external {
                    svc_n += 1;
                    s.spec.cluster_ip = Some(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + svc_n).to_string());
                    assigned += 1;
                }
                Object::Service(s)
            }
            other => other,
        };
        out.push((origin, o));
    }
    if assigned > 0 {
        notes.push(format!(
            "offline: {assigned} pod(s) and Service(s) without a node or an address were given one (pods on {NODE}, 10.244.0.0/16; ClusterIPs 10.96.0.0/16); a Deployment stands for one pod of its template"
        ));
    }
    let snap = Snapshot::build(out, None);
    for r in &snap.rejected {
        notes.push(format!("refused: {r}"));
    }
    Ok((snap, notes))
}

fn place(p: &mut k8s::Pod, next_ip: &mut impl FnMut() -> Ipv4Addr) {
    if p.spec.node_name.is_none() {
        p.spec.node_name = Some(NODE.into());
    }
    if p.status.pod_ip.is_none() && p.spec.host_network != Some(true) {
        p.status.pod_ip = Some(next_ip().to_string());
    }
    if p.status.phase.is_none() {
        p.status.phase = Some("Running".into());
    }
}
