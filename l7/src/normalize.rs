//! What policy, routing and the upstream see of a request: one normalized
//! path (so `/public/../admin` cannot pass as `/public/...` and reach
//! `/admin`), one authority (the URI's and the Host header's must agree),
//! and the headers with repeated names joined.

use http::{header, HeaderMap, Uri};

/// Istio's BASE path normalization plus merged slashes: `%xx` of unreserved
/// characters decoded, `.` and `..` segments resolved, `//` merged; encoded
/// `/` or `\\` and raw `\\` are refused (None). The query is kept as is.
pub fn normalize_path(raw: &str) -> Option<String> {
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    if !path.starts_with('/') || path.contains('\\') {
        return None;
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            // Exactly two hex digits (`from_str_radix` alone would take a
            // sign: `%+1`).
            let hex = path.get(i + 1..i + 3).filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))?;
            let v = u8::from_str_radix(hex, 16).ok()?;
            if v == b'/' || v == b'\\' {
                return None;
            }
            if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                decoded.push(v as char);
            } else {
                decoded.push('%');
                decoded.push_str(&hex.to_ascii_uppercase());
            }
            i += 3;
        } else {
            // Whole characters: a byte at a time would turn UTF-8 into
            // Latin-1 and change the path.
            let c = path[i..].chars().next()?;
            decoded.push(c);
            i += c.len_utf8();
        }
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut p = format!("/{}", out.join("/"));
    if (decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..")) && p != "/" {
        p.push('/');
    }
    Some(match query {
        Some(q) => format!("{p}?{q}"),
        None => p,
    })
}

/// The request's authority, canonical: the URI's (HTTP/2 `:authority`,
/// absolute-form), else the Host header; a host (a DNS name, an IPv4
/// address or a bracketed IPv6 address, lower-cased, without a trailing
/// dot) and an optional numeric port. None (a bad request) when the Host
/// header is not text, names another authority than the URI, or is not
/// such an authority (userinfo, a path, a second colon…): policy and
/// routing then never read one Host two ways. Empty when there is
/// neither.
pub fn authority(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    let host_header = headers.get(header::HOST).map(|h| h.to_str().map(str::to_owned));
    let authority = match (uri.authority().map(|a| a.to_string()), host_header) {
        (_, Some(Err(_))) => None,
        (Some(a), Some(Ok(h))) if !a.eq_ignore_ascii_case(&h) => None,
        (Some(a), _) => Some(a),
        (None, Some(Ok(h))) => Some(h),
        (None, None) => Some(String::new()),
    }?;
    canonical_authority(&authority)
}

/// `host[:port]` checked and made canonical (see [`authority`]).
pub fn canonical_authority(a: &str) -> Option<String> {
    if a.is_empty() {
        return Some(String::new());
    }
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if inside.is_empty() || !inside.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
            return None;
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (format!("[{}]", inside.to_ascii_lowercase()), port)
    } else {
        let (host, port) = match a.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        let label_ok = |l: &str| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
            return None;
        }
        (host.to_ascii_lowercase(), port)
    };
    match port {
        None => Some(host),
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u32>().ok()? <= 65535 => Some(format!("{host}:{p}")),
        Some(_) => None,
    }
}

/// Repeated headers joined with ",", as Envoy presents them; a value that
/// is not text stays present (as its lossy form), so a DENY on the header
/// still sees it.
pub fn joined_headers(h: &HeaderMap) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = Vec::new();
    for (k, v) in h.iter() {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        match headers.iter_mut().find(|(n, _)| n == k.as_str()) {
            Some((_, existing)) => {
                existing.push(',');
                existing.push_str(&v);
            }
            None => headers.push((k.as_str().to_owned(), v)),
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One reading of the Host for policy and routing: anything that is not
    /// `host[:port]` is refused, a trailing dot goes with or without a port.
    #[test]
    fn authorities_are_canonical_or_refused() {
        for (a, want) in [
            ("Example.COM", Some("example.com")),
            ("example.com.", Some("example.com")),
            ("admin.example.com.:80", Some("admin.example.com:80")),
            ("10.0.0.1:8080", Some("10.0.0.1:8080")),
            ("[::1]", Some("[::1]")),
            ("[::1]:443", Some("[::1]:443")),
            ("", Some("")),
            ("x:80.example.com", None),
            ("evil.com/.example.com", None),
            ("a@b.example.com", None),
            ("a..b", None),
            ("host:", None),
            ("host:99999", None),
            ("[::1", None),
            ("[::1]x", None),
            ("ex ample.com", None),
        ] {
            assert_eq!(canonical_authority(a).as_deref(), want, "{a:?}");
        }
    }

    #[test]
    fn paths_are_normalized_before_policy_and_routing() {
        for (raw, want) in [
            ("/public/../admin", Some("/admin")),
            ("//admin", Some("/admin")),
            ("/%61dmin", Some("/admin")),
            ("/a/./b/", Some("/a/b/")),
            ("/a/b?x=../y", Some("/a/b?x=../y")),
            ("/../..", Some("/")),
            ("/a%2Fb", None),
            ("/a%5cb", None),
            ("/a\\b", None),
            ("/a%zz", None),
            ("/a%+1", None),
            ("/café/./x", Some("/café/x")),
            ("/caf%C3%A9", Some("/caf%C3%A9")),
            ("relative", None),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), want, "{raw}");
        }
    }

    /// Name, URI, Host header, the authority wanted.
    type AuthorityCase = (&'static str, &'static str, Option<&'static [u8]>, Option<&'static str>);

    #[test]
    fn the_uri_and_host_header_must_agree_on_the_authority() {
        #[rustfmt::skip]
        let cases: [AuthorityCase; 6] = [
            ("origin form: the Host header", "/x", Some(b"Reviews.Shop:9080"), Some("reviews.shop:9080")),
            ("absolute form, no Host", "http://reviews./x", None, Some("reviews")),
            ("both, agreeing", "http://reviews/x", Some(b"REVIEWS"), Some("reviews")),
            ("both, disagreeing", "http://reviews/x", Some(b"ratings"), None),
            ("Host not text", "/x", Some(b"r\xe9views"), None),
            ("neither", "/x", None, Some("")),
        ];
        for (name, uri, host, want) in cases {
            let mut h = HeaderMap::new();
            if let Some(host) = host {
                h.insert(header::HOST, http::HeaderValue::from_bytes(host).unwrap());
            }
            assert_eq!(authority(&uri.parse().unwrap(), &h).as_deref(), want, "case {name}");
        }
    }

    #[test]
    fn repeated_headers_are_joined_in_order() {
        let mut h = HeaderMap::new();
        h.append("x-a", "1".parse().unwrap());
        h.append("x-b", "2".parse().unwrap());
        h.append("x-a", "3".parse().unwrap());
        assert_eq!(joined_headers(&h), vec![("x-a".into(), "1,3".into()), ("x-b".into(), "2".into())]);
    }
}
