//! Where tokens are taken from, as Envoy's extractor does it.
use http::{HeaderMap, HeaderName};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    Header { name: HeaderName, prefix: String },
    Param(String),
    Cookie(String),
}

impl Location {
    /// Without fromHeaders/fromParams/fromCookies: `Authorization: Bearer`, then `?access_token=`.
    pub fn defaults() -> Vec<Location> {
        vec![
            Location::Header {
                name: http::header::AUTHORIZATION,
                prefix: "Bearer ".into(),
            },
            Location::Param("access_token".into()),
        ]
    }
}

/// Tokens at one location of a request.
pub fn extract(loc: &Location, headers: &HeaderMap, query: &str) -> Vec<String> {
    match loc {
        Location::Header { name, prefix } => {
            let values: Vec<&[u8]> = headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
            if values.is_empty() {
                return vec![];
            }
            // Repeated Authorization headers reach Envoy joined by commas; other headers one by one.
            let joined;
            let values: Vec<&[u8]> = if *name == http::header::AUTHORIZATION && values.len() > 1 {
                joined = values.join(&b","[..]);
                vec![&joined[..]]
            } else {
                values
            };
            values
                .into_iter()
                .filter_map(|v| {
                    let v = std::str::from_utf8(v).ok()?;
                    // The prefix is searched anywhere, case-sensitively; the token runs to the end.
                    let at = v.find(prefix.as_str())?;
                    let t = &v[at + prefix.len()..];
                    (!t.is_empty()).then(|| t.to_string())
                })
                .collect()
        }
        Location::Param(name) => first_param(query, name).into_iter().collect(),
        Location::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim_matches('"').to_string())
            .filter(|v| !v.is_empty())
            .into_iter()
            .collect(),
    }
}

/// The first value of a query parameter (names are case-sensitive). `query` starts with '?'.
pub fn first_param(query: &str, name: &str) -> Option<String> {
    query
        .trim_start_matches('?')
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
}

/// The query without any `name=` parameter (a verified query token is not forwarded).
pub fn remove_param(query: &str, name: &str) -> String {
    let kept: Vec<&str> = query
        .trim_start_matches('?')
        .split('&')
        .filter(|kv| {
            !kv.is_empty() && kv.split_once('=').map(|(k, _)| k) != Some(name) && *kv != name
        })
        .collect();
    if kept.is_empty() {
        String::new()
    } else {
        format!("?{}", kept.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    #[test]
    fn header_prefix_anywhere_case_sensitive() {
        let loc = Location::Header {
            name: HeaderName::from_static("x-token"),
            prefix: "Token ".into(),
        };
        assert_eq!(
            extract(&loc, &h(&[("x-token", "xyz Token a.b.c")]), ""),
            vec!["a.b.c"]
        );
        let bearer = &Location::defaults()[0];
        assert!(extract(bearer, &h(&[("authorization", "bearer a.b.c")]), "").is_empty());
        assert!(extract(bearer, &h(&[("authorization", "BEARER a.b.c")]), "").is_empty());
        assert_eq!(
            extract(bearer, &h(&[("authorization", "Bearer a.b.c junk")]), ""),
            vec!["a.b.c junk"]
        );
    }

    #[test]
    fn repeated_authorization_is_joined_custom_headers_are_not() {
        let bearer = &Location::defaults()[0];
        let got = extract(
            bearer,
            &h(&[
                ("authorization", "Bearer a.b.c"),
                ("authorization", "Bearer d.e.f"),
            ]),
            "",
        );
        assert_eq!(got, vec!["a.b.c,Bearer d.e.f"]);
        let loc = Location::Header {
            name: HeaderName::from_static("x-jwt"),
            prefix: String::new(),
        };
        assert_eq!(
            extract(&loc, &h(&[("x-jwt", "a.b.c"), ("x-jwt", "d.e.f")]), "").len(),
            2
        );
    }

    #[test]
    fn params_and_cookies_first_value_wins() {
        let p = Location::Param("access_token".into());
        assert_eq!(
            extract(
                &p,
                &HeaderMap::new(),
                "?a=1&access_token=t1&access_token=t2"
            ),
            vec!["t1"]
        );
        assert!(extract(&p, &HeaderMap::new(), "?Access_Token=t1").is_empty());
        let c = Location::Cookie("session".into());
        assert_eq!(
            extract(&c, &h(&[("cookie", "a=1; session=s1; session=s2")]), ""),
            vec!["s1"]
        );
        assert_eq!(
            remove_param("?a=1&access_token=t&b=2", "access_token"),
            "?a=1&b=2"
        );
        assert_eq!(remove_param("?access_token=t", "access_token"), "");
    }
}
