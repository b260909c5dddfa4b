//! `skiff explain --manifests DIR` on manifests as they sit in a
//! repository (Deployments, no addresses): the example app's hops, and a
//! STRICT namespace with an L7 rule added, each decision naming its
//! object. The live counterpart, checked against real traffic, is
//! tests/tests/explain.rs.

use std::{path::Path, process::Command};

fn explain(dir: &Path, args: &[&str]) -> (serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_skiff")).arg("explain").arg("--manifests").arg(dir).args(args).args(["-o", "json"]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    (serde_json::from_slice(&out.stdout).unwrap(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn step<'a>(e: &'a serde_json::Value, name: &str) -> Vec<&'a serde_json::Value> {
    e["steps"].as_array().unwrap().iter().filter(|s| s["step"] == name).collect()
}

#[test]
fn the_example_app_offline_and_a_strict_namespace_with_an_l7_rule() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(repo.join("examples/two-tier")).unwrap().flatten() {
        std::fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
    }
    // As the repository has it: enrolled to enrolled, mTLS, no policy.
    let (e, notes) = explain(dir.path(), &["--from", "demo/loadgen", "--to", "frontend:8080"]);
    assert_eq!(e["outcome"], "allowed", "{e:#}");
    assert!(notes.contains("a Deployment stands for one pod of its template"), "{notes}");
    assert!(step(&e, "endpoint")[0]["decision"].as_str().unwrap().starts_with("HBONE (mTLS) to demo/frontend-offline"), "{e:#}");

    // STRICT in demo, and demo/frontend behind a waypoint that only lets
    // GET /public through.
    std::fs::write(
        dir.path().join("zz-policy.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: waypoint, namespace: demo, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}\nspec: {serviceAccountName: waypoint, containers: [{name: w}]}\n---\n\
apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: public-only, namespace: demo}\nspec:\n  targetRefs: [{kind: Service, group: \"\", name: frontend}]\n  action: ALLOW\n  rules:\n  - to: [{operation: {paths: [/nothing]}}]\n  - to: [{operation: {methods: [GET], paths: [\"/public*\"]}}]\n",
    )
    .unwrap();
    let svc = std::fs::read_to_string(dir.path().join("demo.yaml")).unwrap();
    std::fs::write(dir.path().join("demo.yaml"), svc.replacen("kind: Service\nmetadata:\n  name: frontend\n  namespace: demo\n", "kind: Service\nmetadata:\n  name: frontend\n  namespace: demo\n  labels: {istio.io/use-waypoint: waypoint}\n", 1)).unwrap();
    assert!(std::fs::read_to_string(dir.path().join("demo.yaml")).unwrap().contains("use-waypoint"), "the Service got the label");

    let (e, _) = explain(dir.path(), &["--from", "legacy/loadgen", "--to", "frontend.demo:8080"]);
    assert_eq!(e["outcome"], "denied", "{e:#}");
    assert_eq!(step(&e, "mtls")[0]["by"], "PeerAuthentication demo/default (namespace-wide)", "{e:#}");

    let (e, _) = explain(dir.path(), &["--from", "demo/loadgen", "--to", "http://frontend:8080/public/x"]);
    assert_eq!(e["outcome"], "allowed", "{e:#}");
    assert_eq!(step(&e, "waypoint")[0]["by"], "Service demo/frontend label istio.io/use-waypoint", "{e:#}");
    assert_eq!(step(&e, "L7 policy")[0]["by"], "AuthorizationPolicy demo/public-only rules[1]", "{e:#}");

    let (e, _) = explain(dir.path(), &["--from", "demo/loadgen", "--to", "http://frontend:8080/public/x", "-X", "POST"]);
    assert_eq!(e["outcome"], "denied", "{e:#}");
    assert_eq!(step(&e, "L7 policy")[0]["decision"], "denied: no ALLOW policy matched", "{e:#}");

    // Bad input: exit 2 and a line naming it.
    for (args, says) in [
        (vec!["--from", "demo", "--to", "frontend"], "expected NAMESPACE/POD"),
        (vec!["--from", "demo/loadgen", "--to", "frontend:99"], "has no port 99 (ports: 8080)"),
        (vec!["--from", "demo/loadgen", "--to", "https://frontend/"], "only http:// URLs"),
        (vec!["--from", "demo/loadgen", "--to", "http://frontend:8080/", "-H", "novalue"], "expected `name: value`"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_skiff")).arg("explain").arg("--manifests").arg(dir.path()).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
