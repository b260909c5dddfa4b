//! The workspace's layout rules, checked on the source tree:
//!
//! - no crate depends on a process crate (`skiff-ztunnel`): what two
//!   processes share lives in a library named for what it is;
//! - no import cycle between the modules of one crate: for every crate,
//!   the graph "module A names `crate::B`" is acyclic;
//! - every library crate starts with a `//!` paragraph saying what it is for.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

/// The workspace members, from the root manifest.
fn members() -> Vec<PathBuf> {
    let text = std::fs::read_to_string(workspace().join("Cargo.toml")).unwrap();
    let start = text.find("members = [").expect("members list");
    let end = start + text[start..].find(']').expect("end of members");
    text[start..end].split('"').skip(1).step_by(2).map(|m| workspace().join(m)).collect()
}

/// The top-level module a file of `src/` belongs to (`src/a.rs` and
/// `src/a/b.rs` are both `a`); `None` for the crate root and binaries.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    match first.as_str() {
        "lib.rs" | "main.rs" | "bin" => None,
        f => Some(f.trim_end_matches(".rs").to_owned()),
    }
}

/// The modules of `crate::X` paths named in `text`, outside comments
/// (`use crate::{a, b::c}` groups may span lines).
fn named_modules(text: &str) -> BTreeSet<String> {
    let code: String = text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let ident = |s: &str| -> String { s.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect() };
    let mut out = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group only: `{a::{x, y}, b}` names a and b.
            let (mut depth, mut start, mut names) = (0usize, 0usize, Vec::new());
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        names.push(&group[start..j]);
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.push(&group[start..j]);
                        start = j + 1;
                    }
                    _ => {}
                }
            }
            out.extend(names.into_iter().map(ident).filter(|m| !m.is_empty()));
        } else {
            let m = ident(rest);
            if !m.is_empty() {
                out.insert(m);
            }
        }
    }
    out
}

/// A cycle in `graph`, if there is one, as the path that closes it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(n: &str, g: &BTreeMap<String, BTreeSet<String>>, state: &mut BTreeMap<String, u8>, path: &mut Vec<String>) -> Option<Vec<String>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let at = path.iter().position(|p| p == n).unwrap_or(0);
                let mut cycle = path[at..].to_vec();
                cycle.push(n.to_owned());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(n.to_owned(), 1);
        path.push(n.to_owned());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(n.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    graph.keys().find_map(|n| visit(n, graph, &mut state, &mut Vec::new()))
}

#[test]
fn no_import_cycle_between_the_modules_of_a_crate() {
    let mut checked = 0;
    for member in members() {
        let src = member.join("src");
        let mut files = Vec::new();
        sources_with(&src, "rs", &mut files);
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for f in &files {
            let Some(module) = module_of(&src, f) else { continue };
            let text = std::fs::read_to_string(f).unwrap();
            let deps = graph.entry(module.clone()).or_default();
            deps.extend(named_modules(&text).into_iter().filter(|m| *m != module));
        }
        let modules: BTreeSet<String> = graph.keys().cloned().collect();
        for deps in graph.values_mut() {
            // Items re-exported at the crate root are not modules.
            deps.retain(|d| modules.contains(d));
        }
        if let Some(cycle) = find_cycle(&graph) {
            panic!("{}: modules import each other in a circle: {}", member.display(), cycle.join(" -> "));
        }
        checked += graph.len();
    }
    assert!(checked > 20, "only {checked} modules found: is the members list read right?");
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("agent".to_owned(), BTreeSet::from(["cni".to_owned()])),
        ("cni".to_owned(), BTreeSet::from(["locate".to_owned()])),
        ("locate".to_owned(), BTreeSet::from(["agent".to_owned()])),
    ]
    .into();
    assert_eq!(find_cycle(&g).unwrap(), ["agent", "cni", "locate", "agent"]);
    assert_eq!(
        named_modules("use crate::{a, b::c};\nlet x = crate::d::e(); // crate::f\nuse crate::{\n    g::{h, i},\n    j,\n};\n"),
        BTreeSet::from(["a", "b", "d", "g", "j"].map(String::from))
    );
}

