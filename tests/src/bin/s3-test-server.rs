//! `lipsync-s3-test-server`: a real S3-compatible server for the S3 artifact backend's
//! tests (tests/README.md says why it is trusted and what it lacks).
//!
//! It serves the objects of `--root` (one folder per bucket) with the `s3s` protocol
//! layer and the `s3s-fs` file-system backend: path-style requests, every request
//! checked against the one SigV4 key pair given, plain HTTP on loopback.
//!
//! ```text
//! lipsync-s3-test-server --root DIR --listen 127.0.0.1:PORT --bucket NAME [--bucket NAME]
//!     credentials: --access-key/--secret-key, or LIPSYNC_S3_TEST_ACCESS_KEY and
//!     LIPSYNC_S3_TEST_SECRET_KEY (preferred: arguments are visible to every local user)
//!     log filter: LIPSYNC_S3_TEST_LOG (default "warn"), on stderr
//! ```
//!
//! Once it accepts connections it prints one line, `listening on http://ADDR`, on
//! stdout. Neither the secret nor the access key is ever printed.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use hyper_util::rt::TokioIo;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

#[derive(Parser)]
#[command(about = "A loopback S3-compatible server (s3s + s3s-fs) for tests")]
struct Args {
    /// Folder of the stored objects; created if missing.
    #[arg(long)]
    root: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Access key id every request must be signed with.
    #[arg(long, env = "LIPSYNC_S3_TEST_ACCESS_KEY", hide_env_values = true)]
    access_key: String,
    /// Secret access key of `--access-key`.
    #[arg(long, env = "LIPSYNC_S3_TEST_SECRET_KEY", hide_env_values = true)]
    secret_key: String,
    /// A bucket to create (a folder under the root); repeatable.
    #[arg(long = "bucket")]
    buckets: Vec<String>,
}

// Only the field names: the derived form would show the key pair.
impl std::fmt::Debug for Args {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Args")
            .field("root", &self.root)
            .field("listen", &self.listen)
            .field("buckets", &self.buckets)
            .finish_non_exhaustive()
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.access_key.is_empty() || args.secret_key.is_empty() {
        bail!("an access key and a secret key are required");
    }
    let filter = std::env::var("LIPSYNC_S3_TEST_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(args))
}

async fn serve(args: Args) -> Result<()> {
    std::fs::create_dir_all(&args.root)
        .with_context(|| format!("creating {}", args.root.display()))?;
    for b in &args.buckets {
        if b.is_empty() || b.contains(['/', '\\']) || b.starts_with('.') {
            bail!("bad bucket name {b:?}");
        }
        let dir = args.root.join(b);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let backend = s3s_fs::FileSystem::new(&args.root)
        .map_err(|e| anyhow::anyhow!("opening {}: {e:?}", args.root.display()))?;
    let service = {
        let mut b = S3ServiceBuilder::new(backend);
        b.set_auth(SimpleAuth::from_single(
            args.access_key.clone(),
            args.secret_key.clone(),
        ));
        b.build()
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!("listening on http://{}", listener.local_addr()?);
    loop {
        let (socket, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let service = service.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}
