//! Differential: the waypoint's `normalize_path` against a second,
//! independently written reading of the rules it documents (Istio's BASE
//! normalization plus merged slashes): unreserved `%xx` decoded (other
//! escapes kept, upper-cased), encoded `/` or `\` and raw `\` refused,
//! slashes merged, dot segments removed as RFC 3986 §5.2.4 does, the query
//! kept. Only paths the `http` crate accepts in a request line are fed
//! (what the waypoint can receive). Also: the result is a fixed point.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skiff_l7::normalize::normalize_path;

/// RFC 3986 §5.2.4 `remove_dot_segments`, on a path whose slashes are
/// already merged.
fn remove_dot_segments(mut input: &str) -> String {
    let mut output = String::new();
    while !input.is_empty() {
        if let Some(rest) = input.strip_prefix("../").or_else(|| input.strip_prefix("./")) {
            input = rest;
        } else if input.starts_with("/./") {
            input = &input[2..];
        } else if input == "/." {
            input = "/";
        } else if input.starts_with("/../") || input == "/.." {
            input = if input == "/.." { "/" } else { &input[3..] };
            match output.rfind('/') {
                Some(i) => output.truncate(i),
                None => output.clear(),
            }
        } else if input == "." || input == ".." {
            input = "";
        } else {
            let start = usize::from(input.starts_with('/'));
            let end = input[start..].find('/').map_or(input.len(), |i| i + start);
            output.push_str(&input[..end]);
            input = &input[end..];
        }
    }
    output
}

fn reference(raw: &str) -> Option<String> {
    let (path, query) = match raw.find('?') {
        Some(i) => (&raw[..i], Some(&raw[i + 1..])),
        None => (raw, None),
    };
    if !path.starts_with('/') || path.contains('\\') {
        return None;
    }
    let mut decoded = String::new();
    let mut chars = path.char_indices();
    while let Some((i, c)) = chars.next() {
        if c != '%' {
            decoded.push(c);
            continue;
        }
        let hex = path.get(i + 1..i + 3)?;
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let v = u8::from_str_radix(hex, 16).ok()?;
        match v {
            b'/' | b'\\' => return None,
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => decoded.push(v as char),
            _ => {
                decoded.push('%');
                decoded.push_str(&hex.to_ascii_uppercase());
            }
        }
        chars.next();
        chars.next();
    }
    let mut merged = String::with_capacity(decoded.len());
    for c in decoded.chars() {
        if !(c == '/' && merged.ends_with('/')) {
            merged.push(c);
        }
    }
    let mut p = remove_dot_segments(&merged);
    if p.is_empty() {
        p.push('/');
    }
    Some(match query {
        Some(q) => format!("{p}?{q}"),
        None => p,
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    // What a request line can carry to the waypoint.
    if !raw.starts_with('/') || http::uri::PathAndQuery::try_from(raw).is_err() {
        return;
    }
    let got = normalize_path(raw);
    let want = reference(raw);
    assert_eq!(got, want, "normalize_path({raw:?}) disagrees with the documented rules");
    if let Some(n) = &got {
        assert_eq!(normalize_path(n).as_deref(), Some(n.as_str()), "not a fixed point: {raw:?} -> {n:?}");
        let path = n.split('?').next().unwrap();
        assert!(!path.contains("//") && !path.split('/').any(|s| s == "." || s == ".."), "{raw:?} -> {n:?}");
    }
});
