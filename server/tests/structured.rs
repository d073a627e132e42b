//! Structured output through the router and the engine, on the tiny random Liger model: its
//! tokens are noise, so whatever is valid in its output comes from the grammar alone. Every
//! schema of a varied set, regexes, choices and Lark grammars, streamed and not, `n > 1`,
//! seeds, logprobs, stop strings, a constrained request beside a free one, and the 400s.

mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::{json, Value};

/// Checks `v` against the subset of JSON Schema the tests use; returns what is wrong.
fn violations(v: &Value, schema: &Value, at: &str, out: &mut Vec<String>) {
    let mut bad = |what: String| out.push(format!("{at}: {what}"));
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(v) {
            bad(format!("{v} not in {options:?}"));
        }
    }
    let Some(ty) = schema.get("type").and_then(Value::as_str) else {
        return;
    };
    match (ty, v) {
        ("object", Value::Object(m)) => {
            let props = schema["properties"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            for r in schema["required"].as_array().into_iter().flatten() {
                if !m.contains_key(r.as_str().unwrap()) {
                    bad(format!("missing required {r}"));
                }
            }
            for (k, x) in m {
                match props.get(k) {
                    Some(s) => violations(x, s, &format!("{at}.{k}"), out),
                    None if schema["additionalProperties"] == json!(false) => {
                        out.push(format!("{at}: unexpected key {k}"))
                    }
                    None => {}
                }
            }
        }
        ("array", Value::Array(a)) => {
            let n = a.len() as u64;
            if schema["minItems"].as_u64().is_some_and(|m| n < m)
                || schema["maxItems"].as_u64().is_some_and(|m| n > m)
            {
                bad(format!("{n} items"));
            }
            for (i, x) in a.iter().enumerate() {
                violations(x, &schema["items"], &format!("{at}[{i}]"), out);
            }
        }
        ("string", Value::String(s)) => {
            let n = s.chars().count() as u64;
            if schema["minLength"].as_u64().is_some_and(|m| n < m)
                || schema["maxLength"].as_u64().is_some_and(|m| n > m)
            {
                bad(format!("length {n}"));
            }
        }
        ("integer", Value::Number(x)) if x.is_i64() || x.is_u64() => {
            bounds(x.as_f64(), schema, &mut bad)
        }
        ("number", Value::Number(x)) => bounds(x.as_f64(), schema, &mut bad),
        ("boolean", Value::Bool(_)) | ("null", Value::Null) => {}
        (ty, v) => bad(format!("{v} is not of type {ty}")),
    }
}

fn bounds(x: Option<f64>, schema: &Value, bad: &mut impl FnMut(String)) {
    let x = x.unwrap();
    if schema["minimum"].as_f64().is_some_and(|m| x < m)
        || schema["maximum"].as_f64().is_some_and(|m| x > m)
    {
        bad(format!("{x} out of bounds"));
    }
}

fn assert_valid(text: &str, schema: &Value) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    let mut out = Vec::new();
    violations(&v, schema, "$", &mut out);
    assert!(out.is_empty(), "{text} violates the schema: {out:?}");
}

/// Nested objects, enums, arrays, bounded numbers, required and optional fields. Strings
/// are bounded so that a random model ends them, and numbers are integers: a fraction may
/// have any number of digits, which a random model can keep drawing until `max_tokens` (the
/// end-to-end test on the real model covers bounded fractions).
fn schemas() -> Vec<Value> {
    vec![
        json!({"type": "object", "additionalProperties": false, "required": ["name", "age"],
            "properties": {"name": {"type": "string", "maxLength": 8},
                           "age": {"type": "integer", "minimum": 0, "maximum": 120}}}),
        json!({"type": "object", "additionalProperties": false, "required": ["color", "tags"],
            "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]},
                           "tags": {"type": "array", "minItems": 1, "maxItems": 3,
                                    "items": {"type": "string", "maxLength": 4}},
                           "note": {"type": "string", "maxLength": 5}}}),
        json!({"type": "object", "additionalProperties": false, "required": ["point", "ok"],
            "properties": {"point": {"type": "object", "additionalProperties": false,
                                     "required": ["x", "y"],
                                     "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                                    "y": {"type": "integer", "minimum": 10, "maximum": 20}}},
                           "ok": {"type": "boolean"},
                           "none": {"type": "null"}}}),
        json!({"type": "array", "maxItems": 4,
            "items": {"type": "integer", "enum": [1, 2, 3]}}),
    ]
}

/// Room for the random model's whitespace (up to 21 characters between JSON tokens) after
/// a tools prompt (long in bytes: the tiny tokenizer has few merges).
fn long_context(a: &mut liger_server::settings::Args) {
    a.max_model_len = Some(2200);
}

fn schema_format(schema: &Value) -> Value {
    json!({"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": true}})
}

fn chat_body(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Answer in JSON."}],
        "max_tokens": 1000, "temperature": 1.0});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

