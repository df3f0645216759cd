//! Drivers say where a function runs: they turn a function's `upstream` into the list of
//! [`Target`]s its calls go to. `static` takes the URLs given at registration; `openfaas`
//! goes through the OpenFaaS gateway or straight to the function's service, as the server's
//! `[openfaas]` section says, or, with pod discovery on, to the function service's ready
//! pods ([`discovery`]). The `local` driver (runtime processes this server starts) lives
//! in [`local`].

pub mod discovery;
pub mod kube;
pub mod local;

use std::sync::Arc;

use crate::config::{DiscoveryMode, OpenfaasConfig};
use crate::error::Error;
use crate::model::{DriverKind, Function, UpstreamSpec};

/// One place a function's calls can go.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    /// `http://host:port`: the key of the connection pool and the name used in metrics and errors.
    pub origin: String,
    /// `host:port`, the value of the `Host` header and the address to connect to.
    pub authority: String,
    /// A path every call's path is appended to (`/function/hello` through an OpenFaaS
    /// gateway), empty for none.
    pub path_prefix: String,
}

pub trait Driver: Send + Sync {
    fn targets(&self, function: &Function, upstream: &UpstreamSpec) -> Result<Vec<Target>, Error>;
}

/// `static`: the URLs given at registration.
pub struct StaticDriver;

impl Driver for StaticDriver {
    fn targets(&self, _: &Function, upstream: &UpstreamSpec) -> Result<Vec<Target>, Error> {
        upstream
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, url)| {
                parse_endpoint_url(url).map_err(|why| {
                    Error::BadRequest(format!("upstream.endpoints[{i}]: \"{url}\" {why}"))
                })
            })
            .collect()
    }
}

/// `openfaas`: the ready pods of the function's service when pod discovery knows them,
/// else one target, the OpenFaaS gateway's `/function/{name}` or the function's service.
pub struct OpenfaasDriver {
    config: OpenfaasConfig,
    /// `Some` when `openfaas.discovery` is on.
    discovery: Option<Arc<discovery::Discovery>>,
}

/// The name of the service (and of the OpenFaaS function) behind a function on the
/// `openfaas` driver: `upstream.name`, or the function's own name.
pub fn openfaas_service<'a>(function: &'a Function, upstream: &'a UpstreamSpec) -> &'a str {
    upstream.name.as_deref().unwrap_or(&function.name)
}

impl Driver for OpenfaasDriver {
    fn targets(&self, function: &Function, upstream: &UpstreamSpec) -> Result<Vec<Target>, Error> {
        let name = openfaas_service(function, upstream);
        if let Some(pods) = self.discovery.as_ref().and_then(|d| d.targets(name)) {
            return Ok(pods.to_vec());
        }
        let url = if self.config.service.is_empty() {
            format!(
                "{}/function/{name}",
                self.config.gateway.trim_end_matches('/')
            )
        } else {
            self.config.service.replace("{name}", name)
        };
        let target = parse_endpoint_url(&url).map_err(|why| {
            Error::BadRequest(format!(
                "upstream.name: \"{name}\" gives the URL \"{url}\" that {why}"
            ))
        })?;
        Ok(vec![target])
    }
}

/// Every driver this server knows, by kind.
pub struct Drivers {
    static_driver: StaticDriver,
    openfaas: OpenfaasDriver,
}

impl Drivers {
    pub fn new(openfaas: OpenfaasConfig) -> Self {
        let discovery = (openfaas.discovery == DiscoveryMode::Endpointslices)
            .then(|| Arc::new(discovery::Discovery::default()));
        Drivers {
            static_driver: StaticDriver,
            openfaas: OpenfaasDriver {
                config: openfaas,
                discovery,
            },
        }
    }

    /// What pod discovery knows, when it is on (its watch is started by the server).
    pub fn discovery(&self) -> Option<&Arc<discovery::Discovery>> {
        self.openfaas.discovery.as_ref()
    }

    pub fn get(&self, kind: DriverKind) -> &dyn Driver {
        match kind {
            DriverKind::Static => &self.static_driver,
            DriverKind::Openfaas => &self.openfaas,
        }
    }
}

/// Parses `http://host[:port][/path]` into a [`Target`]; the error says what is wrong.
pub fn parse_endpoint_url(url: &str) -> Result<Target, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("is not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err("uses https: upstream endpoints are reached over plain HTTP (h2c with \"http2\": true)".into());
        }
        _ => return Err("must start with http://".into()),
    }
    let authority = uri.authority().ok_or("has no host")?;
    if authority.host().is_empty() {
        return Err("has no host".into());
    }
    if uri.query().is_some() {
        return Err("must not have a query string".into());
    }
    let authority = match authority.port_u16() {
        Some(_) => authority.as_str().to_string(),
        None => format!("{}:80", authority.host()),
    };
    let path_prefix = uri.path().trim_end_matches('/').to_string();
    Ok(Target {
        origin: format!("http://{authority}"),
        authority,
        path_prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_parse_into_targets() {
        let t = parse_endpoint_url("http://127.0.0.1:9000").unwrap();
        assert_eq!(t.origin, "http://127.0.0.1:9000");
        assert_eq!(t.path_prefix, "");
        let t = parse_endpoint_url("http://gw.openfaas/function/hello/").unwrap();
        assert_eq!(t.authority, "gw.openfaas:80");
        assert_eq!(t.path_prefix, "/function/hello");
        assert!(
            parse_endpoint_url("https://x")
                .unwrap_err()
                .contains("https")
        );
        assert!(parse_endpoint_url("127.0.0.1:9000").is_err());
        assert!(parse_endpoint_url("http://x:1/?a=b").is_err());
    }

    #[test]
    fn openfaas_targets_follow_the_server_config() {
        let f: Function = serde_json::from_value(serde_json::json!({
            "name": "hello", "upstream": {"driver": "openfaas"}
        }))
        .unwrap();
        let up = f.upstream.clone().unwrap();
        let defaults = crate::config::Config::defaults().openfaas;
        let via_gateway = Drivers::new(OpenfaasConfig {
            gateway: "http://gateway.openfaas:8080".into(),
            service: String::new(),
            ..defaults.clone()
        });
        let t = via_gateway
            .get(DriverKind::Openfaas)
            .targets(&f, &up)
            .unwrap();
        assert_eq!(t[0].origin, "http://gateway.openfaas:8080");
        assert_eq!(t[0].path_prefix, "/function/hello");
        let direct = Drivers::new(OpenfaasConfig {
            gateway: String::new(),
            service: "http://{name}.openfaas-fn:8080".into(),
            ..defaults
        });
        let t = direct.get(DriverKind::Openfaas).targets(&f, &up).unwrap();
        assert_eq!(t[0].origin, "http://hello.openfaas-fn:8080");
        assert_eq!(t[0].path_prefix, "");
    }
}
