//! The query parameters the mirror reads, parsed once at the edge (`server::request`) into
//! typed values that the server (for the access line's target) and the handlers share.

/// A request's query, as far as the mirror reads it; other parameters are ignored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Query {
    /// `ns=<registry>` (the first one): containerd's way of naming the upstream registry. An
    /// empty value names none (the routing ignores it) but is kept in `Link`s as sent.
    pub ns: Option<String>,
    /// `n` and `last`: the paging of a tags list or the catalog.
    pub paging: Paging,
    /// `artifactType` (the first one, unless empty): the referrers filter.
    pub artifact_type: Option<String>,
}

/// The paging parameters of a tags list or the catalog (the last of each wins).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Paging {
    /// `n`, when a number.
    pub n: Option<usize>,
    pub last: Option<String>,
}

impl Query {
    pub fn parse(query: Option<&str>) -> Query {
        let mut parsed = Query::default();
        let mut artifact_type = None;
        for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*k {
                "ns" if parsed.ns.is_none() => parsed.ns = Some(v.into_owned()),
                "n" => parsed.paging.n = v.parse().ok(),
                "last" => parsed.paging.last = Some(v.into_owned()),
                "artifactType" if artifact_type.is_none() => artifact_type = Some(v.into_owned()),
                _ => {}
            }
        }
        parsed.artifact_type = artifact_type.filter(|v| !v.is_empty());
        parsed
    }
}

impl Paging {
    /// The query that asks an upstream for this page (`n=…&last=…`); `None` without paging.
    pub fn upstream_query(&self) -> Option<String> {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(n) = self.n {
            q.append_pair("n", &n.to_string());
        }
        if let Some(last) = &self.last {
            q.append_pair("last", last);
        }
        Some(q.finish()).filter(|q| !q.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_parsed_once_with_their_rules() {
        let q = Query::parse(Some(
            "ns=ghcr.io&ns=quay.io&n=5&n=2&last=a&last=b&artifactType=x&artifactType=y&other=1",
        ));
        assert_eq!(q.ns.as_deref(), Some("ghcr.io"));
        assert_eq!(q.paging.n, Some(2));
        assert_eq!(q.paging.last.as_deref(), Some("b"));
        assert_eq!(q.artifact_type.as_deref(), Some("x"));
        assert_eq!(q.paging.upstream_query().as_deref(), Some("n=2&last=b"));

        let q = Query::parse(Some("ns=&n=x&artifactType=&artifactType=y"));
        assert_eq!(q.ns.as_deref(), Some(""));
        assert_eq!(q.paging.n, None);
        assert_eq!(q.artifact_type, None);
        assert_eq!(q.paging.upstream_query(), None);

        assert_eq!(Query::parse(None), Query::default());
        let q = Query::parse(Some("last=a%2Fb"));
        assert_eq!(q.paging.last.as_deref(), Some("a/b"));
        assert_eq!(q.paging.upstream_query().as_deref(), Some("last=a%2Fb"));
    }
}
