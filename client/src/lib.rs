//! `lipsync`: the command-line client of the lipsync gateway.
//!
//! ```text
//! lipsync submit --video URL|FILE --audio URL|FILE [--steps N] [--guidance G] [--seed S]
//!                [--wait] [--out result.mp4] [--mask-out mask.mp4]
//! lipsync status ID [--wait] [--out result.mp4]
//! lipsync queue
//! lipsync cancel ID
//! ```
//! Global: `--server URL` (env `LIPSYNC_SERVER`, default `http://localhost:8000`),
//! `--api-key KEY` (env `LIPSYNC_API_KEY`), `--json` (print the server's JSON),
//! `--quiet` (no progress bars).
//!
//! Two URLs are sent as JSON (the server downloads them); two files are uploaded as a
//! multipart form (`video`, `audio`). `--wait` (implied by `--out`) follows the task over
//! the WebSocket `GET /task/{id}/ws` with a live progress bar (stage, message, ETA),
//! falling back to polling, then downloads the result. Exit codes: see [`error`].
//!
//! The library exposes [`run`] so tests drive the real command in-process.

pub mod api;
pub mod error;
pub mod follow;

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde_json::Value;

pub use api::{Client, Input, Params, Task};
pub use error::{ClientError, EXIT_ERROR, EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "lipsync",
    version,
    about = "Client of the lipsync lip-sync service"
)]
pub struct Cli {
    /// Gateway base URL.
    #[arg(
        long,
        global = true,
        env = "LIPSYNC_SERVER",
        default_value = "http://localhost:8000"
    )]
    pub server: String,
    /// API key, sent as `Authorization: Bearer <key>`.
    #[arg(long, global = true, env = "LIPSYNC_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print the server's JSON answers instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bars (they are also hidden when stderr is not a terminal).
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a lip-sync task (URLs or local files).
    Submit(SubmitArgs),
    /// Show a task; with --wait follow it to its end (and --out downloads the result).
    Status(StatusArgs),
    /// Show the tasks that have not reached the GPU yet.
    Queue,
    /// Cancel a task.
    Cancel {
        /// Task id.
        id: String,
    },
}

/// `lipsync submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Video: an http(s) URL the server downloads, or a local file to upload.
    #[arg(long)]
    pub video: String,
    /// Audio: an http(s) URL, or a local file (any media with an audio stream).
    #[arg(long)]
    pub audio: String,
    /// DDIM steps, 1-100 (server default 20).
    #[arg(long)]
    pub steps: Option<u32>,
    /// Guidance scale, 1.0-5.0 (server default 1.5).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Noise seed (server chooses one if omitted).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Model name configured on the server (`inference_ckpt_path`).
    #[arg(long)]
    pub model: Option<String>,
    /// `Idempotency-Key`: the same key and request within 24 h returns the same task.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Follow the task with a live progress bar until it ends.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `lipsync status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Task id.
    pub id: String,
    /// Follow the task with a live progress bar until it ends.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Where to save the outputs of a completed task.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Save the result video here (implies --wait).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Also save the mask video here (implies --wait).
    #[arg(long)]
    pub mask_out: Option<PathBuf>,
}

impl Cli {
    /// Parses a command line (the first item is the program name).
    ///
    /// # Errors
    /// clap's error for an invalid command line (`--help` and `--version` too).
    pub fn try_from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        <Self as Parser>::try_parse_from(args)
    }
}

impl OutputArgs {
    fn wanted(&self) -> bool {
        self.out.is_some() || self.mask_out.is_some()
    }
}

/// Makes rustls' process-wide crypto provider aws-lc-rs (the one reqwest uses) unless
/// one is installed already; needed for `wss://` when several providers are compiled in.
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Runs one command, writing results to `out` (progress goes to stderr); returns the
/// exit code.
///
/// # Errors
/// Requests that failed; the caller prints the error and exits with
/// [`ClientError::exit_code`].
pub async fn run(cli: Cli, out: &mut (dyn Write + Send)) -> Result<i32, ClientError> {
    let client = Client::new(&cli.server, cli.api_key.clone())?;
    let w = |out: &mut (dyn Write + Send), s: String| {
        writeln!(out, "{s}").map_err(|e| ClientError::io("cannot write output", e))
    };
    match &cli.command {
        Command::Submit(args) => submit(&cli, &client, args, out).await,
        Command::Status(args) => {
            if args.wait || args.output.wanted() {
                let task = wait_and_save(&cli, &client, &args.id, &args.output, out).await?;
                return Ok(task_exit(&task));
            }
            let task = client.task(&args.id).await?;
            if cli.json {
                w(out, pretty(&task.raw))?;
            } else {
                w(out, describe(&task))?;
            }
            Ok(EXIT_OK)
        }
        Command::Queue => {
            let q = client.queue().await?;
            if cli.json {
                w(out, pretty(&q))?;
            } else {
                w(out, describe_queue(&q))?;
            }
            Ok(EXIT_OK)
        }
        Command::Cancel { id } => {
            let task = client.cancel(id).await?;
            if cli.json {
                w(out, pretty(&task.raw))?;
            } else {
                w(out, format!("task {id} cancelled ({})", task.view.status))?;
            }
            Ok(EXIT_OK)
        }
    }
}