#[test]
fn no_crate_depends_on_a_process_crate() {
    for member in members() {
        let manifest = std::fs::read_to_string(member.join("Cargo.toml")).unwrap();
        for line in manifest.lines() {
            assert!(
                !line.trim_start().starts_with("skiff-ztunnel"),
                "{}: depends on the ztunnel process crate ({line}); shared code belongs in a library (hbone, core, l7)",
                member.display()
            );
        }
    }
}

#[test]
fn every_library_crate_says_what_it_is_for() {
    for member in members() {
        let lib = member.join("src/lib.rs");
        let Ok(text) = std::fs::read_to_string(&lib) else { continue };
        assert!(text.trim_start().starts_with("//!"), "{} does not start with a //! paragraph", lib.display());
    }
}

/// Binaries for a developer's machine, never for a cluster.
const DEV_ONLY: &[&str] = &["skiff-localmesh", "skiff-demo-app", "skiff-grpc-probe", "xtask"];

/// The binaries the workspace builds: packages with `src/main.rs`,
/// `[[bin]]` entries and `src/bin/*.rs`.
fn binaries() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for member in members() {
        let manifest = std::fs::read_to_string(member.join("Cargo.toml")).unwrap();
        let names: Vec<&str> = manifest
            .lines()
            .filter_map(|l| l.trim().strip_prefix("name = \"").and_then(|r| r.strip_suffix('"')))
            .collect();
        // src/main.rs is the package's binary unless a [[bin]] names it.
        if member.join("src/main.rs").exists() && !manifest.contains("path = \"src/main.rs\"") {
            out.insert(names[0].to_owned());
        }
        if manifest.contains("[[bin]]") {
            out.extend(names.iter().skip(1).map(|n| n.to_string()));
        }
        for f in std::fs::read_dir(member.join("src/bin")).into_iter().flatten().flatten() {
            out.insert(f.path().file_stem().unwrap().to_string_lossy().into_owned());
        }
    }
    out
}

#[test]
fn the_image_ships_every_binary_the_readme_and_deploy_name() {
    let docker = std::fs::read_to_string(workspace().join("Dockerfile")).unwrap();
    let start = docker.find("for b in ").expect("the Dockerfile's copy loop");
    let shipped: BTreeSet<&str> = docker[start + "for b in ".len()..].split(';').next().unwrap().split_whitespace().collect();
    let mut texts = vec![std::fs::read_to_string(workspace().join("README.md")).unwrap()];
    let mut yaml = Vec::new();
    sources_with(&workspace().join("deploy"), "yaml", &mut yaml);
    texts.extend(yaml.iter().map(|p| std::fs::read_to_string(p).unwrap()));
    let bins = binaries();
    assert!(bins.contains("skiff-ztunnel") && bins.contains("skiff-cni"), "{bins:?}");
    for b in bins.iter().filter(|b| !DEV_ONLY.contains(&b.as_str())) {
        if texts.iter().any(|t| t.contains(b.as_str())) {
            assert!(shipped.contains(b.as_str()), "{b} is named in README.md or deploy/ but the Dockerfile does not ship it");
        }
    }
    for s in &shipped {
        assert!(bins.contains(*s), "the Dockerfile copies {s}, which the workspace does not build");
    }
}

/// Every file under `dir` whose name ends in `.EXT`.
fn sources_with(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            sources_with(&p, ext, out);
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
}

