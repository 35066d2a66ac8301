//! SSRF guard, end to end through reqwest: every forbidden target is refused with
//! `url_not_allowed` before any connection reaches it (requests sent through a
//! [`GuardedClient`]; the fetch stage's `download_to` maps the same errors).
//!
//! "No connection" is proven with a tripwire: a TCP listener on 127.0.0.1 (and [::1])
//! that records every accepted peer. After the requests, the test makes one sentinel
//! connection of its own; connections are accepted in order, so if the first peer the
//! tripwire reports is the sentinel, nothing else connected before it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Query;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use lipsync_netguard::{
    ClientOptions, GuardError, GuardedClient, GuardedResolver, UrlPolicy, forbidden_reason,
    is_forbidden,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};

struct Tripwire {
    v4: SocketAddr,
    v6: Option<SocketAddr>,
    rx: Mutex<mpsc::UnboundedReceiver<(SocketAddr, SocketAddr)>>,
}

impl Tripwire {
    async fn start() -> Tripwire {
        let (tx, rx) = mpsc::unbounded_channel();
        let l4 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let v4 = l4.local_addr().unwrap();
        // Same port on ::1 when free, else any port.
        let l6 = match TcpListener::bind(("::1", v4.port())).await {
            Ok(l) => Some(l),
            Err(_) => TcpListener::bind("[::1]:0").await.ok(),
        };
        let v6 = l6.as_ref().map(|l| l.local_addr().unwrap());
        for l in std::iter::once(l4).chain(l6) {
            let tx = tx.clone();
            let local = l.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((stream, peer)) = l.accept().await {
                    let _ = tx.send((local, peer));
                    drop(stream);
                }
            });
        }
        Tripwire {
            v4,
            v6,
            rx: Mutex::new(rx),
        }
    }

    /// Connections that reached the tripwire (on either listener) since the last call.
    async fn connections_so_far(&self) -> usize {
        let mut rx = self.rx.lock().await;
        let mut count = 0;
        for listener in std::iter::once(self.v4).chain(self.v6) {
            let sentinel = TcpStream::connect(listener).await.unwrap();
            let me = sentinel.local_addr().unwrap();
            loop {
                let (at, peer) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .expect("tripwire accept loop stalled")
                    .expect("tripwire closed");
                if at == listener && peer == me {
                    break;
                }
                count += 1;
            }
        }
        count
    }
}

fn short_opts() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_millis(500),
        read_timeout: Duration::from_millis(500),
        total_timeout: None,
        max_redirects: 3,
    }
}

