//! The CNI plugin end to end: `skiff-cni` invoked exactly as a container
//! runtime invokes a chained plugin (CNI_* environment, the network config
//! with `prevResult` on stdin) against the local mesh's real pod netns, with
//! node-agent told to find netns *only* from the CNI plugin (and the local
//! mesh's netns annotation switched off).

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::{json, Value};
use skiff_e2e::*;

const CONNS: &str = "istio_tcp_connections_opened_total";

struct Invocation {
    code: i32,
    stdout: String,
}

fn prev_result(pod: &PodRt) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:01:0a", "sandbox": format!("/var/run/netns/{}", pod.netns)}],
        "ips": [{"address": format!("{}/24", pod.ip), "gateway": "10.244.0.1", "interface": 0}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    })
}

/// Runs the plugin node-agent installed on `node`, with the config the
/// runtime builds from node-agent's entry in the node's conflist.
fn invoke(mesh: &LocalMesh, node: usize, command: &str, pod: &PodRt, container_id: &str, prev: Option<&Value>) -> Invocation {
    let n = &mesh.nodes[node];
    let list: Value = serde_json::from_str(
        &std::fs::read_to_string(n.cni_conf_dir.join("10-localmesh.conflist")).expect("conflist"),
    )
    .expect("conflist is JSON");
    let mut conf = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == "skiff-cni")
        .cloned()
        .expect("node-agent chained skiff-cni into the conflist");
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    if let Some(p) = prev {
        conf["prevResult"] = p.clone();
    }
    let mut child = Command::new(n.cni_bin_dir.join("skiff-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", format!("/var/run/netns/{}", pod.netns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &n.cni_bin_dir)
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={}", pod.namespace, pod.name, pod.uid),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("exec skiff-cni");
    child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    eprintln!("skiff-cni {command} {}/{}: exit {:?}, stderr: {}", pod.namespace, pod.name, out.status.code(), String::from_utf8_lossy(&out.stderr));
    Invocation { code: out.status.code().unwrap_or(-1), stdout: String::from_utf8_lossy(&out.stdout).into_owned() }
}

fn json_of(s: &str) -> Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("plugin stdout is not JSON ({e}): {s:?}"))
}

fn agent_log(mesh: &LocalMesh, node: usize) -> String {
    std::fs::read_to_string(&mesh.nodes[node].agent_log).unwrap_or_default()
}

/// The l4 mesh with node-agent finding pods' netns only through CNI ADD:
/// every pod is "new" until the test invokes the plugin for it.
fn cni_mesh() -> Option<LocalMesh> {
    mesh_with("manifests/l4", |o| {
        o.netns_annotation = false;
        o.agent_args = vec!["--netns-from".into(), "cni".into()];
    })
}