/// The `--help` of a binary named in ARCHITECTURE.md's limits table.
fn help_of(binary: &str) -> String {
    let argv: &[&str] = match binary {
        "ztunnel" => &["skiff-ztunnel"],
        "waypoint" => &["skiff-waypoint"],
        "gateway" => &["skiff-gateway"],
        "signer" => &["skiff-signer"],
        "node-agent" => &["skiff-node-agent", "run"],
        other => panic!("the limits table names an unknown binary {other:?}"),
    };
    let out = std::process::Command::new(skiff_e2e::bin_dir().join(argv[0])).args(&argv[1..]).arg("--help").output().unwrap();
    assert!(out.status.success(), "{argv:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// The `[default: …]` of `flag` in a clap help text.
fn default_in_help(help: &str, flag: &str) -> Option<String> {
    let mut lines = help.lines().skip_while(|l| {
        let t = l.trim_start();
        !(t == flag || t.starts_with(&format!("{flag} ")) || t.starts_with(&format!("{flag}=")))
    });
    let first = lines.next()?;
    let text: String = std::iter::once(first).chain(lines.take_while(|l| !l.trim_start().starts_with('-'))).collect::<Vec<_>>().join(" ");
    let start = text.find("[default: ")? + "[default: ".len();
    Some(text[start..start + text[start..].find(']')?].to_owned())
}

/// ARCHITECTURE.md's "Limits and timeouts" table mirrors the flags: every
/// row with a flag has it, with that default, in each binary it names;
/// every HBONE and HTTP bound flag a binary has is in the table.
#[test]
fn the_limits_table_agrees_with_the_binaries_flags() {
    let doc = std::fs::read_to_string(workspace().join("ARCHITECTURE.md")).unwrap();
    let start = doc.find("## Limits and timeouts").expect("the section");
    let section = &doc[start..start + doc[start..].find("\n## Limits (today)").expect("the next section")];
    let rows: Vec<Vec<&str>> = section
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| bound"))
        .map(|l| l.trim_matches('|').split(" | ").map(str::trim).collect())
        .collect();
    assert!(rows.len() >= 20, "the table has {} rows", rows.len());
    let mut helps = BTreeMap::new();
    let mut documented = BTreeSet::new();
    for r in &rows {
        assert_eq!(r.len(), 5, "row {r:?}: bound | default | flag | binaries | at the limit");
        let Some(flag) = r[2].strip_prefix('`').and_then(|f| f.strip_suffix('`')) else {
            assert_eq!(r[2], "—", "row {r:?}: the flag is `--name` or a dash");
            continue;
        };
        let want = r[1].split_whitespace().next().unwrap();
        for bin in r[3].split(", ") {
            let help = helps.entry(bin.to_owned()).or_insert_with(|| help_of(bin));
            let got = default_in_help(help, flag).unwrap_or_else(|| panic!("{bin} has no {flag} with a default"));
            assert_eq!(got, want, "{bin} {flag}: the table says {want}, the binary {got}");
            documented.insert((bin.to_owned(), flag.to_owned()));
        }
    }
    for bin in ["ztunnel", "waypoint", "gateway", "node-agent"] {
        let help = helps.entry(bin.to_owned()).or_insert_with(|| help_of(bin)).clone();
        let bounds = |w: &&str| {
            let w = w.split('=').next().unwrap_or(w);
            w.starts_with("--hbone-") || w.starts_with("--http") || w.starts_with("--max-") || w.ends_with("-timeout") || w.ends_with("-grace")
        };
        for flag in help.split_whitespace().filter(bounds) {
            let flag = flag.split('=').next().unwrap();
            assert!(documented.contains(&(bin.to_owned(), flag.to_owned())), "{bin} {flag} is not in the limits table");
        }
    }
}

#[test]
fn defaults_are_read_from_both_help_layouts() {
    let long = "      --a-flag <N>\n          What it bounds\n          [default: 32]\n      --next <X>\n          [default: 9]";
    assert_eq!(default_in_help(long, "--a-flag").as_deref(), Some("32"));
    let short = "      --max <SECONDS>   Longest (60 s up) [default: 86400]\n      --other  x [default: 1]";
    assert_eq!(default_in_help(short, "--max").as_deref(), Some("86400"));
    assert_eq!(default_in_help(short, "--missing"), None);
    assert_eq!(default_in_help("      --flag <N>\n          no default\n      --b [default: 3]", "--flag"), None);
}
