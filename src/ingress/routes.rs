//! The route table of the API endpoints: every enabled [`Api`] compiled into hash maps by
//! host, then path, then method, so that a request finds its API in a handful of lookups
//! (its host, each parent domain for wildcards, then its path and each parent path for
//! prefixes), never by scanning the APIs. The catalog compiles a new table whenever an
//! API changes and swaps it in whole (`ArcSwap`): requests never wait on a lock.
//!
//! Precedence, most specific first: an exact host, then the longest wildcard
//! (`*.example.com`), then APIs that name no host; within a host, an exact path, then the
//! longest prefix (`/a/b/*` before `/a/*`). The first candidate with the request's method
//! and protocol serves it. Two APIs with the same host, path and method that both serve a
//! protocol would match the same requests: [`conflict`] refuses the second.

use std::collections::HashMap;
use std::sync::Arc;

use crate::model::Api;

/// One API as requests see it.
#[derive(Debug)]
pub struct Route {
    pub api: Api,
}

/// What a request found.
#[derive(Debug)]
pub enum Found {
    Api(Arc<Route>),
    /// Only an `https` API matches, and the request came over plain HTTP (426).
    NeedsHttps(Arc<Route>),
    /// The path is served, not with this method (405); the methods that are, for `Allow`.
    MethodNotAllowed(Vec<String>),
    NotFound,
}

/// Where an API's path sits in the table: `/hello` is exact, `/hello/*` the prefix
/// `/hello` (which matches `/hello` itself and everything under `/hello/`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PathKey {
    Exact(String),
    Prefix(String),
}

impl PathKey {
    fn of(uri: &str) -> PathKey {
        match uri.strip_suffix("/*") {
            Some(prefix) => PathKey::Prefix(trim_slash(prefix).to_string()),
            None => PathKey::Exact(trim_slash(uri).to_string()),
        }
    }
}

/// `/a/` is `/a`; `/` stays, and the empty prefix of `/*` becomes `/`.
fn trim_slash(path: &str) -> &str {
    match path.trim_end_matches('/') {
        "" => "/",
        trimmed => trimmed,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum HostKey {
    Exact(String),
    /// `*.example.com` as `example.com`.
    Wildcard(String),
    Any,
}

impl HostKey {
    fn all_of(api: &Api) -> Vec<HostKey> {
        if api.hosts.is_empty() {
            return vec![HostKey::Any];
        }
        api.hosts
            .iter()
            .map(|h| match h.strip_prefix("*.") {
                Some(domain) => HostKey::Wildcard(domain.to_string()),
                None => HostKey::Exact(h.clone()),
            })
            .collect()
    }
}

/// The routes of one host, by path.
#[derive(Debug, Default)]
struct Paths {
    exact: HashMap<String, Methods>,
    prefix: HashMap<String, Methods>,
}

/// The routes of one host and path: a few (method, route) pairs. One method may have two
/// routes when their protocols differ (`http` to one function, `https` to another).
#[derive(Debug, Default)]
struct Methods(Vec<(String, Arc<Route>)>);

#[derive(Debug, Default)]
pub struct RouteTable {
    exact_hosts: HashMap<String, Paths>,
    wildcard_hosts: HashMap<String, Paths>,
    any_host: Paths,
    len: usize,
}

impl RouteTable {
    /// The table of the enabled APIs among `apis`. An API that conflicts with one before
    /// it by name (two gateways accepted overlapping APIs at the same moment) is left
    /// out, and its name returned with the one it lost to.
    pub fn compile(apis: impl IntoIterator<Item = Api>) -> (RouteTable, Vec<(String, String)>) {
        let mut apis: Vec<Api> = apis.into_iter().filter(|a| a.enabled).collect();
        apis.sort_by(|a, b| a.name.cmp(&b.name));
        let mut table = RouteTable::default();
        let mut claimed = Claims::default();
        let mut left_out = Vec::new();
        for api in apis {
            if let Some(other) = claimed.conflict(&api) {
                left_out.push((api.name.clone(), other));
                continue;
            }
            claimed.add(&api);
            table.insert(Arc::new(Route { api }));
        }
        (table, left_out)
    }

    fn insert(&mut self, route: Arc<Route>) {
        self.len += 1;
        for host in HostKey::all_of(&route.api) {
            let paths = match host {
                HostKey::Exact(h) => self.exact_hosts.entry(h).or_default(),
                HostKey::Wildcard(d) => self.wildcard_hosts.entry(d).or_default(),
                HostKey::Any => &mut self.any_host,
            };
            for uri in &route.api.uris {
                let methods = match PathKey::of(uri) {
                    PathKey::Exact(p) => paths.exact.entry(p).or_default(),
                    PathKey::Prefix(p) => paths.prefix.entry(p).or_default(),
                };
                for method in &route.api.methods {
                    methods.0.push((method.clone(), route.clone()));
                }
            }
        }
    }

    /// How many APIs the table serves.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The API for a request to `host` (lower case, no port) and `path`, with `method`,
    /// over `protocol` (`http` or `https`).
    pub fn find(&self, host: &str, path: &str, method: &str, protocol: &str) -> Found {
        let mut best = Found::NotFound;
        for paths in self.hosts_for(host) {
            for methods in paths.candidates(path) {
                let mut allowed = Vec::new();
                for (m, route) in &methods.0 {
                    if m == method {
                        if route.api.serves(protocol) {
                            return Found::Api(route.clone());
                        }
                        if protocol == "http" && !matches!(best, Found::NeedsHttps(_)) {
                            best = Found::NeedsHttps(route.clone());
                        }
                    } else if !allowed.contains(m) {
                        allowed.push(m.clone());
                    }
                }
                if matches!(best, Found::NotFound) && !allowed.is_empty() {
                    best = Found::MethodNotAllowed(allowed);
                }
            }
        }
        best
    }

    /// The routes of `host`, most specific first: its own, each parent domain's wildcard
    /// (`a.b.example.com`: `*.b.example.com`, then `*.example.com`, then `*.com`), then
    /// those for any host.
    fn hosts_for<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Paths> + 'a {
        let parents = host
            .match_indices('.')
            .map(move |(i, _)| &host[i + 1..])
            .filter_map(|domain| self.wildcard_hosts.get(domain));
        self.exact_hosts
            .get(host)
            .into_iter()
            .chain(parents)
            .chain(std::iter::once(&self.any_host))
    }
}

impl Paths {
    /// The routes for `path`, most specific first: exact, then each prefix from the path
    /// itself up to `/`.
    fn candidates<'a>(&'a self, path: &'a str) -> impl Iterator<Item = &'a Methods> + 'a {
        let path = trim_slash(path);
        let exact = self.exact.get(path);
        let mut rest = Some(path);
        let prefixes = std::iter::from_fn(move || {
            let here = rest?;
            rest = match here.rfind('/') {
                Some(0) if here != "/" => Some("/"),
                Some(0) | None => None,
                Some(i) => Some(&here[..i]),
            };
            Some(here)
        })
        .filter_map(|p| self.prefix.get(p));
        exact.into_iter().chain(prefixes)
    }
}

