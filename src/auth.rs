//! Who may use the control API (`/v1/*`): callers that send `Authorization: Bearer <token>`
//! with one of the tokens of the `[auth]` configuration, unless `auth.skip` is set. The raw
//! surface (`/function/*`, `/async-function/*`) and the operator endpoints stay open, as on an
//! OpenFaaS gateway; see [`protects`].
//!
//! With no token configured, the first start makes one (256 random bits), keeps it in
//! `<data_dir>/token` (mode 0600) for the next starts and hands it to the CLI on this machine
//! through its configuration file (see [`KeptToken::share_with_cli`]), so the quickstart
//! needs no extra step.
//!
//! Tokens are held only as SHA-256 digests and compared in constant time: hashing first
//! makes every comparison the same length, so neither a token's length nor the place of
//! its first wrong byte shows in the time a 401 takes. No token is ever logged or put in
//! an error message; the types holding one do not implement `Debug`.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use base64::Engine;
use http::HeaderMap;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AuthConfig;
use crate::error::Error;

/// Where the CLI looks for its gateway when nothing else says: as `dispatch --host/--port`
/// default (src/cli/http.rs).
const CLI_DEFAULT_HOST: &str = "127.0.0.1";
const CLI_DEFAULT_PORT: u16 = 8080;

const CHALLENGE: &str = "Bearer realm=\"dispatch\"";
const CHALLENGE_INVALID: &str = "Bearer realm=\"dispatch\", error=\"invalid_token\"";

/// Whether `path` belongs to the control API, and so needs a token.
pub fn protects(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

/// The tokens the control API accepts.
pub struct ControlAuth {
    /// Empty when `auth.skip` is set (then every caller is let in).
    tokens: Credentials,
}

/// Bearer tokens (or API keys), held as SHA-256 digests and compared in constant time.
pub struct Credentials {
    digests: Vec<[u8; 32]>,
}

/// Why [`Credentials::verify`] refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization` header.
    Missing,
    /// One that is not `Bearer <token>`.
    Malformed,
    /// A token that is none of them.
    Wrong,
}

impl Credentials {
    pub fn new<'a>(tokens: impl IntoIterator<Item = &'a str>) -> Credentials {
        Credentials {
            digests: tokens.into_iter().map(digest).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// The digest of the request's bearer token when it is one of these (a name for the
    /// caller that shows nothing of the token), or why not.
    pub fn verify(&self, headers: &HeaderMap) -> Result<[u8; 32], Refusal> {
        let value = headers
            .get(http::header::AUTHORIZATION)
            .ok_or(Refusal::Missing)?;
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or(Refusal::Malformed)?;
        let presented = digest(presented);
        // Every digest is compared, whichever matches: the time does not say which did.
        let matched = self
            .digests
            .iter()
            .fold(subtle::Choice::from(0), |any, d| any | d.ct_eq(&presented));
        if bool::from(matched) {
            Ok(presented)
        } else {
            Err(Refusal::Wrong)
        }
    }
}

impl ControlAuth {
    /// Every caller is let in (`auth.skip`).
    pub fn open() -> ControlAuth {
        ControlAuth {
            tokens: Credentials::new([]),
        }
    }

    /// The tokens of `config`: `token`, `tokens` and the lines of `token_file`; with none
    /// of them (and `skip` unset), the token kept in `<data_dir>/token`, made on the first
    /// start. The kept token is handed back too, for the CLI's configuration. The error
    /// names the key or the file at fault.
    pub fn load(
        config: &AuthConfig,
        data_dir: &Path,
    ) -> Result<(ControlAuth, Option<KeptToken>), String> {
        if config.skip {
            return Ok((ControlAuth::open(), None));
        }
        let mut tokens: Vec<(String, String)> = Vec::new();
        if !config.token.is_empty() {
            tokens.push(("auth.token".into(), config.token.clone()));
        }
        for (i, token) in config.tokens.iter().enumerate() {
            tokens.push((format!("auth.tokens[{i}]"), token.clone()));
        }
        if !config.token_file.as_os_str().is_empty() {
            let file = &config.token_file;
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("auth.token_file: cannot read {}: {e}", file.display()))?;
            let before = tokens.len();
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if !line.is_empty() && !line.starts_with('#') {
                    tokens.push((format!("{} line {}", file.display(), n + 1), line.into()));
                }
            }
            if tokens.len() == before {
                return Err(format!(
                    "auth.token_file: {} holds no token (one per line)",
                    file.display()
                ));
            }
        }
        for (origin, token) in &tokens {
            check_token(token).map_err(|why| format!("{origin}: {why}"))?;
        }
        if !tokens.is_empty() {
            let tokens = Credentials::new(tokens.iter().map(|(_, t)| t.as_str()));
            return Ok((ControlAuth { tokens }, None));
        }
        let kept = KeptToken::load_or_make(data_dir)?;
        let auth = ControlAuth {
            tokens: Credentials::new([kept.token.as_str()]),
        };
        Ok((auth, Some(kept)))
    }

    /// Lets a control request in, or says why not: 401 with `WWW-Authenticate`.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Error> {
        if self.tokens.is_empty() {
            return Ok(());
        }
        let (message, challenge) = match self.tokens.verify(headers) {
            Ok(_) => return Ok(()),
            Err(Refusal::Missing) => (
                "the control API (/v1/*) needs `Authorization: Bearer <token>` \
                 (see auth in the gateway's configuration)",
                CHALLENGE,
            ),
            Err(Refusal::Malformed) => (
                "Authorization: expected `Bearer <token>`",
                CHALLENGE_INVALID,
            ),
            Err(Refusal::Wrong) => (
                "the bearer token is not valid for this gateway",
                CHALLENGE_INVALID,
            ),
        };
        Err(Error::Unauthorized {
            message: message.into(),
            challenge,
        })
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A token must travel in a header as `Bearer <token>`: visible ASCII, no spaces.
fn check_token(token: &str) -> Result<(), &'static str> {
    if token.is_empty() {
        return Err("a token may not be empty");
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a token must be visible ASCII characters, with no spaces");
    }
    Ok(())
}

