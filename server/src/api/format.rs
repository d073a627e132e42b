//! Structured output requests: OpenAI's `response_format`, and the extensions other servers
//! accept for regexes, grammars and choices, parsed into one [`GrammarSpec`]:
//!
//! | request field | constraint |
//! |---|---|
//! | `response_format: {"type": "json_object"}` | any JSON object |
//! | `response_format: {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` | the schema |
//! | `structured_outputs: {"json": SCHEMA}` (vLLM) | the schema |
//! | `structured_outputs: {"regex": "..."}` | the regular expression |
//! | `structured_outputs: {"choice": ["a", "b"]}` | one of the strings |
//! | `structured_outputs: {"grammar": "..."}` | a Lark grammar (llguidance's dialect) |
//! | `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (vLLM's older names) | the same |
//!
//! At most one may be given. Whether the constraint compiles is checked later, against the
//! model's vocabulary ([`crate::text::grammar::Grammars`]).

use serde_json::Value;

use super::body::{json_kind, Params};
use crate::error::ApiError;
use crate::text::grammar::GrammarSpec;

/// A request's output constraint and the field it came in (for error messages).
#[derive(Debug, Clone, PartialEq)]
pub struct Constraint {
    pub param: &'static str,
    pub spec: GrammarSpec,
}

/// Takes every structured-output field out of `p`.
pub fn parse_grammar(p: &mut Params) -> Result<Option<Constraint>, ApiError> {
    let mut found: Vec<(&'static str, GrammarSpec)> = Vec::new();
    if let Some(v) = p.take_value("response_format") {
        if let Some(g) = response_format(v)? {
            found.push(("response_format", g));
        }
    }
    if let Some(v) = p.take_value("structured_outputs") {
        let Value::Object(mut m) = v else {
            return Err(ApiError::param(
                "structured_outputs",
                "must be an object with one of json, regex, choice, grammar",
            ));
        };
        // `json_object: true` is vLLM's spelling of response_format json_object.
        if m.remove("json_object")
            .is_some_and(|v| v == Value::Bool(true))
        {
            found.push(("structured_outputs", GrammarSpec::JsonObject));
        }
        for key in ["json", "regex", "choice", "grammar"] {
            if let Some(v) = m.remove(key).filter(|v| !v.is_null()) {
                found.push(("structured_outputs", field(key, "structured_outputs", v)?));
            }
        }
        if let Some(k) = m.keys().next() {
            return Err(ApiError::param(
                "structured_outputs",
                format!("unknown field `{k}` (use one of json, regex, choice, grammar)"),
            ));
        }
    }
    for (name, key) in [
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ] {
        if let Some(v) = p.take_value(name).filter(|v| !v.is_null()) {
            found.push((name, field(key, name, v)?));
        }
    }
    match found.len() {
        0 | 1 => Ok(found.pop().map(|(param, spec)| Constraint { param, spec })),
        _ => Err(ApiError::param(
            found[1].0,
            format!(
                "only one output constraint may be given (also got `{}`)",
                found[0].0
            ),
        )),
    }
}

fn response_format(v: Value) -> Result<Option<GrammarSpec>, ApiError> {
    const P: &str = "response_format";
    let kind = v.get("type").and_then(Value::as_str).unwrap_or_default();
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(GrammarSpec::JsonObject)),
        "json_schema" => {
            let Some(js) = v.get("json_schema").filter(|j| j.is_object()) else {
                return Err(ApiError::param(
                    P,
                    "`json_schema` (an object with `name` and `schema`) is required for type json_schema",
                ));
            };
            match js.get("schema") {
                Some(s @ Value::Object(_)) => Ok(Some(GrammarSpec::JsonSchema(s.clone()))),
                Some(Value::Bool(true)) | None => {
                    Ok(Some(GrammarSpec::JsonSchema(Value::Bool(true))))
                }
                Some(other) => Err(ApiError::param(
                    P,
                    format!(
                        "`json_schema.schema` must be an object, not {}",
                        json_kind(other)
                    ),
                )),
            }
        }
        other => Err(ApiError::param(
            P,
            format!("type must be text, json_object or json_schema, not {other:?}"),
        )),
    }
}

