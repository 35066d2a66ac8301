//! Streaming download against misbehaving local servers: each failure gives the right
//! typed error within the configured time.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use bytes::Bytes;
use futures::stream;
use lipsync_fetch::download::{DownloadError, DownloadLimits, Tee, TimeoutPhase, download_to};
use lipsync_fetch::guard::{ClientOptions, GuardedClient, UrlPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;

/// Generous bound on any single test download (the limits below are 300 ms - 1 s).
const BOUND: Duration = Duration::from_secs(10);

fn client() -> GuardedClient {
    UrlPolicy::permissive()
        .client(&ClientOptions {
            connect_timeout: Duration::from_millis(500),
            read_timeout: Duration::from_secs(5),
            total_timeout: None,
            max_redirects: 3,
        })
        .unwrap()
}

fn limits() -> DownloadLimits {
    DownloadLimits {
        max_bytes: 1 << 20,
        total_timeout: Duration::from_secs(1),
        read_timeout: Duration::from_millis(300),
    }
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 256) as u8).collect()
}

fn chunks_forever(size: usize, every: Duration) -> Body {
    let s = stream::unfold((), move |()| async move {
        if !every.is_zero() {
            tokio::time::sleep(every).await;
        }
        Some((Ok::<_, Infallible>(Bytes::from(vec![b'x'; size])), ()))
    });
    Body::from_stream(s)
}

async fn axum_server() -> SocketAddr {
    let app = Router::new()
        .route(
            "/ok",
            get(|| async { ([(header::CONTENT_TYPE, "video/mp4")], payload(300_000)) }),
        )
        .route(
            "/chunked",
            get(|| async {
                let chunks: Vec<Result<Bytes, Infallible>> = payload(300_000)
                    .chunks(10_000)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                Body::from_stream(stream::iter(chunks))
            }),
        )
        .route("/exact-cap", get(|| async { payload(1 << 20) }))
        .route("/404", get(|| async { StatusCode::NOT_FOUND }))
        .route(
            "/500",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
        )
        .route(
            "/hang-headers",
            get(|| async {
                std::future::pending::<()>().await;
                "never"
            }),
        )
        .route(
            "/hang-body",
            get(|| async {
                let first = stream::iter([Ok::<_, Infallible>(Bytes::from_static(b"first"))]);
                Body::from_stream(futures::StreamExt::chain(first, stream::pending()))
            }),
        )
        .route(
            "/forever-slow",
            get(|| async { chunks_forever(100, Duration::from_millis(20)) }),
        )
        .route(
            "/forever-fast",
            get(|| async { chunks_forever(64 * 1024, Duration::ZERO) }),
        )
        .route(
            "/redirect",
            get(|| async { (StatusCode::FOUND, [(header::LOCATION, "/ok")]).into_response() }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A raw HTTP/1.1 server that reads the request head, then writes `response` and
/// either closes (`hang = false`) or keeps the connection open without sending more.
async fn raw_server(response: Vec<u8>, hang: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let response = response.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = sock.write_all(&response).await;
                if hang {
                    // Hold the socket open until the client gives up.
                    let _ = sock.read(&mut buf).await;
                } else {
                    let _ = sock.shutdown().await;
                }
            });
        }
    });
    addr
}

async fn fetch(
    url: &str,
    limits: &DownloadLimits,
) -> (Result<u64, DownloadError>, Vec<u8>, Vec<(u64, Option<u64>)>) {
    let mut sink = Vec::new();
    let mut calls = Vec::new();
    let started = Instant::now();
    let r = download_to(&client(), url, limits, &mut sink, |done, total| {
        calls.push((done, total))
    })
    .await
    .map(|i| i.bytes);
    assert!(
        started.elapsed() < BOUND,
        "{url} took {:?}",
        started.elapsed()
    );
    (r, sink, calls)
}