#[test]
fn cni_add_enrolls_before_answering_and_del_releases() {
    let Some(mut mesh) = cni_mesh() else { return };
    let run = mesh.run_id.clone();
    let (client_pod, server) = (mesh.pod("mesh", "client"), mesh.pod("mesh", "server"));
    let (cn, sn) = (client_pod.node, server.node);
    for i in 0..mesh.nodes.len() {
        // node-agent is ready (capture installed, first reconcile done) and
        // installed the plugin and chained it in front of nothing else.
        let (status, _) = mesh.node_http_get(i, 15022, "/healthz/ready").expect("node-agent readiness");
        assert_eq!(status, 200);
        assert!(mesh.nodes[i].cni_bin_dir.join("skiff-cni").exists());
        let list = std::fs::read_to_string(mesh.nodes[i].cni_conf_dir.join("10-localmesh.conflist")).unwrap();
        let v = json_of(&list);
        assert_eq!(v["plugins"][0]["type"], "bridge", "the primary plugin stays first: {list}");
        assert_eq!(v["plugins"][1]["type"], "skiff-cni", "{list}");
        let state = json_of(&std::fs::read_to_string(&mesh.nodes[i].cni_state_file).unwrap());
        assert_eq!(state["enrolledNamespaces"], json!(["mesh"]));
    }
    // Without the annotation and without a CNI ADD, node-agent cannot find
    // any pod's netns: nothing is enrolled.
    assert!(enrolled_ips(&mesh, sn).is_empty() && enrolled_ips(&mesh, cn).is_empty());

    // ADD: passthrough of prevResult, and the pod is enrolled by the time
    // the plugin returns (no waiting here).
    let server_prev = prev_result(server);
    let add = invoke(&mesh, sn, "ADD", server, &format!("sandbox-{run}-server"), Some(&server_prev));
    assert_eq!(add.code, 0, "ADD failed: {}", add.stdout);
    assert_eq!(json_of(&add.stdout), server_prev, "ADD must print prevResult unchanged");
    assert!(enrolled_ips(&mesh, sn).contains(&server.ip.to_string()), "server not enrolled when ADD returned");
    let client_prev = prev_result(client_pod);
    let add = invoke(&mesh, cn, "ADD", client_pod, &format!("sandbox-{run}-client"), Some(&client_prev));
    assert_eq!(add.code, 0, "ADD failed: {}", add.stdout);
    assert_eq!(json_of(&add.stdout), client_prev);
    assert!(enrolled_ips(&mesh, cn).contains(&client_pod.ip.to_string()));
    assert!(agent_log(&mesh, sn).contains("CNI ADD: answered enrolled"));

    // Traffic between them is captured on both sides.
    wait_listening(server);
    let before = mesh.metric(sn, CONNS, &[("reporter", "destination"), ("source_workload", "client")]).unwrap();
    let r = client(&mesh, client_pod, &format!("{}:9000", server.ip), "marker-cni");
    assert!(r.ok, "{r:?}");
    eventually(Duration::from_secs(15), "destination ztunnel counted the connection", || {
        (mesh.metric(sn, CONNS, &[("reporter", "destination"), ("source_workload", "client")]).unwrap() > before).then_some(())
    });

    // CHECK agrees.
    let check = invoke(&mesh, sn, "CHECK", server, &format!("sandbox-{run}-server"), Some(&server_prev));
    assert_eq!((check.code, check.stdout.trim()), (0, ""));

    // A pod in a namespace that is not enrolled: passthrough, not enrolled, reason logged.
    let plain = mesh.pod("plain", "server");
    let plain_prev = prev_result(plain);
    let add = invoke(&mesh, plain.node, "ADD", plain, &format!("sandbox-{run}-plain"), Some(&plain_prev));
    assert_eq!((add.code, json_of(&add.stdout)), (0, plain_prev));
    assert!(!enrolled_ips(&mesh, plain.node).contains(&plain.ip.to_string()));
    assert!(agent_log(&mesh, plain.node).contains("namespace not labelled dataplane-mode=ambient"));

    // A stale DEL (an older sandbox of the same pod) leaves the current
    // sandbox enrolled.
    let del = invoke(&mesh, sn, "DEL", server, &format!("sandbox-{run}-server-old"), None);
    assert_eq!(del.code, 0);
    assert!(enrolled_ips(&mesh, sn).contains(&server.ip.to_string()), "a stale DEL released the current sandbox");

    // DEL: released when the plugin returns; DEL again is fine.
    let del = invoke(&mesh, sn, "DEL", server, &format!("sandbox-{run}-server"), None);
    assert_eq!((del.code, del.stdout.trim()), (0, ""));
    assert!(!enrolled_ips(&mesh, sn).contains(&server.ip.to_string()), "server still enrolled after DEL");
    assert!(agent_log(&mesh, sn).contains("CNI DEL: pod sandbox torn down"));
    let del = invoke(&mesh, sn, "DEL", server, &format!("sandbox-{run}-server"), None);
    assert_eq!(del.code, 0);

    // node-agent gone: DEL still succeeds; ADD in the enrolled namespace
    // fails closed with a CNI error (code 11: try again later).
    mesh.kill_node_agent(cn);
    let client_pod = mesh.pod("mesh", "client");
    let del = invoke(&mesh, cn, "DEL", client_pod, &format!("sandbox-{run}-client"), None);
    assert_eq!(del.code, 0);
    let add = invoke(&mesh, cn, "ADD", client_pod, &format!("sandbox-{run}-client2"), Some(&client_prev));
    assert_ne!(add.code, 0, "ADD in an enrolled namespace must fail without node-agent");
    let err = json_of(&add.stdout);
    assert_eq!(err["code"], 11, "{err}");
    assert!(err["msg"].as_str().unwrap().contains("node-agent"), "{err}");
    assert_eq!(err["cniVersion"], "1.0.0");
    // …but a pod in a namespace that is not enrolled still starts.
    let plain_c = mesh.pod("plain", "client");
    let prev = prev_result(plain_c);
    let add = invoke(&mesh, cn, "ADD", plain_c, &format!("sandbox-{run}-plainc"), Some(&prev));
    assert_eq!((add.code, json_of(&add.stdout)), (0, prev));

    // uninstall takes the plugin out of the chain and leaves the primary
    // config as it was.
    let n = &mesh.nodes[cn];
    let out = Command::new(mesh_bin("skiff-node-agent"))
        .args(["uninstall", "--pin-dir"])
        .arg(Path::new(&n.pin_dir))
        .arg("--cni-bin-dir")
        .arg(&n.cni_bin_dir)
        .arg("--cni-conf-dir")
        .arg(&n.cni_conf_dir)
        .arg("--cni-state-file")
        .arg(&n.cni_state_file)
        // Not the host's /var/run/netns: other meshes may run beside this one.
        .arg("--netns-dir")
        .arg(n.cni_conf_dir.join("no-netns-here"))
        .output()
        .unwrap();
    assert!(out.status.success(), "uninstall: {}", String::from_utf8_lossy(&out.stderr));
    let v = json_of(&std::fs::read_to_string(n.cni_conf_dir.join("10-localmesh.conflist")).unwrap());
    assert_eq!(v["plugins"].as_array().unwrap().len(), 1, "{v}");
    assert!(!n.cni_bin_dir.join("skiff-cni").exists() && !n.cni_state_file.exists());
}