/// The (host, path, method) keys taken so far, with the API that took each and its
/// protocols: what [`conflict`] checks a new API against.
#[derive(Default)]
struct Claims(HashMap<RouteKey, Vec<Claim>>);

/// A host, a path and a method.
type RouteKey = (HostKey, PathKey, String);

/// An API's name and protocols.
type Claim = (String, Vec<String>);

impl Claims {
    fn keys(api: &Api) -> Vec<RouteKey> {
        let mut keys = Vec::new();
        for host in HostKey::all_of(api) {
            for uri in &api.uris {
                for method in &api.methods {
                    keys.push((host.clone(), PathKey::of(uri), method.clone()));
                }
            }
        }
        keys
    }

    fn add(&mut self, api: &Api) {
        for key in Self::keys(api) {
            self.0
                .entry(key)
                .or_default()
                .push((api.name.clone(), api.protocols.clone()));
        }
    }

    /// The name of an API that takes one of `api`'s keys over one of its protocols.
    fn conflict(&self, api: &Api) -> Option<String> {
        Self::keys(api).into_iter().find_map(|key| {
            self.0.get(&key)?.iter().find_map(|(name, protocols)| {
                (name != &api.name && protocols.iter().any(|p| api.serves(p))).then(|| name.clone())
            })
        })
    }
}

