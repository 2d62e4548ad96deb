//! The URL of one request: an endpoint's URL with the `path` and `query`
//! of an `ihub.http_request` added. Paths go before the endpoint's own
//! query string, and query strings are joined with `&`, so that an endpoint
//! `https://api.example.com/v1?key=k` with path `/contacts` and query
//! `{"cursor": "c2"}` asks for `https://api.example.com/v1/contacts?key=k&cursor=c2`.

use serde_json::Value;

/// What is wrong with a `query` object. Never repeats a value.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QueryError {
    #[error("query must be a JSON object of parameter names to values")]
    NotAnObject,
    #[error("query parameter \"{0}\" must be a string, number, boolean, null or an array of those")]
    Value(String),
    #[error("query parameter names must not be empty")]
    EmptyName,
}

pub const QUERY_HINT: &str = r#"For example query => '{"cursor": "c_2", "limit": 100, "status": ["open", "won"]}': an array repeats the parameter, null leaves it out."#;

/// A query string (without `?`) from a JSON object: strings as they are,
/// numbers and booleans as JSON writes them, arrays as repeated parameters,
/// `null` left out; names and values form-encoded.
pub fn query_string(query: &Value) -> Result<String, QueryError> {
    let Value::Object(map) = query else {
        return Err(QueryError::NotAnObject);
    };
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in map {
        if name.is_empty() {
            return Err(QueryError::EmptyName);
        }
        let scalar = |v: &Value| -> Result<Option<String>, QueryError> {
            match v {
                Value::Null => Ok(None),
                Value::String(s) => Ok(Some(s.clone())),
                Value::Number(n) => Ok(Some(n.to_string())),
                Value::Bool(b) => Ok(Some(b.to_string())),
                _ => Err(QueryError::Value(name.chars().take(100).collect())),
            }
        };
        match value {
            Value::Array(items) => {
                for item in items {
                    if let Some(v) = scalar(item)? {
                        out.append_pair(name, &v);
                    }
                }
            }
            other => {
                if let Some(v) = scalar(other)? {
                    out.append_pair(name, &v);
                }
            }
        }
    }
    Ok(out.finish())
}

/// `url` with `path` appended (a path starting with `/` replaces a
/// trailing slash; one starting with `?` adds only parameters), before the
/// URL's own query string, whose parameters come first. `ihub.http_request`
/// takes only paths starting with `/` or `?`, so the host never changes.
pub fn join_url(url: &str, path: Option<&str>) -> String {
    let Some(path) = path.filter(|p| !p.is_empty()) else {
        return url.to_string();
    };
    let (url, fragment) = match url.split_once('#') {
        Some((u, f)) => (u, Some(f)),
        None => (url, None),
    };
    let (base, own_query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let (path_part, path_query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let mut out = if path_part.starts_with('/') {
        format!("{}{}", base.trim_end_matches('/'), path_part)
    } else {
        format!("{base}{path_part}")
    };
    let queries: Vec<&str> = [own_query, path_query].into_iter().flatten().filter(|q| !q.is_empty()).collect();
    if !queries.is_empty() {
        out.push('?');
        out.push_str(&queries.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// `path` with the parameters of `query` added (`?` or `&` as needed).
pub fn with_query(path: Option<&str>, query: &str) -> Option<String> {
    if query.is_empty() {
        return path.map(str::to_string);
    }
    Some(match path {
        None | Some("") => format!("?{query}"),
        Some(p) if p.contains('?') => format!("{p}&{query}"),
        Some(p) => format!("{p}?{query}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn query_strings_encode_scalars_arrays_and_skip_nulls() {
        let q = query_string(&json!({"cursor": "c 2&x", "limit": 100, "all": true, "s": ["a", "b"], "gone": null}))
            .unwrap();
        // serde_json keeps keys sorted.
        assert_eq!(q, "all=true&cursor=c+2%26x&limit=100&s=a&s=b");
        assert_eq!(query_string(&json!({})).unwrap(), "");
        assert_eq!(query_string(&json!([1])), Err(QueryError::NotAnObject));
        assert_eq!(query_string(&json!({"x": {"y": 1}})), Err(QueryError::Value("x".into())));
        assert_eq!(query_string(&json!({"x": [[1]]})), Err(QueryError::Value("x".into())));
        assert_eq!(query_string(&json!({"": 1})), Err(QueryError::EmptyName));
    }

    #[test]
    fn paths_and_queries_join_the_endpoint_url() {
        assert_eq!(join_url("https://h/api", None), "https://h/api");
        assert_eq!(join_url("https://h/", Some("/x")), "https://h/x");
        assert_eq!(join_url("https://h/api", Some("/x")), "https://h/api/x");
        assert_eq!(join_url("https://h/api", Some("?a=1")), "https://h/api?a=1");
        assert_eq!(join_url("https://h/api", Some("/x?a=1")), "https://h/api/x?a=1");
        // The endpoint's own query string stays, first; the path goes before it.
        assert_eq!(
            join_url("https://h/v1?key=k", Some("/contacts?cursor=c2")),
            "https://h/v1/contacts?key=k&cursor=c2"
        );
        assert_eq!(join_url("https://h/v1?key=k", Some("?cursor=c2")), "https://h/v1?key=k&cursor=c2");
        assert_eq!(join_url("https://h/v1/", Some("/c")), "https://h/v1/c");
        assert_eq!(join_url("https://h/v1#top", Some("/c?a=1")), "https://h/v1/c?a=1#top");
    }

    /// What http_request lets through (a path starting with / or ?) never
    /// changes the host a request goes to, whatever follows.
    #[test]
    fn a_path_never_changes_the_host() {
        for path in ["/@evil.example", "/x@evil.example:1/", "?@evil.example", "?x=1&@evil.example", "//evil.example/x"]
        {
            let joined = join_url("https://api.crm.example", Some(path));
            let url = url::Url::parse(&joined).unwrap();
            assert_eq!(url.host_str(), Some("api.crm.example"), "{path} -> {joined}");
            assert_eq!((url.username(), url.port()), ("", None), "{path} -> {joined}");
        }
    }

    #[test]
    fn queries_are_added_to_paths() {
        assert_eq!(with_query(None, "a=1").as_deref(), Some("?a=1"));
        assert_eq!(with_query(Some("/x"), "a=1").as_deref(), Some("/x?a=1"));
        assert_eq!(with_query(Some("/x?b=2"), "a=1").as_deref(), Some("/x?b=2&a=1"));
        assert_eq!(with_query(Some("/x"), "").as_deref(), Some("/x"));
        assert_eq!(with_query(None, ""), None);
    }
}