/// The token kept in the data dir (no token configured).
pub struct KeptToken {
    /// `<data_dir>/token`.
    pub path: PathBuf,
    token: String,
}

impl KeptToken {
    /// Reads `<data_dir>/token`, or makes it: 32 random bytes, base64url.
    fn load_or_make(data_dir: &Path) -> Result<KeptToken, String> {
        let path = data_dir.join("token");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let token = text.trim().to_string();
                check_token(&token).map_err(|why| {
                    format!(
                        "{}: {why} (delete the file to have a new token made)",
                        path.display()
                    )
                })?;
                warn_if_shared(&path);
                tracing::info!(path = %path.display(), "control API token read");
                Ok(KeptToken { path, token })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                getrandom::fill(&mut bytes)
                    .map_err(|e| format!("cannot make a control API token: {e}"))?;
                let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
                crate::store::sqlite::create_private_dir(data_dir)
                    .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
                write_private(&path, format!("{token}\n").as_bytes())
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                tracing::info!(path = %path.display(), "control API token made");
                Ok(KeptToken { path, token })
            }
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Writes the token into the CLI's configuration (`$DISPATCH_CONFIG`, else
    /// `~/.dispatch/config.json`) when that is safe, and says in the log what it did:
    ///
    /// - no file: one is made (mode 0600) with this gateway's address and the token;
    /// - a file that points at this gateway (its `host`/`port`, or the CLI's defaults
    ///   127.0.0.1:8080, reach `listen`): its `token` and `scheme` are set, other keys are
    ///   kept;
    /// - a file that points elsewhere, or is not a JSON object: left alone, as the token
    ///   of another gateway must not be replaced by this one's.
    ///
    /// `tls_cert` is the control listener's certificate when it speaks TLS: the file then
    /// says `https` and, unless it names certificates to trust already, `cacert` is that
    /// certificate.
    pub fn share_with_cli(&self, listen: SocketAddr, tls_cert: Option<&Path>) {
        let Some(cli) = cli_config_path() else {
            tracing::info!(token_file = %self.path.display(), "no HOME: the CLI configuration was not written");
            return;
        };
        let shown = cli.display();
        match update_cli_config(&cli, &self.token, listen, tls_cert) {
            Ok(CliUpdate::Created) => {
                tracing::info!(cli_config = %shown, "CLI configuration written with this gateway's address and token")
            }
            Ok(CliUpdate::Updated) => {
                tracing::info!(cli_config = %shown, "this gateway's token and scheme written into the CLI configuration")
            }
            Ok(CliUpdate::Unchanged) => {}
            Ok(CliUpdate::Elsewhere(target)) => tracing::info!(
                cli_config = %shown,
                token_file = %self.path.display(),
                "the CLI configuration points at {target}, not at this gateway: left as is \
                 (pass --token, or set \"token\" there)"
            ),
            Err(e) => tracing::warn!(
                cli_config = %shown,
                token_file = %self.path.display(),
                "the CLI configuration was not written: {e}"
            ),
        }
    }
}

/// Warns when the token file can be read by others than its owner.
fn warn_if_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), "the control API token file is readable by other users; chmod 600 it");
    }
}

/// The CLI's configuration file, as the CLI finds it.
fn cli_config_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("DISPATCH_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| Path::new(&home).join(".dispatch").join("config.json"))
}

#[derive(Debug, PartialEq, Eq)]
enum CliUpdate {
    Created,
    Updated,
    Unchanged,
    /// The file is for another gateway (or unreadable as a CLI configuration): why.
    Elsewhere(String),
}