/// Whether `api` would match the same requests as one of `others` (enabled or not: a
/// disabled API may be enabled later): the first such API's name and what they share.
pub fn conflict<'a>(api: &Api, others: impl IntoIterator<Item = &'a Api>) -> Option<String> {
    let mut claims = Claims::default();
    for other in others {
        if other.name != api.name {
            claims.add(other);
        }
    }
    claims.conflict(api)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(name: &str, hosts: &[&str], uris: &[&str], methods: &[&str]) -> Api {
        let mut api = Api {
            name: name.into(),
            function: "f".into(),
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
            uris: uris.iter().map(|s| s.to_string()).collect(),
            methods: methods.iter().map(|s| s.to_string()).collect(),
            enabled: true,
            ..Api::default()
        };
        api.normalize().expect("valid");
        api
    }

    fn name_of(found: Found) -> String {
        match found {
            Found::Api(r) => r.api.name.clone(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn exact_paths_beat_prefixes_and_longer_prefixes_win() {
        let (table, left_out) = RouteTable::compile([
            api("root", &[], &["/*"], &["GET"]),
            api("users", &[], &["/users/*"], &["GET"]),
            api("admins", &[], &["/users/admins/*"], &["GET"]),
            api("me", &[], &["/users/me"], &["GET"]),
        ]);
        assert!(left_out.is_empty());
        assert_eq!(table.len(), 4);
        let find = |path| name_of(table.find("h", path, "GET", "http"));
        assert_eq!(find("/users/me"), "me");
        assert_eq!(find("/users/me/"), "me");
        assert_eq!(find("/users/me/x"), "users");
        assert_eq!(find("/users/admins/7"), "admins");
        assert_eq!(find("/users/admins"), "admins");
        assert_eq!(find("/users"), "users");
        assert_eq!(find("/other"), "root");
        assert_eq!(find("/"), "root");
    }

    #[test]
    fn exact_hosts_beat_wildcards_which_beat_any_host() {
        let (table, _) = RouteTable::compile([
            api("any", &[], &["/x"], &["GET"]),
            api("wild", &["*.example.com"], &["/x"], &["GET"]),
            api("deep", &["*.eu.example.com"], &["/x"], &["GET"]),
            api("exact", &["api.example.com"], &["/x"], &["GET"]),
        ]);
        let find = |host| name_of(table.find(host, "/x", "GET", "https"));
        assert_eq!(find("api.example.com"), "exact");
        assert_eq!(find("web.example.com"), "wild");
        assert_eq!(find("a.eu.example.com"), "deep");
        assert_eq!(find("example.com"), "any");
        assert_eq!(find("other.org"), "any");
    }

    #[test]
    fn methods_protocols_and_misses() {
        let mut secure = api("secure", &[], &["/pay"], &["POST"]);
        secure.protocols = vec!["https".into()];
        let (table, _) = RouteTable::compile([secure, api("get", &[], &["/pay"], &["GET"])]);
        assert!(matches!(
            table.find("h", "/pay", "POST", "http"),
            Found::NeedsHttps(_)
        ));
        assert_eq!(name_of(table.find("h", "/pay", "POST", "https")), "secure");
        match table.find("h", "/pay", "DELETE", "https") {
            Found::MethodNotAllowed(allow) => assert_eq!(allow, ["GET", "POST"]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            table.find("h", "/nothing", "GET", "http"),
            Found::NotFound
        ));
    }

    #[test]
    fn overlapping_apis_conflict_and_disjoint_ones_do_not() {
        let first = api("first", &["a.com"], &["/x", "/y/*"], &["GET", "POST"]);
        let same = api("same", &["a.com"], &["/y/*"], &["POST"]);
        assert_eq!(conflict(&same, [&first]), Some("first".to_string()));
        let other_method = api("m", &["a.com"], &["/x"], &["PUT"]);
        assert_eq!(conflict(&other_method, [&first]), None);
        let other_host = api("h", &["b.com"], &["/x"], &["GET"]);
        assert_eq!(conflict(&other_host, [&first]), None);
        let mut http_only = api("p1", &[], &["/z"], &["GET"]);
        http_only.protocols = vec!["http".into()];
        let mut https_only = api("p2", &[], &["/z"], &["GET"]);
        https_only.protocols = vec!["https".into()];
        assert_eq!(conflict(&https_only, [&http_only]), None);
        // Its own earlier version is no conflict (an update).
        assert_eq!(conflict(&first, [&first]), None);
    }

    #[test]
    fn disabled_apis_are_not_served_and_later_conflicts_are_left_out() {
        let mut off = api("off", &[], &["/a"], &["GET"]);
        off.enabled = false;
        let (table, left_out) = RouteTable::compile([
            off,
            api("b", &[], &["/b"], &["GET"]),
            api("a", &[], &["/b"], &["GET"]),
        ]);
        assert!(matches!(
            table.find("h", "/a", "GET", "http"),
            Found::NotFound
        ));
        assert_eq!(name_of(table.find("h", "/b", "GET", "http")), "a");
        assert_eq!(left_out, [("b".to_string(), "a".to_string())]);
    }
}
