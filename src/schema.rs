//! A function's `schema.in` and `schema.out` (JSON Schema), compiled once when the function
//! is registered (or loaded from the store) and checked on every call: a Dispatch run's
//! input and output, and the body of a raw call when the function has `schema.in`.

use std::sync::Arc;

use serde_json::Value;

use crate::error::Error;

/// A compiled schema, shared by every call of the function.
#[derive(Clone)]
pub struct Schema(Arc<jsonschema::Validator>);

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Schema")
    }
}

/// How many failures a message lists before it says "and N more".
const LISTED: usize = 3;

impl Schema {
    /// Compiles the schema at `field` (`schema.in`, `schema.out`). No schema, `null` and
    /// `{}` accept everything: `None`, so such a function pays nothing per call. A schema
    /// that is not valid JSON Schema is a 400 naming the field.
    pub fn compile(field: &str, schema: Option<&Value>) -> Result<Option<Schema>, Error> {
        let schema = match schema {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(o)) if o.is_empty() => return Ok(None),
            Some(s) => s,
        };
        jsonschema::validator_for(schema)
            .map(|v| Some(Schema(Arc::new(v))))
            .map_err(|e| Error::BadRequest(format!("{field}: not a valid JSON Schema: {e}")))
    }

    /// Checks `value`; the error lists what failed, each with where (`/name: ...`).
    pub fn check(&self, value: &Value) -> Result<(), String> {
        let failures: Vec<String> = self
            .0
            .iter_errors(value)
            .map(|e| {
                let at = e.instance_path().to_string();
                let at = if at.is_empty() { "/".to_string() } else { at };
                format!("{at}: {e}")
            })
            .collect();
        if failures.is_empty() {
            return Ok(());
        }
        let mut message = failures[..failures.len().min(LISTED)].join("; ");
        if failures.len() > LISTED {
            message.push_str(&format!(" (and {} more)", failures.len() - LISTED));
        }
        Err(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn empty_schemas_cost_nothing_and_bad_ones_name_their_field() {
        assert!(Schema::compile("schema.in", None).unwrap().is_none());
        assert!(
            Schema::compile("schema.in", Some(&json!({})))
                .unwrap()
                .is_none()
        );
        let e = Schema::compile("schema.out", Some(&json!({"type": "strin"}))).unwrap_err();
        assert!(e.to_string().starts_with("schema.out: "), "{e}");
    }

    #[test]
    fn failures_say_where() {
        let s = Schema::compile(
            "schema.in",
            Some(
                &json!({"type": "object", "properties": {"name": {"type": "string"}},
                         "required": ["name"]}),
            ),
        )
        .unwrap()
        .unwrap();
        s.check(&json!({"name": "Jon"})).unwrap();
        let why = s.check(&json!({"name": 42})).unwrap_err();
        assert!(why.starts_with("/name: "), "{why}");
        let why = s.check(&json!({})).unwrap_err();
        assert!(why.contains("name"), "{why}");
    }
}
