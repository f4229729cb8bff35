//! Request path normalization, as Istio configures Envoy for each `pathNormalization` mode.
//! The normalized path is what policies match and what the upstream receives.
use crate::config::PathNormalization;

#[derive(Debug, PartialEq, Eq)]
pub enum PathError {
    /// `%00` or a raw NUL: Envoy answers 400.
    Nul,
    /// Not an origin-form path.
    Invalid,
    /// A `%` not followed by two hex digits. Normalizing it would not be idempotent
    /// (`%6%39` decodes to `%69`, which an upstream decodes again), so it is refused.
    BadEscape,
}

/// Splits `path?query#fragment`, drops the fragment, normalizes the path.
/// Returns (normalized path, query including '?', or "").
pub fn normalize(target: &str, mode: PathNormalization) -> Result<(String, String), PathError> {
    let target = target.split('#').next().unwrap_or("");
    let (path, query) = match target.find('?') {
        Some(i) => (&target[..i], &target[i..]),
        None => (target, ""),
    };
    if path.contains('\0') || contains_encoded_nul(path) {
        return Err(PathError::Nul);
    }
    if !path.starts_with('/') {
        return Err(PathError::Invalid);
    }
    if mode != PathNormalization::None && has_bad_escape(path) {
        return Err(PathError::BadEscape);
    }
    let out = match mode {
        PathNormalization::None => path.to_string(),
        PathNormalization::Base => base(path),
        PathNormalization::MergeSlashes => merge_slashes(&base(path)),
        PathNormalization::DecodeAndMergeSlashes => merge_slashes(&base(&decode_slashes(path))),
    };
    Ok((out, query.to_string()))
}

fn contains_encoded_nul(p: &str) -> bool {
    p.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'0' && w[2] == b'0')
}

fn has_bad_escape(p: &str) -> bool {
    let b = p.as_bytes();
    b.iter().enumerate().any(|(i, &c)| {
        c == b'%' && !(i + 2 < b.len() && hex(b[i + 1]).is_some() && hex(b[i + 2]).is_some())
    })
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// `%2F`/`%2f` -> `/`, `%5C`/`%5c` -> `\` (UNESCAPE_AND_FORWARD).
fn decode_slashes(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let x = &b[i + 1..i + 3];
            if x.eq_ignore_ascii_case(b"2f") {
                out.push(b'/');
                i += 3;
                continue;
            }
            if x.eq_ignore_ascii_case(b"5c") {
                out.push(b'\\');
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_default()
}

/// RFC 3986 normalization as Envoy's `normalize_path`: `\` -> `/`, unreserved `%HH` decoded
/// once, dot segments removed (never above the root).
fn base(p: &str) -> String {
    let b = p.as_bytes();
    let mut dec = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => dec.push(b'/'),
            b'%' if i + 2 < b.len() => {
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) if unreserved(h * 16 + l) => {
                        dec.push(h * 16 + l);
                        i += 3;
                        continue;
                    }
                    (Some(_), Some(_)) => {
                        // Other escapes stay, with upper-case hex as a canonical form.
                        dec.push(b'%');
                        dec.push(b[i + 1].to_ascii_uppercase());
                        dec.push(b[i + 2].to_ascii_uppercase());
                        i += 3;
                        continue;
                    }
                    _ => dec.push(b'%'),
                }
            }
            c => dec.push(c),
        }
        i += 1;
    }
    let s = String::from_utf8(dec).unwrap_or_default();
    remove_dot_segments(&s)
}

fn remove_dot_segments(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segs: Vec<&str> = p[1..].split('/').collect();
    let n = segs.len();
    for (i, s) in segs.iter().enumerate() {
        let last = i == n - 1;
        match *s {
            "." => {
                if last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

fn merge_slashes(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    let mut prev = false;
    for c in p.chars() {
        if c == '/' {
            if !prev {
                out.push(c);
            }
            prev = true;
        } else {
            out.push(c);
            prev = false;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use PathNormalization::*;

    fn n(p: &str, m: PathNormalization) -> String {
        normalize(p, m).unwrap().0
    }

    #[test]
    fn base_table() {
        for (input, want) in [
            ("/app/../admin", "/admin"),
            ("/app//", "/app//"),
            ("/xyz%30..//abc", "/xyz0..//abc"),
            ("/app\\admin", "/app/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/a/./b", "/a/b"),
            ("/../../x", "/x"),
            ("/a/b/..", "/a/"),
            ("/%70ath", "/path"),
            ("/x;a=b", "/x;a=b"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a%2fb", "/a%2Fb"),
            ("/X", "/X"),
            ("/..;/admin", "/..;/admin"),
            ("/%252e%252e/admin", "/%252e%252e/admin"),
            ("/p#frag", "/p"),
        ] {
            assert_eq!(n(input, Base), want, "{input}");
        }
    }

    #[test]
    fn other_modes() {
        assert_eq!(n("/app//", MergeSlashes), "/app/");
        assert_eq!(n("//admin", MergeSlashes), "/admin");
        assert_eq!(
            n("/%2Fapp%5cadmin%5Cabc", DecodeAndMergeSlashes),
            "/app/admin/abc"
        );
        assert_eq!(n("/%c0%2fadmin", DecodeAndMergeSlashes), "/%C0/admin");
        assert_eq!(n("/a/../b//c", None), "/a/../b//c");
    }

    #[test]
    fn query_fragment_and_nul() {
        assert_eq!(
            normalize("/a/../b?x=1#f", Base).unwrap(),
            ("/b".to_string(), "?x=1".to_string())
        );
        assert_eq!(normalize("/admin%00", Base), Err(PathError::Nul));
        assert_eq!(normalize("/admin%00", None), Err(PathError::Nul));
        assert_eq!(normalize("*", Base), Err(PathError::Invalid));
    }

    #[test]
    fn stray_percent_is_refused_when_normalizing() {
        for p in ["/a%zz", "/adm%6%39n", "/a%", "/a%4", "//.%3%31p", "/%2%46"] {
            assert_eq!(normalize(p, Base), Err(PathError::BadEscape), "{p}");
            assert_eq!(
                normalize(p, DecodeAndMergeSlashes),
                Err(PathError::BadEscape),
                "{p}"
            );
        }
        // NONE forwards the path untouched, so policy and upstream see the same bytes.
        assert_eq!(n("/a%zz", None), "/a%zz");
    }
}