fn update_cli_config(
    path: &Path,
    token: &str,
    listen: SocketAddr,
    tls_cert: Option<&Path>,
) -> std::io::Result<CliUpdate> {
    let (mut doc, created) = match std::fs::read_to_string(path) {
        Ok(text) => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(doc)) => (doc, false),
            _ => {
                return Ok(CliUpdate::Elsewhere(
                    "something that is not a JSON object".into(),
                ));
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut doc = Map::new();
            doc.insert("host".into(), cli_host(listen.ip()).into());
            doc.insert("port".into(), listen.port().into());
            if let Some(dir) = path.parent() {
                crate::store::sqlite::create_private_dir(dir)?;
            }
            (doc, true)
        }
        Err(e) => return Err(e),
    };
    if let Err(target) = points_at(&doc, listen) {
        return Ok(CliUpdate::Elsewhere(target));
    }
    let before = doc.clone();
    doc.insert("token".into(), token.into());
    let scheme = doc.get("scheme").and_then(Value::as_str).unwrap_or("http");
    match tls_cert {
        Some(cert) => {
            if scheme != "https" {
                doc.insert("scheme".into(), "https".into());
            }
            if !doc.contains_key("cacert") {
                let cert = std::path::absolute(cert)?;
                doc.insert("cacert".into(), cert.to_string_lossy().into_owned().into());
            }
        }
        None if scheme != "http" => {
            doc.insert("scheme".into(), "http".into());
        }
        None => {}
    }
    if created {
        write_json(path, &doc)?;
        Ok(CliUpdate::Created)
    } else if doc == before {
        Ok(CliUpdate::Unchanged)
    } else {
        write_json(path, &doc)?;
        Ok(CliUpdate::Updated)
    }
}

/// Whether a CLI configuration reaches a gateway listening on `listen`; if not, where it
/// points.
fn points_at(doc: &Map<String, Value>, listen: SocketAddr) -> Result<(), String> {
    let host = doc
        .get("host")
        .and_then(Value::as_str)
        .unwrap_or(CLI_DEFAULT_HOST);
    let port = match doc.get("port") {
        None | Some(Value::Null) => Some(CLI_DEFAULT_PORT),
        Some(port) => port.as_u64().and_then(|p| u16::try_from(p).ok()),
    };
    let ip = listen.ip();
    let any_local = ip.is_loopback() || ip.is_unspecified();
    let host_matches = match host.parse::<IpAddr>() {
        Ok(host) => host == ip || (ip.is_unspecified() && host.is_loopback()),
        Err(_) => host.eq_ignore_ascii_case("localhost") && any_local,
    };
    if host_matches && port == Some(listen.port()) {
        Ok(())
    } else {
        let port = port.map_or("?".to_string(), |p| p.to_string());
        Err(format!("{host}:{port}"))
    }
}

/// The host the CLI should use to reach a gateway listening on `ip`.
fn cli_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => Ipv4Addr::LOCALHOST.to_string(),
        IpAddr::V6(v6) if v6.is_unspecified() => Ipv6Addr::LOCALHOST.to_string(),
        ip => ip.to_string(),
    }
}

fn write_json(path: &Path, doc: &Map<String, Value>) -> std::io::Result<()> {
    let mut text = serde_json::to_vec_pretty(doc).expect("a JSON map serializes");
    text.push(b'\n');
    write_private(path, &text)
}

