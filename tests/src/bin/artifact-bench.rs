//! Artifact throughput of the two storage backends, side by side in one run: the traffic
//! one task makes from fetch to mux, on the JetStream object store of a local nats-server
//! and on a local S3-compatible server (`lipsync-s3-test-server`), both on this machine's
//! disk. Run by `bench/storage.sh` (`make bench`).
//!
//! One round per backend, for an input of `--mb` MiB:
//! - fetch stores the input (a streamed put),
//! - face and mux each read it whole (two gets),
//! - mux stores the result (a put of the same size),
//! - a player seeks in the result (`--ranges` ranged reads of 1 MiB at spread offsets).
//!
//! Printed per backend: MB/s of puts and gets, the fetch-to-mux total (all four whole
//! transfers) in seconds and MB/s, milliseconds per ranged read, and the growth of this
//! process's peak RSS during the round.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use lipsync_runtime::ArtifactStore;
use lipsync_tests::NatsServer;
use lipsync_tests::s3::S3Server;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

#[derive(Parser)]
struct Args {
    /// Size of the input (and of the result) in MiB.
    #[arg(long, default_value_t = 512)]
    mb: u64,
    /// Ranged reads of 1 MiB in the result.
    #[arg(long, default_value_t = 32)]
    ranges: u64,
}

/// `left` bytes of a 16 MiB pseudo-random pattern repeated, produced as they are read
/// (the same bytes whatever the reads' sizes).
struct Noise {
    pattern: Arc<Vec<u8>>,
    pos: u64,
    left: u64,
}

impl Noise {
    fn pattern() -> Arc<Vec<u8>> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut v = Vec::with_capacity(16 << 20);
        while v.len() < 16 << 20 {
            // splitmix64
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            v.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        Arc::new(v)
    }
}

impl AsyncRead for Noise {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let at = (self.pos % self.pattern.len() as u64) as usize;
        let n = (buf.remaining() as u64)
            .min(self.left)
            .min((self.pattern.len() - at) as u64) as usize;
        buf.put_slice(&self.pattern[at..at + n]);
        self.pos += n as u64;
        self.left -= n as u64;
        std::task::Poll::Ready(Ok(()))
    }
}

/// Peak resident set of this process in KiB (`VmHWM`).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Start a new peak (`VmHWM` = the current RSS).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

struct Round {
    put_s: f64,
    get_s: f64,
    total_s: f64,
    range_ms: f64,
    rss_growth_mib: f64,
}

async fn drain(mut r: impl AsyncRead + Unpin) -> Result<(u64, [u8; 32])> {
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).await?;
        if k == 0 {
            break;
        }
        sha.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, sha.finalize().into()))
}

async fn round(store: Arc<dyn ArtifactStore>, args: &Args) -> Result<Round> {
    let size = args.mb << 20;
    let pattern = Noise::pattern();
    let noise = || Noise {
        pattern: pattern.clone(),
        pos: 0,
        left: size,
    };
    let want = drain(noise()).await?;
    reset_peak_rss();
    let before = peak_rss_kib();
    let start = Instant::now();

    let t = Instant::now();
    store.put("bench/video.mp4", &mut noise()).await?;
    let mut put_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..2 {
        let got = drain(store.get("bench/video.mp4").await?).await?;
        anyhow::ensure!(got == want, "read back other bytes");
    }
    let get_s = t.elapsed().as_secs_f64() / 2.0;
    let t = Instant::now();
    store.put("bench/result.mp4", &mut noise()).await?;
    put_s = (put_s + t.elapsed().as_secs_f64()) / 2.0;
    let total_s = start.elapsed().as_secs_f64();

    let t = Instant::now();
    let step = size.saturating_sub(1 << 20) / args.ranges.max(1);
    for i in 0..args.ranges {
        let (n, _) = drain(
            store
                .get_range("bench/result.mp4", i * step, 1 << 20)
                .await?,
        )
        .await?;
        anyhow::ensure!(n == (1 << 20).min(size), "ranged read of {n} bytes");
    }
    let range_ms = t.elapsed().as_secs_f64() * 1000.0 / args.ranges.max(1) as f64;
    let rss_growth_mib = peak_rss_kib().saturating_sub(before) as f64 / 1024.0;
    for k in ["bench/video.mp4", "bench/result.mp4"] {
        store.delete(k).await?;
    }
    Ok(Round {
        put_s,
        get_s,
        total_s,
        range_ms,
        rss_growth_mib,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let nats = NatsServer::start().await.context("nats-server")?;
    let mut cfg = nats.config();
    // Room for the input and the result (the test configuration caps the store at 1 GiB).
    cfg.artifacts.max_bytes = ((2 * args.mb + 256) << 20) as i64;
    let topo = lipsync_tests::topology(&cfg).await?;
    let on_nats = lipsync_runtime::artifacts::open(&cfg.artifacts, &topo)?;
    let s3 = S3Server::start().await.context("S3 test server")?;
    let on_s3: Arc<dyn ArtifactStore> = Arc::new(s3.store()?);

    let nats_round = round(on_nats, &args).await.context("nats round")?;
    let s3_round = round(on_s3, &args).await.context("s3 round")?;

    let mb = args.mb as f64 * 1.048_576;
    println!(
        "artifact bench: {} MiB input and result, fetch -> face/mux -> mux result, one machine's disk",
        args.mb
    );
    println!("  {:<34}{:>12}{:>12}", "", "nats", "s3");
    let row = |name: &str, a: String, b: String| println!("  {name:<34}{a:>12}{b:>12}");
    let (n, s) = (&nats_round, &s3_round);
    row(
        "put (fetch input, mux result) MB/s",
        format!("{:.0}", mb / n.put_s),
        format!("{:.0}", mb / s.put_s),
    );
    row(
        "get (face, mux) MB/s",
        format!("{:.0}", mb / n.get_s),
        format!("{:.0}", mb / s.get_s),
    );
    row(
        "fetch-to-mux total s",
        format!("{:.2}", n.total_s),
        format!("{:.2}", s.total_s),
    );
    row(
        "fetch-to-mux MB/s (4 transfers)",
        format!("{:.0}", 4.0 * mb / n.total_s),
        format!("{:.0}", 4.0 * mb / s.total_s),
    );
    row(
        "ranged read of 1 MiB, ms",
        format!("{:.1}", n.range_ms),
        format!("{:.1}", s.range_ms),
    );
    row(
        "peak RSS growth of the client, MiB",
        format!("{:.0}", n.rss_growth_mib),
        format!("{:.0}", s.rss_growth_mib),
    );
    Ok(())
}