/// What a guarded GET ended with.
#[derive(Debug)]
enum Outcome {
    /// Refused by the guard (before or during the request).
    Refused(GuardError),
    /// Another failure (connection refused, reset, timeout...), with its message.
    Failed(#[allow(dead_code)] String),
    /// A response: final URL, content type, body.
    Body(url::Url, Option<String>, Vec<u8>),
}

/// GET `url` through the guarded client; the guard's error is looked up in reqwest's
/// source chain as the fetch stage does.
async fn fetch(client: &GuardedClient, url: &str) -> Outcome {
    let req = match client.get(url) {
        Ok(r) => r,
        Err(e) => return Outcome::Refused(e),
    };
    let map = |e: reqwest::Error| match GuardError::find_in(&e) {
        Some(g) => Outcome::Refused(g.clone()),
        None => Outcome::Failed(e.to_string()),
    };
    let resp = match tokio::time::timeout(Duration::from_secs(3), req.send()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return map(e),
        Err(_) => return Outcome::Failed("timeout".into()),
    };
    let final_url = resp.url().clone();
    // reqwest hands back a redirect it will not follow (another scheme): vet its target
    // as the fetch stage does.
    if resp.status().is_redirection()
        && let Some(loc) = resp.headers().get(header::LOCATION)
    {
        let target = final_url
            .join(loc.to_str().unwrap_or(""))
            .map(|u| u.to_string())
            .unwrap_or_default();
        return match client.check_url(&target) {
            Err(e) => Outcome::Refused(e),
            Ok(_) => Outcome::Failed(format!("unfollowed redirect to {target}")),
        };
    }
    let ct = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match resp.bytes().await {
        Ok(b) => Outcome::Body(final_url, ct, b.to_vec()),
        Err(e) => map(e),
    }
}

/// Every bad target, pointed at the tripwire's port where a port makes sense.
fn bad_urls(t: &Tripwire) -> Vec<String> {
    let p = t.v4.port();
    let p6 = t.v6.map_or(p, |a| a.port());
    vec![
        "file:///etc/passwd".into(),
        format!("ftp://127.0.0.1:{p}/x"),
        format!("gopher://127.0.0.1:{p}/_x"),
        format!("dict://127.0.0.1:{p}/x"),
        format!("http://127.0.0.1:{p}/{}", "a".repeat(4096)),
        format!("http://user:pass@127.0.0.1:{p}/"),
        "http://user:pass@93.184.216.34/".into(),
        "http://user@93.184.216.34/".into(),
        format!("http://127.0.0.1:{p}/"),
        format!("http://127.1:{p}/"),
        format!("http://2130706433:{p}/"),
        format!("http://0x7f000001:{p}/"),
        format!("http://0x7f.0.0.1:{p}/"),
        format!("http://0177.0.0.1:{p}/"),
        format!("http://[::1]:{p6}/"),
        format!("http://[::ffff:127.0.0.1]:{p}/"),
        format!("http://[::ffff:7f00:1]:{p}/"),
        format!("http://0.0.0.0:{p}/"),
        format!("http://0:{p}/"),
        format!("http://[::]:{p}/"),
        format!("http://localhost:{p}/"),
        format!("http://LOCALHOST:{p}/"),
        format!("http://10.0.0.1:{p}/"),
        format!("http://172.16.0.1:{p}/"),
        format!("http://192.168.1.1:{p}/"),
        format!("http://169.254.169.254:{p}/latest/meta-data/"),
        format!("http://100.64.0.1:{p}/"),
        format!("http://[fe80::1]:{p}/"),
        format!("http://[fd00::1]:{p}/"),
        format!("http://[64:ff9b::7f00:1]:{p}/"),
        format!("http://[2002:7f00:1::]:{p}/"),
        format!("http://224.0.0.1:{p}/"),
        format!("http://255.255.255.255:{p}/"),
    ]
}

fn no_scheme_urls(t: &Tripwire) -> Vec<String> {
    let p = t.v4.port();
    vec![
        format!("127.0.0.1:{p}/x"),
        "//127.0.0.1/x".into(),
        "example.com/video.mp4".into(),
        format!("localhost:{p}"),
        String::new(),
        "http://".into(),
    ]
}

fn assert_not_allowed(url: &str, r: Outcome) {
    match r {
        Outcome::Refused(e) => {
            assert_eq!(e.code(), "url_not_allowed", "{url}: {e}");
            assert!(e.is_policy_refusal(), "{url}");
        }
        other => panic!("{url}: expected a policy refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_urls_are_refused_before_any_connection() {
    let trip = Tripwire::start().await;
    let policy = UrlPolicy::default();
    let client = policy.client(&short_opts()).unwrap();
    for url in bad_urls(&trip) {
        // The static check alone refuses everything but host names.
        let checked = policy.check_url(&url);
        if !url.contains("localhost") && !url.contains("LOCALHOST") {
            let err = checked.expect_err(&url);
            assert_eq!(err.code(), "url_not_allowed", "{url}: {err}");
        }
        assert_not_allowed(&url, fetch(&client, &url).await);
    }
    // The host-name case is refused by the resolver, through reqwest's error chain, and
    // the message does not show the address the name resolved to.
    let any_port = UrlPolicy {
        allowed_ports: Vec::new(),
        ..UrlPolicy::default()
    }
    .client(&short_opts())
    .unwrap();
    let url = format!("http://localhost:{}/", trip.v4.port());
    match fetch(&any_port, &url).await {
        Outcome::Refused(e @ GuardError::AddressNotAllowed { .. }) => {
            let GuardError::AddressNotAllowed {
                host, ip, resolved, ..
            } = &e
            else {
                unreachable!()
            };
            assert_eq!(host, "localhost");
            assert!(ip.is_loopback());
            assert!(resolved);
            let msg = e.to_string();
            assert!(!msg.contains("127.0.0.1") && !msg.contains("::1"), "{msg}");
        }
        other => panic!("{url}: {other:?}"),
    }
    for url in no_scheme_urls(&trip) {
        assert_not_allowed(&url, fetch(&client, &url).await);
    }
    assert_eq!(trip.connections_so_far().await, 0);
}

#[tokio::test]
async fn tripwire_detects_a_real_connection() {
    // Control for the test above: with private networks allowed, the same client does
    // reach the tripwire, and the tripwire counts it.
    let trip = Tripwire::start().await;
    let client = UrlPolicy::permissive().client(&short_opts()).unwrap();
    let url = format!("http://127.0.0.1:{}/", trip.v4.port());
    let r = fetch(&client, &url).await;
    assert!(matches!(r, Outcome::Failed(_)), "{r:?}");
    assert_eq!(trip.connections_so_far().await, 1);
    assert_eq!(trip.connections_so_far().await, 0);
}

#[tokio::test]
async fn hostname_resolving_to_loopback_is_refused_by_the_resolver() {
    let strict = GuardedResolver::new(Arc::new(UrlPolicy::default()));
    match strict.resolve_host("localhost").await {
        Err(GuardError::AddressNotAllowed {
            ip, host, resolved, ..
        }) => {
            assert!(ip.is_loopback());
            assert_eq!(host, "localhost");
            assert!(resolved);
        }
        other => panic!("expected AddressNotAllowed, got {other:?}"),
    }
    // The URL check itself lets host names through; the resolver is the gate.
    assert!(UrlPolicy::default().check_url("http://localhost/").is_ok());

    let open = GuardedResolver::new(Arc::new(UrlPolicy::permissive()));
    let addrs = open.resolve_host("localhost").await.unwrap();
    assert!(addrs.iter().any(|a| a.ip().is_loopback()));

    // allow_cidrs opens exactly the listed network.
    let v4_only = GuardedResolver::new(Arc::new(UrlPolicy {
        allow_cidrs: vec!["127.0.0.0/8".parse().unwrap()],
        ..UrlPolicy::default()
    }));
    let addrs = v4_only.resolve_host("localhost").await.unwrap();
    assert!(!addrs.is_empty());
    assert!(addrs.iter().all(|a| a.ip().is_ipv4()));
}

#[test]
fn public_addresses_are_classified_allowed() {
    let policy = UrlPolicy::default();
    for url in [
        "http://93.184.216.34/video.mp4",
        "https://93.184.216.34:443/a",
        "http://[2606:2800::1]/a.mp4",
        "https://[2606:2800:220:1:248:1893:25c8:1946]/",
        "https://example.com/video.mp4",
        "http://[::ffff:93.184.216.34]/",
    ] {
        let u = policy
            .check_url(url)
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert!(u.scheme() == "http" || u.scheme() == "https");
    }
    for ip in ["93.184.216.34", "2606:2800::1", "8.8.8.8"] {
        let ip: IpAddr = ip.parse().unwrap();
        assert!(!is_forbidden(ip), "{ip}");
        assert_eq!(forbidden_reason(ip), None);
    }
    assert_eq!(
        forbidden_reason("169.254.169.254".parse().unwrap()),
        Some("link-local / cloud metadata")
    );
}

#[test]
fn url_normalisation_is_classified() {
    // The url crate normalises the odd spellings; make sure they land on the address.
    let policy = UrlPolicy::default();
    for (raw, ip) in [
        ("http://2130706433/", "127.0.0.1"),
        ("http://0x7f000001/", "127.0.0.1"),
        ("http://127.1/", "127.0.0.1"),
        ("http://0177.0.0.1/", "127.0.0.1"),
        ("http://[::ffff:127.0.0.1]/", "::ffff:127.0.0.1"),
        ("http://0/", "0.0.0.0"),
    ] {
        match policy.check_url(raw) {
            Err(GuardError::AddressNotAllowed { ip: got, .. }) => {
                assert_eq!(got, ip.parse::<IpAddr>().unwrap(), "{raw}")
            }
            other => panic!("{raw}: {other:?}"),
        }
    }
    assert!(matches!(
        policy.check_url(&format!("http://example.com/{}", "a".repeat(4096))),
        Err(GuardError::UrlTooLong { .. })
    ));
    assert!(matches!(
        policy.check_url("HTTP://user:@example.com/"),
        Err(GuardError::UserinfoNotAllowed)
    ));
    let https_only = UrlPolicy {
        allowed_schemes: vec!["https".into()],
        ..UrlPolicy::default()
    };
    assert!(matches!(
        https_only.check_url("http://example.com/"),
        Err(GuardError::SchemeNotAllowed { .. })
    ));
    // allowed_schemes can never widen beyond http/https.
    let wide = UrlPolicy {
        allowed_schemes: vec!["file".into(), "ftp".into(), "http".into()],
        ..UrlPolicy::default()
    };
    assert!(matches!(
        wide.check_url("file:///etc/passwd"),
        Err(GuardError::SchemeNotAllowed { .. })
    ));
}

// ---------------------------------------------------------------------------------
// Redirects: the first hop is an allowed server on 127.0.0.2 (opened via allow_cidrs),
// the second hop points at a forbidden target.

#[derive(serde::Deserialize)]
struct To {
    to: String,
}

async fn start_redirector() -> SocketAddr {
    let app = Router::new()
        .route(
            "/ok",
            get(|| async { ([(header::CONTENT_TYPE, "video/mp4")], "hello") }),
        )
        .route(
            "/redirect",
            get(|Query(q): Query<To>| async move {
                let mut h = HeaderMap::new();
                h.insert(header::LOCATION, q.to.parse().unwrap());
                (StatusCode::FOUND, h).into_response()
            }),
        )
        .route(
            "/long-hop",
            get(|h: HeaderMap| async move {
                let host = h.get(header::HOST).unwrap().to_str().unwrap().to_string();
                let to = format!("http://{host}/ok?{}", "a".repeat(4096));
                (StatusCode::FOUND, [(header::LOCATION, to)]).into_response()
            }),
        )
        .route(
            "/loop",
            get(|| async { (StatusCode::FOUND, [(header::LOCATION, "/loop")]).into_response() }),
        );
    let listener = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn redirect_url(server: SocketAddr, to: &str) -> String {
    let mut u = url::Url::parse(&format!("http://{server}/redirect")).unwrap();
    u.query_pairs_mut().append_pair("to", to);
    u.to_string()
}

fn first_hop_policy() -> UrlPolicy {
    UrlPolicy {
        allow_cidrs: vec!["127.0.0.2/32".parse().unwrap()],
        // The test servers listen on random ports.
        allowed_ports: Vec::new(),
        ..UrlPolicy::default()
    }
}

#[tokio::test]
async fn redirects_to_forbidden_targets_are_refused() {
    let trip = Tripwire::start().await;
    let server = start_redirector().await;
    let client = first_hop_policy().client(&short_opts()).unwrap();

    // Control: the first hop is allowed, and an allowed redirect is followed.
    match fetch(
        &client,
        &redirect_url(server, &format!("http://{server}/ok")),
    )
    .await
    {
        Outcome::Body(final_url, ct, body) => {
            assert_eq!(body, b"hello");
            assert_eq!(final_url.as_str(), format!("http://{server}/ok"));
            assert_eq!(ct.as_deref(), Some("video/mp4"));
        }
        other => panic!("{other:?}"),
    }

    // 127.0.0.1 is not in allow_cidrs: refused even though 127.0.0.2 is open.
    let mut targets: Vec<String> = bad_urls(&trip)
        .into_iter()
        // A 4 KB Location is refused by the length check like the others, but keep the
        // request URL itself under the limit by testing it with a shorter policy below.
        .filter(|u| u.len() < 1500)
        .collect();
    targets.push(format!("http://localhost:{}/", trip.v4.port()));
    let via_resolver = redirect_url(server, &format!("http://localhost:{}/", trip.v4.port()));
    match fetch(&client, &via_resolver).await {
        Outcome::Refused(GuardError::AddressNotAllowed { host, .. }) => {
            assert_eq!(host, "localhost")
        }
        other => panic!("redirect to localhost: {other:?}"),
    }
    for target in &targets {
        let url = redirect_url(server, target);
        assert_not_allowed(target, fetch(&client, &url).await);
    }

    // An over-long hop: the request URL is short, the Location is over 4 KB.
    let r = fetch(&client, &format!("http://{server}/long-hop")).await;
    assert_not_allowed("4 KB redirect hop", r);

    // A hop to a port outside the allow-list is refused too.
    let strict_ports = UrlPolicy {
        allowed_ports: vec![80, 443, server.port()],
        ..first_hop_policy()
    }
    .client(&short_opts())
    .unwrap();
    let r = fetch(
        &strict_ports,
        &redirect_url(server, "http://127.0.0.2:6379/"),
    )
    .await;
    match r {
        Outcome::Refused(GuardError::PortNotAllowed { port: 6379, .. }) => {}
        other => panic!("redirect to port 6379: {other:?}"),
    }

    assert_eq!(trip.connections_so_far().await, 0);
}

#[tokio::test]
async fn redirect_hops_are_capped() {
    let server = start_redirector().await;
    let client = first_hop_policy().client(&short_opts()).unwrap();
    match fetch(&client, &format!("http://{server}/loop")).await {
        Outcome::Refused(e @ GuardError::TooManyRedirects { .. }) => {
            assert!(e.to_string().contains("too many redirects"), "{e}");
            assert_eq!(e.code(), "download_failed");
        }
        other => panic!("expected TooManyRedirects, got {other:?}"),
    }
}

#[tokio::test]
async fn guarded_client_request_builders_check_the_first_url() {
    let client = UrlPolicy::default().client(&short_opts()).unwrap();
    assert!(client.get("http://127.0.0.1/").is_err());
    assert!(client.post("http://169.254.169.254/").is_err());
    assert!(client.get("https://example.com/").is_ok());
    assert_eq!(client.options().max_redirects, 3);
    assert!(!client.policy().allow_private_networks);
}

#[tokio::test]
async fn user_agent_is_sent() {
    let app = Router::new().route(
        "/ua",
        get(|h: HeaderMap| async move {
            h.get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = UrlPolicy::permissive().client(&short_opts()).unwrap();
    match fetch(&client, &format!("http://{addr}/ua")).await {
        Outcome::Body(_, _, body) => {
            assert!(String::from_utf8(body).unwrap().starts_with("lipsync/"))
        }
        other => panic!("{other:?}"),
    }
}
