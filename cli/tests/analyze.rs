//! `skiff analyze` as a user runs it: the repository's own manifests pass,
//! a directory with the mistakes Skiff refuses fails with one line per
//! problem naming the file, the object, the field and the reason.

use std::{path::Path, process::Command};

fn skiff() -> Command {
    Command::new(env!("CARGO_BIN_EXE_skiff"))
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root")
}

#[test]
fn the_repositorys_manifests_pass() {
    let mut dirs = Vec::new();
    for parent in ["examples", "tests/manifests"] {
        for e in std::fs::read_dir(repo().join(parent)).unwrap().flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            }
        }
    }
    assert!(dirs.len() >= 4, "{dirs:?}");
    for d in dirs {
        let out = skiff().arg("analyze").arg(&d).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{}: {text}{}", d.display(), String::from_utf8_lossy(&out.stderr));
        assert!(!text.contains("error:"), "{}: {text}", d.display());
    }
}

#[test]
fn mistakes_are_refused_one_line_each_with_file_object_field_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tenant-a.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: a, annotations: {skiff.dev/local-rate-limit: lots}}\nspec: {ports: [{port: 80}]}\n---\n\
apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: delegating, namespace: a}\nspec:\n  hosts: [web]\n  http: [{route: [{destination: {host: web}}], delegate: {name: other}}]\n---\n\
apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: zero, namespace: a}\nspec:\n  hosts: [web]\n  http:\n  - route:\n    - {destination: {host: web, subset: v1}, weight: 0}\n    - {destination: {host: web, subset: v2}, weight: 0}\n---\n\
apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: star, namespace: a}\nspec:\n  hosts: [\"*\"]\n  http: [{route: [{destination: {host: web}}]}]\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("policy.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: sa, namespace: a}\nspec:\n  rules: [{from: [{source: {serviceAccounts: [a/web], namespaces: [a]}}]}]\n---\n\
apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: typo, namespace: a}\nspec:\n  rules: [{from: [{source: {principal: [x]}}]}]\n",
    )
    .unwrap();
    let out = skiff().arg("analyze").arg(dir.path()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = |object: &str, field: &str| {
        text.lines()
            .filter(|l| l.starts_with("error: ") && l.contains(object) && l.contains(&format!("field `{field}`")))
            .count()
    };
    #[rustfmt::skip]
    let expected = [
        ("tenant-a.yaml: Service a/web", "metadata.annotations[skiff.dev/local-rate-limit]"),
        ("tenant-a.yaml: VirtualService a/delegating", "spec.http[0].delegate"),
        ("tenant-a.yaml: VirtualService a/zero", "spec.http[0].route"),
        ("tenant-a.yaml: VirtualService a/star", "spec.hosts"),
        ("policy.yaml: AuthorizationPolicy a/sa", "spec.rules[0].from[0].source.serviceAccounts"),
    ];
    for (object, field) in expected {
        assert_eq!(line(object, field), 1, "no single line for {object} {field}:\n{text}");
    }
    assert_eq!(text.lines().filter(|l| l.starts_with("error: ")).count(), expected.len(), "{text}");
    // The fail-closed reading is a warning, not a refusal; --strict fails on it.
    assert!(text.lines().any(|l| l.starts_with("warning: ") && l.contains("AuthorizationPolicy a/typo") && l.contains("spec.rules[0].from[0].source.principal")), "{text}");
    let json = skiff().args(["analyze", "-o", "json"]).arg(dir.path()).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["rejected"].as_array().unwrap().len(), expected.len());
    assert_eq!(skiff().args(["analyze", "/nonexistent-skiff-dir"]).output().unwrap().status.code(), Some(2));
}
