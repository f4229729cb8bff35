//! Istio path templates: `{*}` is exactly one segment, `{**}` zero or more segments (last
//! operator only). Literal segments must be RFC 3986 pchars.
use regex::Regex;

const PCHAR: &str = r"[A-Za-z0-9\-._~%!$&'()*+,;=:@]";

pub fn compile(t: &str) -> Result<Regex, String> {
    if !t.starts_with('/') {
        return Err("a path template must start with '/'".into());
    }
    let segments: Vec<&str> = t[1..].split('/').collect();
    let mut re = String::from("^");
    let mut seen_glob = false;
    for (i, seg) in segments.iter().enumerate() {
        re.push('/');
        match *seg {
            "{*}" => {
                if seen_glob {
                    return Err("{**} must be the last operator".into());
                }
                re.push_str(&format!("{PCHAR}+"));
            }
            "{**}" => {
                if seen_glob || segments[i + 1..].iter().any(|s| s.contains('{')) {
                    return Err("{**} must be the last operator".into());
                }
                seen_glob = true;
                re.push_str(&format!("(?:{PCHAR}|/)*"));
            }
            s if s.contains('{') || s.contains('}') => {
                return Err(format!(
                    "invalid template segment {s:?}: use {{*}} or {{**}} as a whole segment"
                ))
            }
            s => {
                if !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:@".contains(&b))
                {
                    return Err(format!(
                        "segment {s:?} has characters that are not allowed in a path"
                    ));
                }
                re.push_str(&regex::escape(s));
            }
        }
    }
    re.push('$');
    Regex::new(&re).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::compile;

    #[test]
    fn templates() {
        let t = compile("/files/{**}").unwrap();
        assert!(t.is_match("/files/"));
        assert!(t.is_match("/files/a/b/c"));
        assert!(!t.is_match("/files"));
        let t = compile("/api/{*}/v1").unwrap();
        assert!(t.is_match("/api/x/v1"));
        assert!(t.is_match("/api/x%2Fy/v1"));
        assert!(!t.is_match("/api/x/y/v1"));
        assert!(!t.is_match("/api//v1"));
        assert!(compile("/a/{**}/b/{*}").is_err());
        assert!(compile("/a/{x}").is_err());
    }
}