#[tokio::test]
async fn downloads_with_content_length_and_reports_progress() {
    let addr = axum_server().await;
    let mut sink = Vec::new();
    let mut calls = Vec::new();
    let info = download_to(
        &client(),
        &format!("http://{addr}/ok"),
        &limits(),
        &mut sink,
        |d, t| calls.push((d, t)),
    )
    .await
    .unwrap();
    assert_eq!(sink, payload(300_000));
    assert_eq!(info.bytes, 300_000);
    assert_eq!(info.content_type.as_deref(), Some("video/mp4"));
    assert_eq!(info.final_url.path(), "/ok");
    assert!(!calls.is_empty());
    assert!(
        calls.windows(2).all(|w| w[0].0 < w[1].0),
        "progress must grow"
    );
    assert_eq!(calls.last().unwrap(), &(300_000, Some(300_000)));
}

#[tokio::test]
async fn downloads_chunked_without_length() {
    let addr = axum_server().await;
    let (r, sink, calls) = fetch(&format!("http://{addr}/chunked"), &limits()).await;
    assert_eq!(r.unwrap(), 300_000);
    assert_eq!(sink, payload(300_000));
    assert!(calls.iter().all(|(_, total)| total.is_none()));
}

#[tokio::test]
async fn exactly_max_bytes_is_accepted() {
    let addr = axum_server().await;
    let (r, sink, _) = fetch(&format!("http://{addr}/exact-cap"), &limits()).await;
    assert_eq!(r.unwrap(), 1 << 20);
    assert_eq!(sink.len(), 1 << 20);
}