async fn submit(
    cli: &Cli,
    client: &Client,
    args: &SubmitArgs,
    out: &mut (dyn Write + Send),
) -> Result<i32, ClientError> {
    let video = Input::parse(&args.video);
    let audio = Input::parse(&args.audio);
    let params = Params {
        steps: args.steps,
        guidance: args.guidance,
        seed: args.seed,
        model: args.model.clone(),
        idempotency_key: args.idempotency_key.clone(),
    };
    let uploading = matches!(video, Input::File(_));
    let bar = follow::bytes_bar(cli.quiet || !uploading, "uploading");
    let answer = client.submit(&video, &audio, &params, &bar).await;
    bar.finish_and_clear();
    let answer = answer?;
    let id = answer["task_id"].as_str().unwrap_or_default().to_owned();
    let waiting = args.wait || args.output.wanted();
    if cli.json && !waiting {
        writeln!(out, "{}", pretty(&answer))
            .map_err(|e| ClientError::io("cannot write output", e))?;
        return Ok(EXIT_OK);
    }
    if !cli.json {
        let pos = match answer["queue_position"].as_u64() {
            Some(p) => format!(" (queue position {p})"),
            None => String::new(),
        };
        let status = answer["status"].as_str().unwrap_or("queued");
        writeln!(out, "task {id} {status}{pos}")
            .map_err(|e| ClientError::io("cannot write output", e))?;
    }
    if !waiting {
        return Ok(EXIT_OK);
    }
    let task = wait_and_save(cli, client, &id, &args.output, out).await?;
    Ok(task_exit(&task))
}

/// Follows the task to its end with the progress bar, then saves the requested outputs.
async fn wait_and_save(
    cli: &Cli,
    client: &Client,
    id: &str,
    output: &OutputArgs,
    out: &mut (dyn Write + Send),
) -> Result<Task, ClientError> {
    let mut progress = follow::Progress::new(cli.quiet);
    let task = follow::follow(client, id, |t| progress.update(t)).await;
    progress.finish();
    let task = task?;
    let mut lines = Vec::new();
    if task.view.status == "completed" {
        let wanted = [
            (&output.out, &task.view.output_video_url, "result"),
            (&output.mask_out, &task.view.output_mask_url, "mask"),
        ];
        for (dest, url, what) in wanted {
            let Some(dest) = dest else { continue };
            let Some(url) = url else {
                return Err(ClientError::Protocol(format!(
                    "the completed task lists no {what} video"
                )));
            };
            let bar = follow::bytes_bar(cli.quiet, "download");
            let n = client.download(url, dest, &bar).await;
            bar.finish_and_clear();
            let n = n?;
            lines.push(format!("saved {what} to {} ({n} bytes)", dest.display()));
        }
        if output.out.is_none()
            && let Some(url) = &task.view.output_video_url
        {
            lines.push(format!("result: {}", client.url(url)?));
        }
    }
    let text = if cli.json {
        pretty(&task.raw)
    } else {
        let mut s = describe(&task);
        for l in lines {
            s.push('\n');
            s.push_str(&l);
        }
        s
    };
    writeln!(out, "{text}").map_err(|e| ClientError::io("cannot write output", e))?;
    Ok(task)
}

fn task_exit(task: &Task) -> i32 {
    if task.view.status == "completed" {
        EXIT_OK
    } else {
        EXIT_TASK_FAILED
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// A few human-readable lines about a task.
pub fn describe(task: &Task) -> String {
    let v = &task.view;
    let mut s = format!("task {}: {}", v.task_id, v.status);
    if let Some(stage) = &v.stage {
        s.push_str(&format!(" (stage {stage})"));
    }
    s.push_str(&format!(", {:.0}%", v.progress * 100.0));
    if !v.message.is_empty() {
        s.push_str(&format!(": {}", v.message));
    }
    if let Some(p) = v.queue_position {
        s.push_str(&format!("\nqueue position: {p}"));
    }
    if let Some(e) = &v.error {
        s.push_str(&format!("\nerror: {} ({})", e.message, e.code));
    }
    if let Some(u) = &v.output_video_url {
        s.push_str(&format!("\noutput: {u}"));
    }
    for w in &v.warnings {
        s.push_str(&format!("\nwarning: {w}"));
    }
    s
}

fn describe_queue(q: &Value) -> String {
    let len = q["queue_length"].as_u64().unwrap_or(0);
    let busy = q["is_processing"].as_bool().unwrap_or(false);
    let mut s = format!(
        "{len} task(s) waiting for the GPU; GPU {}",
        if busy { "busy" } else { "idle" }
    );
    for t in q["queued_tasks"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "\n  {:>4}  {}",
            t["position"].as_u64().unwrap_or(0),
            t["task_id"].as_str().unwrap_or("?")
        ));
    }
    s
}