#[tokio::test]
async fn every_schema_is_followed_whatever_the_model_says() {
    let s = server(long_context);
    for schema in schemas() {
        for seed in 0..4 {
            let body = chat_body(json!({"response_format": schema_format(&schema), "seed": seed}));
            let (status, resp) = post_json(&s.app, "/v1/chat/completions", body).await;
            assert_eq!(status, StatusCode::OK, "{resp}");
            let choice = &resp["choices"][0];
            assert_eq!(choice["finish_reason"], "stop", "{resp}");
            assert_valid(choice["message"]["content"].as_str().unwrap(), &schema);
        }
    }
}

#[tokio::test]
async fn streamed_n_choices_and_completions_follow_the_schema() {
    let s = server(long_context);
    let schema = &schemas()[1];
    let body = chat_body(json!({"response_format": schema_format(schema), "seed": 7, "n": 2}));
    let (status, whole) = post_json(&s.app, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let texts: Vec<&str> = (0..2)
        .map(|i| whole["choices"][i]["message"]["content"].as_str().unwrap())
        .collect();
    for t in &texts {
        assert_valid(t, schema);
    }
    assert_ne!(texts[0], texts[1], "two choices, two draws");

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (status, events) = post_stream(&s.app, "/v1/chat/completions", streamed).await;
    assert_eq!(status, StatusCode::OK);
    let mut got = [String::new(), String::new()];
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        for c in v["choices"].as_array().unwrap() {
            if let Some(t) = c["delta"]["content"].as_str() {
                got[c["index"].as_u64().unwrap() as usize].push_str(t);
            }
        }
    }
    assert_eq!([got[0].as_str(), got[1].as_str()], [texts[0], texts[1]]);

    let (status, resp) = post_json(
        &s.app,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "JSON:", "max_tokens": 1000, "seed": 3,
               "response_format": schema_format(schema), "logprobs": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let choice = &resp["choices"][0];
    assert_valid(choice["text"].as_str().unwrap(), schema);
    let tokens = choice["logprobs"]["tokens"].as_array().unwrap();
    assert_eq!(
        tokens.len() as u64,
        resp["usage"]["completion_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn regexes_choices_and_grammars() {
    let s = server(long_context);
    for seed in 0..3 {
        let body = chat_body(
            json!({"structured_outputs": {"regex": "[0-9]{3}-[a-c]{2,4}"}, "seed": seed}),
        );
        let (status, resp) = post_json(&s.app, "/v1/chat/completions", body).await;
        assert_eq!(status, StatusCode::OK, "{resp}");
        let t = resp["choices"][0]["message"]["content"].as_str().unwrap();
        let (digits, letters) = t.split_once('-').unwrap_or_else(|| panic!("{t:?}"));
        assert!(
            digits.len() == 3 && digits.chars().all(|c| c.is_ascii_digit()),
            "{t:?}"
        );
        assert!(
            (2..=4).contains(&letters.len()) && letters.chars().all(|c| ('a'..='c').contains(&c)),
            "{t:?}"
        );

        let choices = ["yes", "no", "it depends \"quoted\""];
        let body = chat_body(json!({"guided_choice": choices, "seed": seed}));
        let (status, resp) = post_json(&s.app, "/v1/chat/completions", body).await;
        assert_eq!(status, StatusCode::OK, "{resp}");
        let t = resp["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(choices.contains(&t), "{t:?}");
        assert_eq!(resp["choices"][0]["finish_reason"], "stop");

        let grammar =
            "start: greeting \" \" name\ngreeting: \"hi\" | \"hello\"\nname: /[A-Z][a-z]{1,5}/";
        let body = chat_body(json!({"structured_outputs": {"grammar": grammar}, "seed": seed}));
        let (status, resp) = post_json(&s.app, "/v1/chat/completions", body).await;
        assert_eq!(status, StatusCode::OK, "{resp}");
        let t = resp["choices"][0]["message"]["content"].as_str().unwrap();
        let (g, name) = t.split_once(' ').unwrap_or_else(|| panic!("{t:?}"));
        assert!(["hi", "hello"].contains(&g), "{t:?}");
        assert!(
            name.chars().next().unwrap().is_ascii_uppercase() && (2..=6).contains(&name.len()),
            "{t:?}"
        );
    }
}

#[tokio::test]
async fn constrained_and_free_requests_share_steps() {
    let s = server(long_context);
    let free = json!({"model": MODEL, "prompt": "Once", "max_tokens": 24, "seed": 11,
                      "temperature": 1.0, "ignore_eos": true});
    let (_, alone) = post_json(&s.app, "/v1/completions", free.clone()).await;
    let schema = &schemas()[0];
    let constrained = chat_body(json!({"response_format": schema_format(schema), "seed": 5}));
    // Submitted together, they run in the same engine steps.
    let (a, b) = tokio::join!(
        post_json(&s.app, "/v1/completions", free),
        post_json(&s.app, "/v1/chat/completions", constrained)
    );
    assert_eq!(
        a.1["choices"][0]["text"], alone["choices"][0]["text"],
        "the free one is unchanged"
    );
    assert_valid(
        b.1["choices"][0]["message"]["content"].as_str().unwrap(),
        schema,
    );
}

#[tokio::test]
async fn stop_strings_still_end_a_constrained_output() {
    let s = server(long_context);
    let body =
        chat_body(json!({"structured_outputs": {"regex": "ab(cd)+"}, "stop": ["cd"], "seed": 1}));
    let (status, resp) = post_json(&s.app, "/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["choices"][0]["message"]["content"], "ab");
    assert_eq!(resp["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn constraints_that_cannot_compile_are_400s_naming_the_field() {
    let s = server(long_context);
    for (extra, param, needle) in [
        (
            json!({"response_format": schema_format(&json!({"type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}))}),
            "response_format",
            "schema",
        ),
        (
            json!({"response_format": schema_format(&json!({"type": "integer", "minimum": 5, "maximum": 1}))}),
            "response_format",
            "schema",
        ),
        (
            json!({"structured_outputs": {"regex": "a(b"}}),
            "structured_outputs",
            "regular expression",
        ),
        (
            json!({"guided_grammar": "start: undefined_rule"}),
            "guided_grammar",
            "grammar",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "nope"}}}),
            "response_format",
            "object",
        ),
    ] {
        let (status, resp) =
            post_json(&s.app, "/v1/chat/completions", chat_body(extra.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}: {resp}");
        assert_eq!(resp["error"]["param"], param, "{resp}");
        let msg = resp["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{extra}: {msg}");
    }
    // The server is unharmed.
    let (status, _) = post_json(
        &s.app,
        "/v1/chat/completions",
        chat_body(json!({"max_tokens": 4})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
            "parameters": {"type": "object", "additionalProperties": false, "required": ["city", "unit"],
                "properties": {"city": {"type": "string", "maxLength": 6},
                               "unit": {"type": "string", "enum": ["C", "F"]}}}}},
        {"type": "function", "function": {"name": "get_time",
            "parameters": {"type": "object", "additionalProperties": false, "required": ["zone"],
                "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}}}}}
    ])
}

fn schema_of(name: &str) -> Value {
    weather_tools()
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["function"]["name"] == name)
        .unwrap()["function"]["parameters"]
        .clone()
}

#[tokio::test]
async fn required_and_named_tool_choices_give_valid_calls() {
    let s = server(long_context);
    for (choice, parallel) in [
        (json!("required"), true),
        (
            json!({"type": "function", "function": {"name": "get_time"}}),
            false,
        ),
    ] {
        for seed in 0..3 {
            let body = chat_body(json!({"tools": weather_tools(), "tool_choice": choice,
                                        "parallel_tool_calls": parallel, "seed": seed}));
            let (status, resp) = post_json(&s.app, "/v1/chat/completions", body).await;
            assert_eq!(status, StatusCode::OK, "{resp}");
            let choice0 = &resp["choices"][0];
            assert_eq!(choice0["finish_reason"], "tool_calls", "{resp}");
            assert!(choice0["message"]["content"].is_null(), "{resp}");
            let calls = choice0["message"]["tool_calls"].as_array().unwrap();
            assert!(
                !calls.is_empty() && (parallel || calls.len() == 1),
                "{resp}"
            );
            for c in calls {
                assert!(c["id"].as_str().unwrap().starts_with("call_"));
                assert_eq!(c["type"], "function");
                let name = c["function"]["name"].as_str().unwrap();
                if !parallel {
                    assert_eq!(name, "get_time");
                }
                assert_valid(
                    c["function"]["arguments"].as_str().unwrap(),
                    &schema_of(name),
                );
            }
        }
    }
}

#[tokio::test]
async fn tool_calls_stream_as_indexed_deltas_and_the_next_turn_is_accepted() {
    let s = server(long_context);
    let body = chat_body(json!({"tools": weather_tools(), "tool_choice": "required", "seed": 4}));
    let (_, whole) = post_json(&s.app, "/v1/chat/completions", body.clone()).await;
    let calls = whole["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap()
        .clone();

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (status, events) = post_stream(&s.app, "/v1/chat/completions", streamed).await;
    assert_eq!(status, StatusCode::OK);
    let mut got: Vec<Value> = Vec::new();
    let mut finish = None;
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        let c = &v["choices"][0];
        for d in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            assert_eq!(d["index"].as_u64().unwrap() as usize, got.len(), "{d}");
            got.push(d.clone());
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    let strip = |c: &Value| {
        (
            c["function"]["name"].clone(),
            c["function"]["arguments"].clone(),
        )
    };
    assert_eq!(
        got.iter().map(strip).collect::<Vec<_>>(),
        calls.iter().map(strip).collect::<Vec<_>>()
    );

    // The calls and their results go back in the next turn.
    let mut next = json!({"model": MODEL, "max_tokens": 8, "tools": weather_tools(), "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": calls},
    ]});
    for c in &calls {
        next["messages"]
            .as_array_mut()
            .unwrap()
            .push(json!({"role": "tool", "tool_call_id": c["id"], "content": "22 degrees"}));
    }
    let (status, resp) = post_json(&s.app, "/v1/chat/completions", next).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let (status, resp) = post_json(
        &s.app,
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{resp}");
    assert_eq!(resp["error"]["param"], "messages[0].tool_call_id");
}