/// One constraint value: `key` says which kind, `param` is what the client called it.
fn field(key: &str, param: &str, v: Value) -> Result<GrammarSpec, ApiError> {
    match (key, v) {
        // vLLM accepts a schema as JSON text too.
        ("json", Value::String(s)) => serde_json::from_str::<Value>(&s)
            .map(GrammarSpec::JsonSchema)
            .map_err(|e| ApiError::param(param, format!("the JSON schema does not parse: {e}"))),
        ("json", v @ (Value::Object(_) | Value::Bool(true))) => Ok(GrammarSpec::JsonSchema(v)),
        ("regex", Value::String(s)) if !s.is_empty() => Ok(GrammarSpec::Regex(s)),
        ("grammar", Value::String(s)) if !s.trim().is_empty() => Ok(GrammarSpec::Lark(s)),
        ("choice", Value::Array(a)) if !a.is_empty() => a
            .into_iter()
            .map(|c| match c {
                Value::String(s) if !s.is_empty() => Ok(s),
                other => Err(ApiError::param(
                    param,
                    format!(
                        "choices must be non-empty strings, not {}",
                        json_kind(&other)
                    ),
                )),
            })
            .collect::<Result<_, _>>()
            .map(GrammarSpec::Choice),
        (key, other) => Err(ApiError::param(
            param,
            format!(
                "{key} must be {}, not {}",
                match key {
                    "json" => "a JSON schema (an object, or JSON text)",
                    "choice" => "a non-empty list of strings",
                    _ => "a non-empty string",
                },
                json_kind(&other)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::params::param_of;
    use serde_json::json;

    fn parse(v: Value) -> Result<Option<GrammarSpec>, ApiError> {
        let mut p = Params::from_value(v).unwrap();
        Ok(parse_grammar(&mut p)?.map(|c| c.spec))
    }

    #[test]
    fn every_spelling_parses() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(parse(json!({})).unwrap(), None);
        assert_eq!(
            parse(json!({"response_format": {"type": "text"}})).unwrap(),
            None
        );
        assert_eq!(
            parse(json!({"response_format": {"type": "json_object"}})).unwrap(),
            Some(GrammarSpec::JsonObject)
        );
        assert_eq!(
            parse(json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "x", "schema": schema, "strict": true}}}))
            .unwrap(),
            Some(GrammarSpec::JsonSchema(schema.clone()))
        );
        assert_eq!(
            parse(json!({"structured_outputs": {"json": schema.to_string()}})).unwrap(),
            Some(GrammarSpec::JsonSchema(schema.clone()))
        );
        assert_eq!(
            parse(json!({"structured_outputs": {"regex": "[a-z]+"}})).unwrap(),
            Some(GrammarSpec::Regex("[a-z]+".into()))
        );
        assert_eq!(
            parse(json!({"guided_choice": ["yes", "no"]})).unwrap(),
            Some(GrammarSpec::Choice(vec!["yes".into(), "no".into()]))
        );
        assert_eq!(
            parse(json!({"guided_grammar": "start: \"a\""})).unwrap(),
            Some(GrammarSpec::Lark("start: \"a\"".into()))
        );
        assert_eq!(
            parse(json!({"structured_outputs": {"json_object": true}})).unwrap(),
            Some(GrammarSpec::JsonObject)
        );
    }

    #[test]
    fn bad_values_name_their_parameter() {
        for (body, param) in [
            (
                json!({"response_format": {"type": "yaml"}}),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}),
                "response_format",
            ),
            (
                json!({"structured_outputs": {"regex": ""}}),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"choice": []}}),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"choice": ["a", 1]}}),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"json": "{not json"}}),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"xml": "<a/>"}}),
                "structured_outputs",
            ),
            (json!({"structured_outputs": "json"}), "structured_outputs"),
            (json!({"guided_regex": 5}), "guided_regex"),
            (
                json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}),
                "guided_regex",
            ),
        ] {
            assert_eq!(param_of(parse(body.clone()).unwrap_err()), param, "{body}");
        }
    }
}