fn mesh_bin(name: &str) -> std::path::PathBuf {
    bin_dir().join(name)
}

/// A netns the test makes for a pod sandbox the runtime "just created":
/// unique per run, removed on drop (pass, fail or panic).
struct Sandbox {
    name: String,
}

impl Sandbox {
    fn new(name: String, ip: &str) -> Sandbox {
        let sb = Sandbox { name };
        let ip_cmd = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("run ip");
            assert!(st.success(), "ip {args:?}");
        };
        ip_cmd(&["netns", "add", &sb.name]);
        ip_cmd(&["-n", &sb.name, "link", "set", "lo", "up"]);
        ip_cmd(&["-n", &sb.name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"]);
        ip_cmd(&["-n", &sb.name, "addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
        ip_cmd(&["-n", &sb.name, "link", "set", "peer0", "up"]);
        ip_cmd(&["-n", &sb.name, "link", "set", "eth0", "up"]);
        sb
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Runs the plugin for a pod `(namespace, name, uid)` in `netns`.
fn invoke_raw(mesh: &LocalMesh, node: usize, command: &str, pod: (&str, &str, &str), netns: &str, prev: &Value) -> Invocation {
    let (ns, name, uid) = pod;
    let n = &mesh.nodes[node];
    let conf = json!({
        "cniVersion": "1.0.0", "name": "localmesh", "type": "skiff-cni",
        "agentSocket": n.cni_socket, "stateFile": n.cni_state_file, "prevResult": prev,
    });
    let mut child = Command::new(n.cni_bin_dir.join("skiff-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("sandbox-{}-{name}", mesh.run_id))
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &n.cni_bin_dir)
        .env("CNI_ARGS", format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID={uid}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("exec skiff-cni");
    child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    Invocation { code: out.status.code().unwrap_or(-1), stdout: String::from_utf8_lossy(&out.stdout).into_owned() }
}

#[test]
fn cni_add_waits_for_the_api_then_enrolls_with_the_cni_ip_or_fails_closed() {
    let Some(mesh) = mesh_with("manifests/l4", |o| {
        o.netns_annotation = false;
        o.agent_args = vec!["--netns-from".into(), "cni".into(), "--cni-wait-seconds".into(), "3".into()];
    }) else {
        return;
    };
    let run = mesh.run_id.clone();
    let node = 0;
    let node_name = mesh.nodes[node].name.clone();
    let ip = "10.244.1.99";
    let sb = Sandbox::new(format!("skiff-{run}-late"), ip);
    let netns = format!("/var/run/netns/{}", sb.name);
    let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": format!("{ip}/24")}]});

    // The pod shows up in the API while ADD waits — as in a cluster, without
    // an IP yet (the API learns it only after the sandbox exists): node-agent
    // enrolls it with the IP from the CNI result before answering.
    let uid = format!("uid-{run}-late");
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: late, namespace: mesh, uid: {uid}}}\nspec:\n  nodeName: {node_name}\n  serviceAccountName: late\n  containers: [{{name: c, command: [sleep, infinity]}}]\nstatus: {{phase: Pending}}\n"
    );
    let writer = {
        let state = mesh.state_dir.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(800));
            let tmp = state.join(".applied-late.yaml");
            std::fs::write(&tmp, pod).unwrap();
            std::fs::rename(&tmp, state.join("applied-late.yaml")).unwrap();
        })
    };
    let add = invoke_raw(&mesh, node, "ADD", ("mesh", "late", &uid), &netns, &prev);
    writer.join().unwrap();
    assert_eq!((add.code, json_of(&add.stdout)), (0, prev.clone()), "{}", add.stdout);
    assert!(enrolled_ips(&mesh, node).contains(&ip.to_string()), "late pod not enrolled when ADD returned");

    // A pod the API never shows, in an enrolled namespace: after the bounded
    // wait, ADD fails closed (the runtime retries the sandbox)…
    let started = std::time::Instant::now();
    let add = invoke_raw(&mesh, node, "ADD", ("mesh", "ghost", "uid-ghost"), &netns, &prev);
    assert!(started.elapsed() >= Duration::from_secs(3), "answered before the wait ran out");
    assert_ne!(add.code, 0);
    let err = json_of(&add.stdout);
    assert_eq!(err["code"], 11, "{err}");
    assert!(err["details"].as_str().unwrap().contains("not in node-agent's view of the API"), "{err}");
    // …and in a namespace that is not enrolled, the pod starts.
    let add = invoke_raw(&mesh, node, "ADD", ("plain", "ghost", "uid-ghost2"), &netns, &prev);
    assert_eq!((add.code, json_of(&add.stdout)), (0, prev));
    // An IPv6-only sandbox in an enrolled namespace fails at once (Skiff
    // carries IPv4), never runs outside the mesh; elsewhere it starts.
    let v6 = json!({"cniVersion": "1.0.0", "ips": [{"address": "fd00::99/64"}]});
    let add = invoke_raw(&mesh, node, "ADD", ("mesh", "v6", "uid-v6"), &netns, &v6);
    assert_ne!(add.code, 0);
    assert!(json_of(&add.stdout)["details"].as_str().unwrap().contains("only IPv6 addresses"), "{}", add.stdout);
    let add = invoke_raw(&mesh, node, "ADD", ("plain", "v6", "uid-v6b"), &netns, &v6);
    assert_eq!((add.code, json_of(&add.stdout)), (0, v6));

    // The primary CNI rewrites its config (e.g. on its own restart):
    // node-agent chains skiff-cni in again.
    let conf = mesh.nodes[node].cni_conf_dir.join("10-localmesh.conflist");
    let text = std::fs::read_to_string(&conf).unwrap();
    let mut v = json_of(&text);
    v["plugins"].as_array_mut().unwrap().retain(|p| p["type"] != "skiff-cni");
    std::fs::write(&conf, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    eventually(Duration::from_secs(10), "skiff-cni chained again", || {
        let v = json_of(&std::fs::read_to_string(&conf).ok()?);
        v["plugins"].as_array()?.iter().any(|p| p["type"] == "skiff-cni").then_some(())
    });
}

/// A namespace labelled `skiff.dev/capture: iptables`: its pods are captured
/// by iptables rules, keep the bind guard (an `ENROLLED` entry without
/// flags) and have IPv6 turned off; traffic still goes through ztunnel.
#[test]
fn iptables_capture_keeps_the_bind_guard_and_turns_ipv6_off() {
    // Removed however the test ends.
    let tmp = tempfile::Builder::new().prefix("skiff-e2e-ipt-").tempdir().unwrap();
    let dir = tmp.path();
    let l4 = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/l4/cluster.yaml")).unwrap();
    let labelled = l4.replacen(
        "  name: mesh\n  labels:\n    skiff.dev/dataplane-mode: ambient\n",
        "  name: mesh\n  labels:\n    skiff.dev/dataplane-mode: ambient\n    skiff.dev/capture: iptables\n",
        1,
    );
    assert_ne!(labelled, l4, "the l4 manifests' mesh namespace changed shape");
    std::fs::write(dir.join("cluster.yaml"), labelled).unwrap();
    let mesh = mesh(dir.to_str().unwrap());
    drop(tmp);
    let Some(mesh) = mesh else { return };
    let (client_pod, server) = (mesh.pod("mesh", "client"), mesh.pod("mesh", "server"));
    let entry = |node: usize, ip: &str| -> Option<Value> {
        mesh.inspect(node).ok()?["enrolled"].as_array()?.iter().find(|e| e["pod_ip"] == ip).cloned()
    };
    for p in [client_pod, server] {
        let e = eventually(Duration::from_secs(15), &format!("{} enrolled", p.name), || entry(p.node, &p.ip.to_string()));
        assert_eq!(e["flags"], 0, "iptables pods: no eBPF redirection, bind guard only: {e}");
        let v6 = mesh.exec(p, &["cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"], Duration::from_secs(10)).unwrap();
        assert_eq!(String::from_utf8_lossy(&v6.stdout).trim(), "1", "IPv6 must be off in {}", p.name);
    }
    assert!(agent_log(&mesh, server.node).contains("capture=\"iptables\"") || agent_log(&mesh, server.node).contains("capture=iptables"));
    // The bind guard: an application cannot take a mesh port.
    let denied = || mesh.inspect(client_pod.node).unwrap()["stats"]["bind_denied"].as_u64().unwrap();
    let before = denied();
    let bind = mesh.exec(client_pod, &["skiff-demo-app", "echo-server", "--port", "15008"], Duration::from_secs(5));
    assert!(bind.is_ok_and(|o| !o.status.success()), "an iptables-captured app bound HBONE's port");
    assert!(denied() > before, "the bind was not refused by the bind guard");
    // Traffic is captured on both sides.
    wait_listening(server);
    let r = client(&mesh, client_pod, &format!("{}:9000", server.ip), "marker-ipt");
    assert!(r.ok, "{r:?}");
    eventually(Duration::from_secs(15), "destination ztunnel counted the connection", || {
        (mesh.metric(server.node, CONNS, &[("reporter", "destination"), ("source_workload", "client")]).unwrap() > 0.0).then_some(())
    });
}

/// One tenant's refused objects hold back nothing else (issue: "one bad
/// object never freezes the mesh"): a VirtualService with a field Skiff
/// does not support and a Service with a malformed annotation in namespace
/// `tenant-a` are reported — log, metric, config_dump — while new pods in
/// namespace `mesh` start (CNI ADD) and are enrolled, and a DENY policy
/// added there afterwards closes a connection it denies.
#[test]
fn a_refused_object_in_one_namespace_holds_back_nothing_in_another() {
    let Some(mut mesh) = cni_mesh() else { return };
    let run = mesh.run_id.clone();
    const BAD: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: tenant-a\n  annotations: {skiff.dev/local-rate-limit: lots}\nspec: {selector: {app: web}, ports: [{port: 80}]}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: tenant-a}\nspec:\n  hosts: [web]\n  http: [{route: [{destination: {host: web}}], delegate: {name: other}}]\n";
    mesh.apply("tenant-a", Some(BAD)).unwrap();
    for i in 0..mesh.nodes.len() {
        eventually(Duration::from_secs(15), &format!("the refusals in ztunnel's config_dump on node {i}"), || {
            let (_, body) = mesh.node_http_get(i, 15000, "/config_dump").ok()?;
            let dump: Value = serde_json::from_str(&body).ok()?;
            let rejected = dump["rejected"].as_array()?.clone();
            let has = |object: &str, field: &str| rejected.iter().any(|r| r["object"] == object && r["field"] == field && r["reason"].as_str().is_some_and(|s| !s.is_empty()));
            (has("VirtualService tenant-a/web", "spec.http[0].delegate") && has("Service tenant-a/web", "metadata.annotations[skiff.dev/local-rate-limit]")).then_some(())
        });
        assert_eq!(mesh.metric(i, "skiff_config_rejected_objects", &[("kind", "VirtualService"), ("namespace", "tenant-a")]).unwrap(), 1.0);
        assert_eq!(mesh.metric(i, "skiff_config_rejected_objects", &[("kind", "Service"), ("namespace", "tenant-a")]).unwrap(), 1.0);
        let zlog = std::fs::read_to_string(&mesh.nodes[i].ztunnel_log).unwrap();
        let refused: Vec<&str> = zlog.lines().filter(|l| l.contains("config object refused") && l.contains("VirtualService tenant-a/web")).collect();
        assert_eq!(refused.len(), 1, "logged once per object version, not per snapshot:\n{}", refused.join("\n"));
        eventually(Duration::from_secs(10), "node-agent logs the refusal", || agent_log(&mesh, i).contains("config object refused").then_some(()));
    }

    // New pods in another namespace start and are enrolled.
    let (client_pod, server) = (mesh.pod("mesh", "client"), mesh.pod("mesh", "server"));
    let (cn, sn) = (client_pod.node, server.node);
    let add = invoke(&mesh, sn, "ADD", server, &format!("sandbox-{run}-server"), Some(&prev_result(server)));
    assert_eq!(add.code, 0, "ADD failed: {}", add.stdout);
    assert!(enrolled_ips(&mesh, sn).contains(&server.ip.to_string()), "server not enrolled");
    let add = invoke(&mesh, cn, "ADD", client_pod, &format!("sandbox-{run}-client"), Some(&prev_result(client_pod)));
    assert_eq!(add.code, 0, "ADD failed: {}", add.stdout);
    assert!(enrolled_ips(&mesh, cn).contains(&client_pod.ip.to_string()), "client not enrolled");

    // A policy added afterwards takes effect: DENY closes an open connection.
    let server_ip = server.ip;
    wait_listening_on(server, 9000);
    let k = mesh.pods.iter().position(|p| p.namespace == "mesh" && p.name == "client").unwrap();
    let log = mesh.work_dir.join("logs").join("held-client.log");
    let target = format!("{server_ip}:9000");
    mesh.spawn_in(k, &["skiff-demo-app", "client", "--target", &target, "--message", "held", "--hold-ms", "20000"], &log).unwrap();
    eventually(Duration::from_secs(15), "connection open at the server's ztunnel", || {
        (mesh.metric(sn, "skiff_ztunnel_active_connections", &[]).unwrap() >= 1.0).then_some(())
    });
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-mesh, namespace: mesh}\nspec:\n  action: DENY\n  rules: [{from: [{source: {namespaces: [mesh]}}]}]\n";
    mesh.apply("deny", Some(deny)).unwrap();
    eventually(Duration::from_secs(5), "the DENY policy closed the open connection", || {
        (mesh.metric(sn, "skiff_ztunnel_active_connections", &[]).unwrap() == 0.0).then_some(())
    });
    let zlog = std::fs::read_to_string(&mesh.nodes[sn].ztunnel_log).unwrap();
    assert!(zlog.contains("open connection closed: policy now denies it"), "{zlog}");
}
