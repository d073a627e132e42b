//! The whole server over TCP: bind first, load in the background, then serve; and a load
//! failure ends `serve` with a clear error.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A minimal HTTP/1.1 client: returns the status code and the body.
async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

#[tokio::test]
async fn serves_after_loading_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(liger_server::serve(settings(dir.path(), |_| {}), listener));
    let mut ready = false;
    for _ in 0..500 {
        let (status, _) = http(addr, "GET", "/health", "").await;
        assert!(
            status == 200 || status == 503,
            "health is 503 while loading, then 200"
        );
        if status == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ready, "the server never became ready");
    let (status, body) = http(
        addr,
        "POST",
        "/v1/completions",
        r#"{"prompt": "the", "max_tokens": 3}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["model"], MODEL);
    task.abort();
}

#[tokio::test]
async fn a_load_failure_ends_serve_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path());
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = liger_server::serve(settings(dir.path(), |_| {}), listener)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("tokenizer.json"), "{err:#}");
}