#[tokio::test]
async fn follows_redirects_and_reports_final_url() {
    let addr = axum_server().await;
    let mut sink = Vec::new();
    let info = download_to(
        &client(),
        &format!("http://{addr}/redirect"),
        &limits(),
        &mut sink,
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(info.final_url.as_str(), format!("http://{addr}/ok"));
    assert_eq!(sink.len(), 300_000);
}

#[tokio::test]
async fn tee_writes_file_and_second_sink() {
    let addr = axum_server().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("body.bin");
    let file = tokio::fs::File::create(&path).await.unwrap();
    let (pipe_w, mut pipe_r) = tokio::io::duplex(8 * 1024);
    let reader = tokio::spawn(async move {
        let mut v = Vec::new();
        pipe_r.read_to_end(&mut v).await.unwrap();
        v
    });
    let mut tee = Tee::new(file, pipe_w);
    let info = download_to(
        &client(),
        &format!("http://{addr}/chunked"),
        &limits(),
        &mut tee,
        |_, _| {},
    )
    .await
    .unwrap();
    tee.shutdown().await.unwrap();
    drop(tee);
    assert_eq!(info.bytes, 300_000);
    assert_eq!(tokio::fs::read(&path).await.unwrap(), payload(300_000));
    assert_eq!(reader.await.unwrap(), payload(300_000));
}

#[tokio::test]
async fn status_404_and_500_are_download_failed() {
    let addr = axum_server().await;
    for (path, code, transient) in [("/404", 404, false), ("/500", 500, true)] {
        let (r, sink, _) = fetch(&format!("http://{addr}{path}"), &limits()).await;
        match r {
            Err(
                e @ DownloadError::DownloadFailed {
                    status: Some(s), ..
                },
            ) => {
                assert_eq!(s, code);
                assert_eq!(e.code(), "download_failed");
                assert_eq!(e.is_transient(), transient);
                assert!(e.to_string().contains(&code.to_string()), "{e}");
            }
            other => panic!("{path}: {other:?}"),
        }
        assert!(sink.is_empty());
    }
}

#[tokio::test]
async fn server_hanging_before_headers_times_out() {
    let addr = axum_server().await;
    let (r, _, _) = fetch(&format!("http://{addr}/hang-headers"), &limits()).await;
    match r {
        Err(e @ DownloadError::DownloadTimeout { .. }) => assert_eq!(e.code(), "download_timeout"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn server_hanging_mid_body_times_out() {
    let addr = axum_server().await;
    let (r, sink, _) = fetch(&format!("http://{addr}/hang-body"), &limits()).await;
    assert!(
        matches!(
            r,
            Err(DownloadError::DownloadTimeout {
                phase: TimeoutPhase::Body
            })
        ),
        "{r:?}"
    );
    assert_eq!(sink, b"first");
}

#[tokio::test]
async fn server_sending_forever_slowly_hits_total_timeout() {
    let addr = axum_server().await;
    let (r, sink, _) = fetch(&format!("http://{addr}/forever-slow"), &limits()).await;
    assert!(
        matches!(
            r,
            Err(DownloadError::DownloadTimeout {
                phase: TimeoutPhase::Total
            })
        ),
        "{r:?}"
    );
    assert!(!sink.is_empty());
}

#[tokio::test]
async fn server_sending_forever_fast_hits_max_bytes() {
    let addr = axum_server().await;
    let lim = DownloadLimits {
        total_timeout: Duration::from_secs(5),
        ..limits()
    };
    let (r, sink, calls) = fetch(&format!("http://{addr}/forever-fast"), &lim).await;
    match r {
        Err(
            e @ DownloadError::InputTooLarge {
                content_length: None,
                ..
            },
        ) => assert_eq!(e.code(), "input_too_large"),
        other => panic!("{other:?}"),
    }
    assert!(sink.len() as u64 <= lim.max_bytes);
    assert!(calls.iter().all(|(d, _)| *d <= lim.max_bytes));
}

#[tokio::test]
async fn content_length_over_cap_is_refused_before_the_body() {
    // Announces 10 GiB, sends a few bytes, then holds the connection open: the refusal
    // must come from the header, without reading (or waiting for) the body.
    let head =
        b"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nContent-Length: 10737418240\r\n\r\nabc";
    let addr = raw_server(head.to_vec(), true).await;
    let lim = DownloadLimits {
        total_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
        ..limits()
    };
    let started = Instant::now();
    let (r, sink, calls) = fetch(&format!("http://{addr}/big"), &lim).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "waited for the body"
    );
    match r {
        Err(DownloadError::InputTooLarge {
            content_length: Some(n),
            max_bytes,
        }) => {
            assert_eq!(n, 10_737_418_240);
            assert_eq!(max_bytes, lim.max_bytes);
        }
        other => panic!("{other:?}"),
    }
    assert!(sink.is_empty());
    assert!(calls.is_empty());
}

#[tokio::test]
async fn content_length_that_lies_is_an_error() {
    // Claims 1000 bytes, sends 100, closes.
    let mut resp = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n".to_vec();
    resp.extend_from_slice(&[b'y'; 100]);
    let addr = raw_server(resp, false).await;
    let (r, sink, _) = fetch(&format!("http://{addr}/lie"), &limits()).await;
    match r {
        Err(e @ DownloadError::DownloadFailed { status: None, .. }) => {
            assert_eq!(e.code(), "download_failed");
            assert!(e.is_transient());
        }
        other => panic!("{other:?}"),
    }
    assert!(sink.len() <= 100);
}

#[tokio::test]
async fn chunked_body_cut_short_is_an_error() {
    let resp =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n10\r\nabc".to_vec();
    let addr = raw_server(resp, false).await;
    let (r, _, _) = fetch(&format!("http://{addr}/cut"), &limits()).await;
    assert!(
        matches!(r, Err(DownloadError::DownloadFailed { status: None, .. })),
        "{r:?}"
    );
}

#[tokio::test]
async fn garbage_response_and_refused_connection_are_download_failed() {
    let addr = raw_server(b"this is not http\r\n\r\n".to_vec(), false).await;
    let (r, _, _) = fetch(&format!("http://{addr}/"), &limits()).await;
    assert!(
        matches!(r, Err(DownloadError::DownloadFailed { status: None, .. })),
        "{r:?}"
    );

    // A port nobody listens on.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let (r, _, _) = fetch(&format!("http://127.0.0.1:{port}/"), &limits()).await;
    match r {
        Err(e @ DownloadError::DownloadFailed { status: None, .. }) => {
            assert!(e.to_string().contains("connect"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn sink_errors_are_reported_as_sink() {
    let addr = axum_server().await;
    let (w, r) = tokio::io::duplex(1024);
    drop(r);
    let res = download_to(
        &client(),
        &format!("http://{addr}/ok"),
        &limits(),
        w,
        |_, _| {},
    )
    .await;
    match res {
        Err(e @ DownloadError::Sink(_)) => assert_eq!(e.code(), "internal"),
        other => panic!("{other:?}"),
    }
}