/// Writes a file only its owner can read, whole or not at all: into a temporary file
/// beside it (mode 0600 from its creation), then renamed over it.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let temp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(token: &str, tokens: &[&str]) -> AuthConfig {
        AuthConfig {
            skip: false,
            token: token.into(),
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
            token_file: PathBuf::new(),
        }
    }

    fn bearer(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn every_configured_token_is_accepted_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let (auth, kept) =
            ControlAuth::load(&config("one", &["two", "three"]), dir.path()).unwrap();
        assert!(kept.is_none(), "configured tokens: nothing made");
        assert!(!dir.path().join("token").exists());
        for token in ["one", "two", "three"] {
            auth.check(&bearer(&format!("Bearer {token}"))).unwrap();
        }
        auth.check(&bearer("bearer  two ")).unwrap();
        for wrong in [
            "Bearer on",
            "Bearer one1",
            "Bearer ",
            "Basic b25lOg==",
            "one",
        ] {
            let e = auth.check(&bearer(wrong)).unwrap_err();
            assert!(
                matches!(e, Error::Unauthorized { challenge, .. } if challenge == CHALLENGE_INVALID),
                "{wrong}"
            );
        }
        let e = auth.check(&HeaderMap::new()).unwrap_err();
        assert!(matches!(e, Error::Unauthorized { challenge, .. } if challenge == CHALLENGE));
        assert!(ControlAuth::open().check(&HeaderMap::new()).is_ok());
    }

    #[test]
    fn a_bad_token_or_token_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = ControlAuth::load(&config("", &["ok", "has space"]), dir.path())
            .err()
            .unwrap();
        assert!(e.starts_with("auth.tokens[1]:"), "{e}");
        let mut with_file = config("", &[]);
        with_file.token_file = dir.path().join("absent");
        let e = ControlAuth::load(&with_file, dir.path()).err().unwrap();
        assert!(e.contains("auth.token_file") && e.contains("absent"), "{e}");
        std::fs::write(
            dir.path().join("tokens"),
            "# rotated on Monday\n\nnew\nold\n",
        )
        .unwrap();
        with_file.token_file = dir.path().join("tokens");
        let (auth, _) = ControlAuth::load(&with_file, dir.path()).unwrap();
        auth.check(&bearer("Bearer old")).unwrap();
        assert!(auth.check(&bearer("Bearer # rotated on Monday")).is_err());
    }

    #[test]
    fn the_kept_token_is_made_once_then_read_again() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let (_, first) = ControlAuth::load(&config("", &[]), &data).unwrap();
        let first = first.unwrap();
        assert_eq!(first.token.len(), 43, "256 bits in base64url");
        let mode = std::fs::metadata(&first.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (auth, again) = ControlAuth::load(&config("", &[]), &data).unwrap();
        assert_eq!(again.unwrap().token, first.token);
        auth.check(&bearer(&format!("Bearer {}", first.token)))
            .unwrap();
    }

    #[test]
    fn the_cli_configuration_is_written_only_for_this_gateway() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cli").join("config.json");
        let listen: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let read =
            || -> Value { serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap() };

        assert_eq!(
            update_cli_config(&path, "t1", listen, None).unwrap(),
            CliUpdate::Created
        );
        assert_eq!(
            read(),
            serde_json::json!({"host": "127.0.0.1", "port": 8080, "token": "t1"})
        );
        assert_eq!(
            update_cli_config(&path, "t1", listen, None).unwrap(),
            CliUpdate::Unchanged
        );

        // The CLI's defaults reach this gateway; other keys are kept.
        std::fs::write(&path, r#"{"organization": "acme"}"#).unwrap();
        assert_eq!(
            update_cli_config(&path, "t2", listen, None).unwrap(),
            CliUpdate::Updated
        );
        assert_eq!(
            read(),
            serde_json::json!({"organization": "acme", "token": "t2"})
        );

        for other in [
            r#"{"host": "gw.example", "port": 8080, "token": "theirs"}"#,
            r#"{"host": "127.0.0.1", "port": 9090, "token": "theirs"}"#,
            "not json",
        ] {
            std::fs::write(&path, other).unwrap();
            let update = update_cli_config(&path, "t3", listen, None).unwrap();
            assert!(
                matches!(update, CliUpdate::Elsewhere(_)),
                "{other}: {update:?}"
            );
            assert_eq!(std::fs::read_to_string(&path).unwrap(), other);
        }

        let any: SocketAddr = "0.0.0.0:7000".parse().unwrap();
        std::fs::write(&path, r#"{"host": "localhost", "port": 7000}"#).unwrap();
        assert_eq!(
            update_cli_config(&path, "t4", any, None).unwrap(),
            CliUpdate::Updated
        );
        std::fs::remove_file(&path).unwrap();
        update_cli_config(&path, "t5", any, None).unwrap();
        assert_eq!(read()["host"], "127.0.0.1");
    }

    #[test]
    fn the_cli_configuration_follows_the_control_listeners_scheme() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let cert = dir.path().join("control.crt");
        let listen: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let read =
            || -> Value { serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap() };

        update_cli_config(&path, "t1", listen, Some(&cert)).unwrap();
        assert_eq!(
            read(),
            serde_json::json!({"host": "127.0.0.1", "port": 8080, "token": "t1",
                "scheme": "https", "cacert": cert.to_str().unwrap()})
        );

        // The same address, now plain: the CLI goes back to http; its cacert stays.
        assert_eq!(
            update_cli_config(&path, "t1", listen, None).unwrap(),
            CliUpdate::Updated
        );
        assert_eq!(read()["scheme"], "http");

        // TLS again, with certificates of the user's own to trust: those are kept.
        std::fs::write(&path, r#"{"cacert": "/etc/ssl/ours.pem"}"#).unwrap();
        assert_eq!(
            update_cli_config(&path, "t2", listen, Some(&cert)).unwrap(),
            CliUpdate::Updated
        );
        assert_eq!(
            read(),
            serde_json::json!({"token": "t2", "scheme": "https", "cacert": "/etc/ssl/ours.pem"})
        );
        assert_eq!(
            update_cli_config(&path, "t2", listen, Some(&cert)).unwrap(),
            CliUpdate::Unchanged
        );
    }
}
