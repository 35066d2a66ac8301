//! The CLI against a small scripted HTTP stand-in (no gateway): retries of 429/503 that
//! honour `Retry-After`, the retry limit, auth failures' exit code, and `ls` following
//! `next_cursor` across pages. The end-to-end tests against the real gateway are in
//! tests/tests/client.rs.

use std::sync::{Arc, Mutex};

use lipsync_client::{Cli, ClientError, EXIT_AUTH, EXIT_OK};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One scripted answer: status, extra headers, JSON body.
struct Answer {
    status: u16,
    headers: Vec<(&'static str, &'static str)>,
    body: String,
}

fn answer(status: u16, headers: &[(&'static str, &'static str)], body: &str) -> Answer {
    Answer {
        status,
        headers: headers.to_vec(),
        body: body.to_owned(),
    }
}

/// Serves `script` in order, one answer per connection (`Connection: close`), and records
/// each request's first line. Returns the base URL and the request log.
async fn standin(script: Vec<Answer>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    tokio::spawn(async move {
        for a in script {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Headers, then the body by Content-Length.
            let head_end = loop {
                let n = sock.read(&mut chunk).await.unwrap();
                assert!(n > 0, "client closed early");
                buf.extend_from_slice(&chunk[..n]);
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break p + 4;
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            while buf.len() < head_end + len {
                let n = sock.read(&mut chunk).await.unwrap();
                assert!(n > 0, "client closed mid-body");
                buf.extend_from_slice(&chunk[..n]);
            }
            seen.lock()
                .unwrap()
                .push(head.lines().next().unwrap_or_default().to_owned());
            let mut resp = format!(
                "HTTP/1.1 {} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
                a.status,
                a.body.len()
            );
            for (k, v) in &a.headers {
                resp.push_str(&format!("{k}: {v}\r\n"));
            }
            resp.push_str("\r\n");
            resp.push_str(&a.body);
            sock.write_all(resp.as_bytes()).await.unwrap();
            let _ = sock.shutdown().await;
        }
    });
    (format!("http://{addr}"), log)
}

async fn cli(server: &str, args: &[&str]) -> (Result<i32, ClientError>, String) {
    let mut argv = vec!["lipsync", "--server", server, "--quiet"];
    argv.extend_from_slice(args);
    let mut out = Vec::new();
    let res = lipsync_client::run(Cli::try_from_args(argv).unwrap(), &mut out).await;
    (res, String::from_utf8(out).unwrap())
}

const QUEUE_FULL: &str = r#"{"error":{"code":"queue_full","message":"the work queue is full"}}"#;
const ACCEPTED: &str = r#"{"task_id":"t-1","queue_position":0,"status":"queued"}"#;

#[tokio::test]
async fn submit_retries_503_and_429_honouring_retry_after() {
    let (server, log) = standin(vec![
        answer(503, &[("retry-after", "0")], QUEUE_FULL),
        answer(
            429,
            &[("retry-after", "0")],
            r#"{"error":{"code":"rate_limited","message":"slow down"}}"#,
        ),
        answer(200, &[], ACCEPTED),
    ])
    .await;
    let (res, out) = cli(
        &server,
        &[
            "submit",
            "--video",
            "https://example.com/v.mp4",
            "--audio",
            "https://example.com/a.wav",
        ],
    )
    .await;
    assert_eq!(res.unwrap(), EXIT_OK);
    assert_eq!(out.trim(), "t-1", "-q prints the id only");
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec!["POST /sync HTTP/1.1"; 3],
        "two refusals, then accepted"
    );
}

#[tokio::test]
async fn retries_stop_at_the_limit_with_the_servers_error() {
    let (server, log) = standin(vec![
        answer(503, &[("retry-after", "0")], QUEUE_FULL),
        answer(503, &[("retry-after", "0")], QUEUE_FULL),
    ])
    .await;
    let (res, _) = cli(
        &server,
        &[
            "--retries",
            "1",
            "submit",
            "--video",
            "https://example.com/v.mp4",
            "--audio",
            "https://example.com/a.wav",
        ],
    )
    .await;
    match res.unwrap_err() {
        ClientError::Api { status, code, .. } => {
            assert_eq!((status, code.as_str()), (503, "queue_full"))
        }
        e => panic!("unexpected {e}"),
    }
    assert_eq!(log.lock().unwrap().len(), 2, "one try and one retry");
}

#[tokio::test]
async fn an_unauthorized_key_exits_with_the_auth_code_and_is_not_retried() {
    let (server, log) = standin(vec![answer(
        401,
        &[],
        r#"{"error":{"code":"unauthorized","message":"missing or wrong API key"}}"#,
    )])
    .await;
    let (res, _) = cli(&server, &["ls"]).await;
    let e = res.unwrap_err();
    assert_eq!(e.exit_code(), EXIT_AUTH, "{e}");
    assert_eq!(log.lock().unwrap().len(), 1);
}

fn task(id: &str, status: &str) -> String {
    format!(
        r#"{{"task_id":"{id}","status":"{status}","progress":0.5,"message":"m","created_at":"2026-01-01T00:00:00Z"}}"#
    )
}

#[tokio::test]
async fn ls_all_follows_next_cursor_to_the_last_page() {
    let page1 = format!(
        r#"{{"tasks":[{},{}],"next_cursor":"c2"}}"#,
        task("t-3", "processing"),
        task("t-2", "queued")
    );
    let page2 = format!(
        r#"{{"tasks":[{}],"next_cursor":null}}"#,
        task("t-1", "completed")
    );
    let (server, log) = standin(vec![answer(200, &[], &page1), answer(200, &[], &page2)]).await;
    let (res, out) = cli(&server, &["ls", "--all", "--limit", "2"]).await;
    assert_eq!(res.unwrap(), EXIT_OK);
    assert_eq!(out, "t-3\nt-2\nt-1\n");
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            "GET /tasks?limit=2 HTTP/1.1",
            "GET /tasks?limit=2&cursor=c2 HTTP/1.1"
        ]
    );
}

#[tokio::test]
async fn ls_one_page_shows_a_table_and_the_next_cursor() {
    let page = format!(
        r#"{{"tasks":[{}],"next_cursor":"abc"}}"#,
        task("t-9", "queued")
    );
    let (server, _) = standin(vec![answer(200, &[], &page)]).await;
    let argv = ["lipsync", "--server", server.as_str(), "ls"];
    let mut out = Vec::new();
    let code = lipsync_client::run(Cli::try_from_args(argv).unwrap(), &mut out)
        .await
        .unwrap();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(code, EXIT_OK);
    assert!(out.starts_with("TASK"), "{out}");
    assert!(out.contains("t-9"), "{out}");
    assert!(out.contains("queued"), "{out}");
    assert!(out.contains("more: lipsync ls --cursor abc"), "{out}");
}
