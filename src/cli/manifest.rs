//! The objects the Dispatch API knows ([`Kind`]: where each lives, in which order they
//! depend on each other) and the multi-document YAML files of `create --file` and
//! `delete --file`, as Dispatch's CLI read them: each document has a `kind` and the
//! object's own fields; a Function may name its code with `sourcePath`, relative to the
//! YAML file.
//!
//! The YAML is read with serde-saphyr: a pure-Rust, maintained YAML parser made for serde
//! (serde_yaml is archived, and its forks keep the C-translated `unsafe-libyaml`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::http::CliError;

/// A kind of object, in dependency order: base images before the images built on them,
/// secrets before the functions that read them, functions before the APIs and
/// subscriptions that call them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    BaseImage,
    Image,
    Secret,
    Function,
    Api,
    Subscription,
    /// A kind this CLI does not know (Dispatch's `Driver`, `Policy`...): reported, never sent.
    Unknown(String),
}

impl Kind {
    pub fn parse(kind: &str) -> Kind {
        match kind {
            "BaseImage" => Kind::BaseImage,
            "Image" => Kind::Image,
            "Secret" => Kind::Secret,
            "Function" => Kind::Function,
            "API" | "Api" => Kind::Api,
            "Subscription" => Kind::Subscription,
            other => Kind::Unknown(other.to_string()),
        }
    }

    /// The name as documents spell it.
    pub fn name(&self) -> &str {
        match self {
            Kind::BaseImage => "BaseImage",
            Kind::Image => "Image",
            Kind::Secret => "Secret",
            Kind::Function => "Function",
            Kind::Api => "API",
            Kind::Subscription => "Subscription",
            Kind::Unknown(name) => name,
        }
    }

    /// The name in messages (`function "hello" ...`).
    pub fn noun(&self) -> &str {
        match self {
            Kind::BaseImage => "base image",
            Kind::Image => "image",
            Kind::Secret => "secret",
            Kind::Function => "function",
            Kind::Api => "api",
            Kind::Subscription => "subscription",
            Kind::Unknown(name) => name,
        }
    }

    /// The collection's path: `POST` creates, `GET` lists. Secrets keep Dispatch's
    /// trailing slash (its secret store's routes sit at `/v1/secret/`).
    pub fn collection(&self) -> Option<&'static str> {
        match self {
            Kind::BaseImage => Some("/v1/baseimage"),
            Kind::Image => Some("/v1/image"),
            Kind::Secret => Some("/v1/secret/"),
            Kind::Function => Some("/v1/function"),
            Kind::Api => Some("/v1/api"),
            Kind::Subscription => Some("/v1/event/subscriptions"),
            Kind::Unknown(_) => None,
        }
    }

    /// One object's path.
    pub fn item(&self, name: &str) -> Option<String> {
        let collection = self.collection()?.trim_end_matches('/');
        Some(format!("{collection}/{}", encode_segment(name)))
    }
}

/// A path segment, percent-encoded where a name would break the path or the query.
pub fn encode_segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One document of a YAML file.
#[derive(Debug, Clone)]
pub struct Document {
    pub kind: Kind,
    pub name: String,
    /// The object as the API takes it (with `source` in place of `sourcePath`).
    pub body: Value,
}

/// Reads a YAML file's documents in dependency order (the file's order within a kind).
/// Function sources are read and packed here, so that a missing file stops everything
/// before the first object is created.
pub fn load(path: &Path) -> Result<Vec<Document>, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("reading {}: {e}", path.display())))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut docs =
        parse(&text, &base).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    docs.sort_by(|a, b| a.kind.cmp(&b.kind));
    Ok(docs)
}

/// The documents of `text`, in file order; `sourcePath`s are relative to `base`.
pub fn parse(text: &str, base: &Path) -> Result<Vec<Document>, String> {
    let values: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| e.to_string())?;
    let mut docs = Vec::new();
    for (i, value) in values.into_iter().enumerate() {
        let index = i + 1;
        let Value::Object(mut fields) = value else {
            if value.is_null() {
                continue;
            }
            return Err(format!("document {index}: not a mapping of fields"));
        };
        let kind = match fields.get("kind") {
            Some(Value::String(kind)) => Kind::parse(kind),
            _ => return Err(format!("document {index}: kind: required")),
        };
        let name = match fields.get("name") {
            Some(Value::String(name)) if !name.is_empty() => name.clone(),
            _ => {
                return Err(format!(
                    "document {index} ({}): name: required",
                    kind.name()
                ));
            }
        };
        if let Some(source) = fields.remove("sourcePath") {
            let Value::String(relative) = source else {
                return Err(format!(
                    "{} \"{name}\": sourcePath: not a path",
                    kind.noun()
                ));
            };
            let full: PathBuf = base.join(&relative);
            let packed = super::source::encode(&full).map_err(|e| {
                format!(
                    "{} \"{name}\": sourcePath {}: {e}",
                    kind.noun(),
                    full.display()
                )
            })?;
            fields.insert("source".into(), Value::String(packed));
        }
        docs.push(Document {
            kind,
            name,
            body: Value::Object(fields),
        });
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
kind: Function
name: hello-py
sourcePath: 'hello.py'
image: python3
schema: {}
tags:
  - key: role
    value : test
---
kind: API
name: post-hello
function: hello-py
methods:
  - POST
---
kind: Secret
name: open-sesame
secrets:
  password: OpenSesame
---
kind: DriverType
name: ticker
---
kind: BaseImage
name: python3-base
dockerUrl: dispatchframework/python3-base:0.0.8
language: python3
---
"#;

    #[test]
    fn documents_come_in_dependency_order_with_their_source_packed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello.py"), "def handle(c, p): return p").unwrap();
        let file = dir.path().join("seed.yaml");
        std::fs::write(&file, SEED).unwrap();
        let docs = load(&file).unwrap();
        let order: Vec<(&str, &str)> = docs
            .iter()
            .map(|d| (d.kind.name(), d.name.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                ("BaseImage", "python3-base"),
                ("Secret", "open-sesame"),
                ("Function", "hello-py"),
                ("API", "post-hello"),
                ("DriverType", "ticker"),
            ]
        );
        let function = &docs[2].body;
        assert!(function.get("sourcePath").is_none(), "{function}");
        assert!(function["source"].as_str().unwrap().starts_with("H4sI"));
        assert_eq!(function["tags"][0]["value"], "test");
        assert_eq!(function["kind"], "Function");
        assert_eq!(docs[1].body["secrets"]["password"], "OpenSesame");
    }

    #[test]
    fn a_missing_source_names_the_function_and_the_path() {
        let e = parse(
            "kind: Function\nname: f\nsourcePath: nope.py\n",
            Path::new("/nonexistent"),
        )
        .unwrap_err();
        assert!(
            e.starts_with("function \"f\": sourcePath /nonexistent/nope.py"),
            "{e}"
        );
    }

    #[test]
    fn a_document_without_kind_or_name_is_refused() {
        let e = parse("name: x\n", Path::new(".")).unwrap_err();
        assert_eq!(e, "document 1: kind: required");
        let e = parse("kind: Function\n---\nkind: Secret\n", Path::new(".")).unwrap_err();
        assert_eq!(e, "document 1 (Function): name: required");
    }

    #[test]
    fn names_are_escaped_in_paths() {
        assert_eq!(
            Kind::Function.item("a b/c").unwrap(),
            "/v1/function/a%20b%2Fc"
        );
        assert_eq!(Kind::Secret.item("s").unwrap(), "/v1/secret/s");
        assert_eq!(Kind::Unknown("Driver".into()).item("d"), None);
    }
}
