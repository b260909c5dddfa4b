//! The CNI plugin's inputs, arbitrary: the network configuration on stdin
//! and the runtime's environment (command, CNI_ARGS, container id, netns)
//! through `plugin::run` with node-agent unreachable (a socket path that
//! does not exist) and its state file arbitrary too; node-agent's reply
//! line as the plugin decodes it; and a CNI config file as node-agent
//! edits it (insert, remove, conf → conflist). Nothing may panic, and an
//! ADD without node-agent never succeeds for a pod in an enrolled
//! namespace.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use skiff_cni::{conflist, plugin, proto};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(4, '\u{1}');
    let (stdin, args, state, conf) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let dir = std::env::temp_dir().join(format!("skiff-fuzz-cni-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let state_file = dir.join("state.json");
    let _ = std::fs::write(&state_file, state);
    // The plugin's own keys point at the scratch directory and a socket
    // that does not exist, whatever else stdin says.
    let stdin = match serde_json::from_str::<serde_json::Value>(stdin) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.insert("agentSocket".into(), dir.join("no-agent.sock").display().to_string().into());
            m.insert("stateFile".into(), state_file.display().to_string().into());
            m.insert("timeoutSeconds".into(), 1.into());
            serde_json::Value::Object(m).to_string()
        }
        _ => stdin.to_owned(),
    };
    let command = ["ADD", "DEL", "CHECK", "VERSION", "GC", ""][data.len() % 6];
    let env: plugin::Env = BTreeMap::from([
        ("CNI_COMMAND".to_owned(), command.to_owned()),
        ("CNI_CONTAINERID".to_owned(), "c1".to_owned()),
        ("CNI_NETNS".to_owned(), "/var/run/netns/none".to_owned()),
        ("CNI_IFNAME".to_owned(), "eth0".to_owned()),
        ("CNI_ARGS".to_owned(), args.to_owned()),
    ]);
    let mut log = Vec::new();
    let outcome = plugin::run(&env, stdin.as_bytes(), &mut log);
    if command == "ADD" {
        if let (plugin::Outcome::Ok(_), Ok(st)) = (&outcome, proto::read_state(&state_file)) {
            let ns = args.split(';').find_map(|kv| kv.strip_prefix("K8S_POD_NAMESPACE=")).unwrap_or("");
            assert!(
                !st.enrolled_namespaces.iter().any(|n| n == ns),
                "ADD succeeded without node-agent for a pod in enrolled namespace {ns:?}"
            );
        }
    }
    let _ = serde_json::from_str::<proto::Reply>(args);
    let _ = serde_json::from_str::<proto::Request>(conf);
    let path = dir.join("10-net.conflist");
    if let Ok(Some(new)) = conflist::insert(&path, conf, r#"{"type": "skiff-cni"}"#) {
        let _ = conflist::remove(&path, &new);
    }
    let _ = conflist::conf_to_conflist(&path, conf);
});
