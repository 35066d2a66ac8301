//! `lipsync`: the command-line client of the lipsync gateway.
//!
//! ```text
//! lipsync submit --video URL|FILE --audio URL|FILE [--video .. --audio ..]... [--csv FILE]
//!                [--steps N] [--guidance G] [--seed S] [--webhook-url URL] [--direct-upload]
//!                [--wait] [--timeout 10m] [--cancel-on-interrupt]
//!                [--out result.mp4] [--mask-out mask.mp4] [--out-dir DIR]
//! lipsync status ID [--wait] [--timeout D] [--cancel-on-interrupt] [--out result.mp4]
//! lipsync ls [--limit N] [--cursor C] [--all]
//! lipsync queue
//! lipsync cancel ID
//! lipsync completions bash|zsh|fish|elvish|powershell
//! ```
//! Global: `--server URL` (env `LIPSYNC_SERVER`, default `http://localhost:8000`),
//! `--api-key KEY` (env `LIPSYNC_API_KEY`), `--json` (print the server's JSON),
//! `-q/--quiet` (task ids only, no progress bars), `--retries N` (429/503 answers are
//! retried, honouring `Retry-After`).
//!
//! Two URLs are sent as JSON (the server downloads them); two files are uploaded as a
//! multipart form (`video`, `audio`). With `--direct-upload` each file goes to the
//! server's bucket instead (`POST /uploads`, a PUT to the presigned URL) and the JSON
//! names the upload ids (`video_upload_id`, `audio_upload_id`). Several `--video/--audio` pairs, or a CSV file
//! (`video,audio[,out]` per line, optional header), submit a batch: one task each, one
//! progress bar each (indicatif `MultiProgress`). `--wait` (implied by `--out`,
//! `--out-dir` and `--timeout`) follows the tasks over their WebSockets
//! (`GET /task/{id}/ws`, falling back to polling), then downloads the results. Ctrl-C
//! while waiting detaches (the tasks keep running; the resume command is printed) or,
//! with `--cancel-on-interrupt`, cancels them. Exit codes: see [`error`].
//!
//! The library exposes [`run`] (and [`run_with_interrupt`], whose interrupt is any
//! future) so tests drive the real command in-process.

pub mod api;
pub mod error;
pub mod follow;

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use serde_json::Value;

pub use api::{Client, Input, Params, Task};
pub use error::{
    ClientError, EXIT_AUTH, EXIT_CANCELLED, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK,
    EXIT_TASK_FAILED, EXIT_TIMEOUT, EXIT_USAGE,
};

/// Default `--server`.
pub const DEFAULT_SERVER: &str = "http://localhost:8000";

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "lipsync",
    version,
    about = "Client of the lipsync lip-sync service",
    after_help = error::EXIT_CODES_HELP
)]
pub struct Cli {
    /// Gateway base URL.
    #[arg(long, global = true, env = "LIPSYNC_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// API key, sent as `Authorization: Bearer <key>`.
    #[arg(long, global = true, env = "LIPSYNC_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print the server's JSON answers instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print task ids only (one per line), no progress bars (bars are also hidden when
    /// stderr is not a terminal).
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Retries of a request the server refuses with 429 or 503, waiting what its
    /// Retry-After says (at most 120 s a time).
    #[arg(long, global = true, default_value_t = api::DEFAULT_RETRIES)]
    pub retries: u32,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit lip-sync tasks: one --video/--audio pair, several pairs, or a CSV file.
    #[command(after_help = error::EXIT_CODES_HELP)]
    Submit(SubmitArgs),
    /// Show a task; with --wait follow it to its end (and --out downloads the result).
    #[command(after_help = error::EXIT_CODES_HELP)]
    Status(StatusArgs),
    /// List your tasks, newest first (an admin key lists every task).
    Ls(LsArgs),
    /// Show the tasks that have not reached the GPU yet.
    Queue,
    /// Cancel a task.
    Cancel {
        /// Task id.
        id: String,
    },
    /// Print a shell completion script, e.g. `lipsync completions bash >
    /// /etc/bash_completion.d/lipsync`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `lipsync submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Video: an http(s) URL the server downloads, or a local file to upload. Repeat
    /// --video/--audio for several tasks (paired in order).
    #[arg(long, action = clap::ArgAction::Append)]
    pub video: Vec<String>,
    /// Audio: an http(s) URL, or a local file (any media with an audio stream).
    #[arg(long, action = clap::ArgAction::Append)]
    pub audio: Vec<String>,
    /// A CSV file of tasks: `video,audio[,out]` per line (URLs or files; relative file
    /// paths are relative to the CSV's folder); an optional header row names the columns.
    #[arg(long)]
    pub csv: Option<PathBuf>,
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
    /// In a batch, task N sends `<key>-N`.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// The server POSTs the signed final task record to this URL when the task ends.
    #[arg(long)]
    pub webhook_url: Option<String>,
    /// Send local files straight to the server's bucket (`POST /uploads`, then a PUT to
    /// the presigned URL it answers) instead of through the gateway; needs a server with
    /// the s3 artifact backend. A URL and a file may then be mixed. A re-run with the same
    /// --idempotency-key uploads anew and is refused (idempotency_conflict), never doubled.
    #[arg(long)]
    pub direct_upload: bool,
    /// Follow the tasks with live progress bars until they end.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub follow: FollowArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Save each completed result as DIR/<task_id>.mp4 (implies --wait; a CSV `out`
    /// column wins).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
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
    pub follow: FollowArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// How to wait.
#[derive(Debug, Args, Clone)]
pub struct FollowArgs {
    /// Stop waiting after this long (e.g. 90s, 10m, 1h30m; implies --wait) and exit with
    /// code 6; the tasks keep running.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Ctrl-C while waiting cancels the tasks instead of detaching from them.
    #[arg(long)]
    pub cancel_on_interrupt: bool,
}

/// Where to save the outputs of a completed task.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Save the result video here (implies --wait; one task only).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Also save the mask video here (implies --wait; one task only).
    #[arg(long)]
    pub mask_out: Option<PathBuf>,
}

/// `lipsync ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Tasks per page (the server caps it).
    #[arg(long)]
    pub limit: Option<u32>,
    /// Start at this page (`next_cursor` of a previous page).
    #[arg(long)]
    pub cursor: Option<String>,
    /// Follow every page to the end.
    #[arg(long)]
    pub all: bool,
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

    /// The command that resumes waiting for `id`.
    pub fn resume_command(&self, id: &str) -> String {
        if self.server == DEFAULT_SERVER {
            format!("lipsync status {id} --wait")
        } else {
            format!("lipsync --server {} status {id} --wait", self.server)
        }
    }
}

impl OutputArgs {
    fn wanted(&self) -> bool {
        self.out.is_some() || self.mask_out.is_some()
    }
}

/// `90`, `90s`, `10m`, `1h30m`, `2h`, `1.5s`.
///
/// # Errors
/// A text that is not a sum of `<number><unit>` parts (unit s, m or h; a bare number is
/// seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(s) = t.parse::<f64>() {
        return Duration::try_from_secs_f64(s).map_err(|e| format!("`{text}`: {e}"));
    }
    let mut total = 0.0f64;
    let mut num = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1.0,
            'm' => 60.0,
            'h' => 3600.0,
            _ => return Err(format!("`{text}`: unknown unit `{c}` (use s, m or h)")),
        };
        let n: f64 = num
            .parse()
            .map_err(|_| format!("`{text}`: a number must come before `{c}`"))?;
        total += n * unit;
        num.clear();
    }
    if !num.is_empty() {
        return Err(format!("`{text}`: `{num}` has no unit"));
    }
    Duration::try_from_secs_f64(total).map_err(|e| format!("`{text}`: {e}"))
}

/// Makes rustls' process-wide crypto provider aws-lc-rs (the one reqwest uses) unless
/// one is installed already; needed for `wss://` when several providers are compiled in.
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

type Out<'a> = &'a mut (dyn Write + Send);

fn w(out: Out<'_>, s: impl AsRef<str>) -> Result<(), ClientError> {
    writeln!(out, "{}", s.as_ref()).map_err(|e| ClientError::io("cannot write output", e))
}

/// Runs one command, writing results to `out` (progress and notices go to stderr);
/// Ctrl-C while waiting detaches or cancels. Returns the exit code.
///
/// # Errors
/// Requests that failed; the caller prints the error and exits with
/// [`ClientError::exit_code`].
pub async fn run(cli: Cli, out: Out<'_>) -> Result<i32, ClientError> {
    run_with_interrupt(cli, out, async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    })
    .await
}

/// [`run`] with `interrupt` standing for Ctrl-C: when it completes while the command
/// waits for tasks, the command detaches (or cancels with `--cancel-on-interrupt`).
///
/// # Errors
/// As [`run`].
pub async fn run_with_interrupt(
    cli: Cli,
    out: Out<'_>,
    interrupt: impl Future<Output = ()> + Send,
) -> Result<i32, ClientError> {
    let client = Client::new(&cli.server, cli.api_key.clone())?.with_retries(cli.retries);
    match &cli.command {
        Command::Submit(args) => submit(&cli, &client, args, out, interrupt).await,
        Command::Status(args) => {
            if args.wait || args.output.wanted() || args.follow.timeout.is_some() {
                let job = WaitJob {
                    id: args.id.clone(),
                    out: args.output.out.clone(),
                    mask_out: args.output.mask_out.clone(),
                };
                return wait_all(
                    &cli,
                    &client,
                    vec![job],
                    &args.follow,
                    false,
                    out,
                    interrupt,
                )
                .await;
            }
            let task = client.task(&args.id).await?;
            if cli.json {
                w(out, pretty(&task.raw))?;
            } else if cli.quiet {
                w(out, &task.view.task_id)?;
            } else {
                w(out, describe(&task))?;
            }
            Ok(EXIT_OK)
        }
        Command::Ls(args) => ls(&cli, &client, args, out).await,
        Command::Queue => {
            let q = client.queue().await?;
            if cli.json {
                w(out, pretty(&q))?;
            } else if cli.quiet {
                for t in q["queued_tasks"].as_array().into_iter().flatten() {
                    if let Some(id) = t["task_id"].as_str() {
                        w(out, id)?;
                    }
                }
            } else {
                w(out, describe_queue(&q))?;
            }
            Ok(EXIT_OK)
        }
        Command::Cancel { id } => {
            let task = client.cancel(id).await?;
            if cli.json {
                w(out, pretty(&task.raw))?;
            } else if cli.quiet {
                w(out, id)?;
            } else {
                w(out, format!("task {id} cancelled ({})", task.view.status))?;
            }
            Ok(EXIT_OK)
        }
        Command::Completions { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "lipsync", &mut buf);
            out.write_all(&buf)
                .map_err(|e| ClientError::io("cannot write output", e))?;
            Ok(EXIT_OK)
        }
    }
}

/// One task of a batch as given on the command line or in the CSV.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchItem {
    /// Video input.
    pub video: Input,
    /// Audio input.
    pub audio: Input,
    /// Where to save the result (CSV `out` column).
    pub out: Option<PathBuf>,
}

/// Reads a CSV of tasks: `video,audio[,out]` per record, or columns named by a header
/// row that has `video` and `audio` (and optionally `out`). Relative file paths are taken
/// relative to `base` (the CSV's folder). Blank lines and lines starting with `#` are
/// skipped.
///
/// # Errors
/// Unreadable CSV, a record without video or audio.
pub fn read_csv(text: &str, base: &Path) -> Result<Vec<BatchItem>, ClientError> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let mut cols = (0usize, 1usize, Some(2usize));
    let mut items = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(|e| ClientError::Usage(format!("--csv: {e}")))?;
        if rec.iter().all(str::is_empty) {
            continue;
        }
        if i == 0 {
            let names: Vec<String> = rec.iter().map(str::to_ascii_lowercase).collect();
            let pos = |n: &str| names.iter().position(|c| c == n);
            if let (Some(v), Some(a)) = (pos("video"), pos("audio")) {
                cols = (v, a, pos("out"));
                continue;
            }
        }
        let line = rec.position().map_or(i as u64 + 1, |p| p.line());
        let field = |c: usize| rec.get(c).filter(|s| !s.is_empty());
        let (Some(v), Some(a)) = (field(cols.0), field(cols.1)) else {
            return Err(ClientError::Usage(format!(
                "--csv line {line}: needs a video and an audio"
            )));
        };
        let resolve = |arg: &str| match Input::parse(arg) {
            Input::File(p) if p.is_relative() => Input::File(base.join(p)),
            other => other,
        };
        items.push(BatchItem {
            video: resolve(v),
            audio: resolve(a),
            out: cols.2.and_then(field).map(|o| {
                let p = PathBuf::from(o);
                if p.is_relative() { base.join(p) } else { p }
            }),
        });
    }
    Ok(items)
}

fn batch_items(args: &SubmitArgs) -> Result<Vec<BatchItem>, ClientError> {
    if args.video.len() != args.audio.len() {
        return Err(ClientError::Usage(format!(
            "{} --video but {} --audio: give them in pairs",
            args.video.len(),
            args.audio.len()
        )));
    }
    let mut items: Vec<BatchItem> = args
        .video
        .iter()
        .zip(&args.audio)
        .map(|(v, a)| BatchItem {
            video: Input::parse(v),
            audio: Input::parse(a),
            out: None,
        })
        .collect();
    if let Some(path) = &args.csv {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ClientError::io(format!("cannot read {}", path.display()), e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        items.extend(read_csv(&text, base)?);
    }
    if items.is_empty() {
        return Err(ClientError::Usage(
            "nothing to submit: give --video and --audio, or --csv".into(),
        ));
    }
    if items.len() > 1 && args.output.wanted() {
        return Err(ClientError::Usage(
            "--out and --mask-out take one task; for a batch use --out-dir or a CSV `out` column"
                .into(),
        ));
    }
    Ok(items)
}

async fn submit(
    cli: &Cli,
    client: &Client,
    args: &SubmitArgs,
    out: Out<'_>,
    interrupt: impl Future<Output = ()> + Send,
) -> Result<i32, ClientError> {
    let items = batch_items(args)?;
    let batch = items.len() > 1;
    let waiting = args.wait
        || args.output.wanted()
        || args.out_dir.is_some()
        || args.follow.timeout.is_some()
        || items.iter().any(|i| i.out.is_some());
    let mut jobs = Vec::new();
    let mut submit_failed = None;
    for (n, item) in items.iter().enumerate() {
        let params = Params {
            steps: args.steps,
            guidance: args.guidance,
            seed: args.seed,
            model: args.model.clone(),
            idempotency_key: args.idempotency_key.as_ref().map(|k| {
                if batch {
                    format!("{k}-{}", n + 1)
                } else {
                    k.clone()
                }
            }),
            webhook_url: args.webhook_url.clone(),
        };
        let uploading = [&item.video, &item.audio]
            .iter()
            .any(|i| matches!(i, Input::File(_)));
        let bar = follow::bytes_bar(cli.quiet || !uploading, "uploading");
        let answer = client
            .submit(&item.video, &item.audio, &params, args.direct_upload, &bar)
            .await;
        bar.finish_and_clear();
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                // Later tasks of a batch would fail the same way on these.
                let fatal = !batch
                    || matches!(
                        e,
                        ClientError::Usage(_)
                            | ClientError::Api {
                                status: 401 | 403,
                                ..
                            }
                    );
                if fatal {
                    return Err(e);
                }
                eprintln!("error: task {} ({}): {e}", n + 1, describe_item(item));
                submit_failed = Some(submit_failed.unwrap_or(e.exit_code()));
                continue;
            }
        };
        let id = answer["task_id"].as_str().unwrap_or_default().to_owned();
        if cli.json {
            if !waiting {
                w(
                    out,
                    if batch {
                        answer.to_string()
                    } else {
                        pretty(&answer)
                    },
                )?;
            }
        } else if cli.quiet {
            w(out, &id)?;
        } else {
            let pos = match answer["queue_position"].as_u64() {
                Some(p) => format!(" (queue position {p})"),
                None => String::new(),
            };
            let status = answer["status"].as_str().unwrap_or("queued");
            w(out, format!("task {id} {status}{pos}"))?;
        }
        let dest = item.out.clone().or_else(|| {
            args.output
                .out
                .clone()
                .or_else(|| args.out_dir.as_ref().map(|d| d.join(format!("{id}.mp4"))))
        });
        jobs.push(WaitJob {
            id,
            out: dest,
            mask_out: args.output.mask_out.clone(),
        });
    }
    if let Some(dir) = &args.out_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| ClientError::io(format!("cannot create {}", dir.display()), e))?;
    }
    if !waiting || jobs.is_empty() {
        return Ok(submit_failed.unwrap_or(EXIT_OK));
    }
    let code = wait_all(cli, client, jobs, &args.follow, true, out, interrupt).await?;
    Ok(match submit_failed {
        Some(c) if code == EXIT_OK => c,
        _ => code,
    })
}

fn describe_item(item: &BatchItem) -> String {
    let show = |i: &Input| match i {
        Input::Url(u) => u.clone(),
        Input::File(p) => p.display().to_string(),
    };
    format!("{} + {}", show(&item.video), show(&item.audio))
}

/// A task to follow and where its outputs go.
#[derive(Debug, Clone)]
struct WaitJob {
    id: String,
    out: Option<PathBuf>,
    mask_out: Option<PathBuf>,
}

/// How one followed task ended.
enum Ended {
    Done(Box<Task>, Vec<String>),
    Error(ClientError),
}

/// Follows every job to its end (one bar each), saving outputs; stops at `--timeout` or
/// at `interrupt`. `ids_printed`: the ids were printed already (at submission), `-q`
/// prints them only once. Returns the exit code of the whole batch.
async fn wait_all(
    cli: &Cli,
    client: &Client,
    jobs: Vec<WaitJob>,
    follow_args: &FollowArgs,
    ids_printed: bool,
    out: Out<'_>,
    interrupt: impl Future<Output = ()> + Send,
) -> Result<i32, ClientError> {
    let batch = jobs.len() > 1;
    let multi = indicatif::MultiProgress::new();
    let ended: Arc<Mutex<BTreeMap<usize, Ended>>> = Arc::default();
    let last_seen: Arc<Mutex<BTreeMap<usize, String>>> = Arc::default();
    let follow_one = |i: usize, job: &WaitJob| {
        let ended = ended.clone();
        let last_seen = last_seen.clone();
        let label = job.id.chars().take(8).collect::<String>();
        let mut progress = if batch {
            follow::Progress::in_multi(&multi, cli.quiet, label)
        } else {
            follow::Progress::new(cli.quiet)
        };
        let job = job.clone();
        async move {
            let task = follow::follow(client, &job.id, |t| {
                progress.update(t);
                last_seen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(i, t.view.status.clone());
            })
            .await;
            let res = match task {
                Ok(task) => {
                    if batch {
                        progress.finish_with(outcome_word(&task));
                    } else {
                        progress.finish();
                    }
                    match save_outputs(cli, client, &task, &job).await {
                        Ok(lines) => Ended::Done(Box::new(task), lines),
                        Err(e) => Ended::Error(e),
                    }
                }
                Err(e) => {
                    progress.finish();
                    Ended::Error(e)
                }
            };
            ended
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(i, res);
        }
    };
    let all = futures::future::join_all(jobs.iter().enumerate().map(|(i, j)| follow_one(i, j)));
    let timeout = async {
        match follow_args.timeout {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    enum Stop {
        Done,
        Timeout,
        Interrupt,
    }
    let stop = tokio::select! {
        _ = all => Stop::Done,
        _ = timeout => Stop::Timeout,
        _ = interrupt => Stop::Interrupt,
    };
    let _ = multi.clear();
    let mut ended = std::mem::take(&mut *ended.lock().unwrap_or_else(|e| e.into_inner()));
    let last_seen = last_seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // One task: its error is the command's error.
    if !batch
        && matches!(ended.get(&0), Some(Ended::Error(_)))
        && let Some(Ended::Error(e)) = ended.remove(&0)
    {
        return Err(e);
    }

    // Report what ended.
    let mut code = EXIT_OK;
    let mut worst = |c: i32| {
        // failed > cancelled > request error > ok (timeout/interrupt decide below).
        let rank = |c: i32| match c {
            EXIT_TASK_FAILED => 4,
            EXIT_CANCELLED => 3,
            EXIT_OK => 0,
            _ => 2,
        };
        if rank(c) > rank(code) {
            code = c;
        }
    };
    for (i, e) in &ended {
        match e {
            Ended::Done(task, lines) => {
                worst(task_exit(task));
                if cli.json {
                    w(
                        out,
                        if batch {
                            task.raw.to_string()
                        } else {
                            pretty(&task.raw)
                        },
                    )?;
                } else if cli.quiet {
                    if !ids_printed {
                        w(out, &task.view.task_id)?;
                    }
                } else {
                    let mut s = describe(task);
                    for l in lines {
                        s.push('\n');
                        s.push_str(l);
                    }
                    w(out, s)?;
                }
            }
            Ended::Error(err) => {
                eprintln!("error: task {}: {err}", jobs[*i].id);
                worst(err.exit_code());
            }
        }
    }
    let unfinished: Vec<&WaitJob> = jobs
        .iter()
        .enumerate()
        .filter(|(i, _)| !ended.contains_key(i))
        .map(|(_, j)| j)
        .collect();
    match stop {
        Stop::Done => Ok(code),
        Stop::Timeout => {
            for j in &unfinished {
                let status = jobs
                    .iter()
                    .position(|x| x.id == j.id)
                    .and_then(|i| last_seen.get(&i).cloned())
                    .unwrap_or_else(|| "unknown".into());
                eprintln!(
                    "timed out waiting for task {} (still {status}); resume with: {}",
                    j.id,
                    cli.resume_command(&j.id)
                );
            }
            Ok(EXIT_TIMEOUT)
        }
        Stop::Interrupt if follow_args.cancel_on_interrupt => {
            for j in &unfinished {
                match client.cancel(&j.id).await {
                    Ok(_) => {
                        eprintln!("interrupted: task {} cancelled", j.id);
                    }
                    // It ended meanwhile (task_finished) or the server is gone.
                    Err(e) => eprintln!("interrupted: cannot cancel task {}: {e}", j.id),
                }
                if cli.quiet && !ids_printed {
                    w(out, &j.id)?;
                }
            }
            Ok(EXIT_CANCELLED)
        }
        Stop::Interrupt => {
            for j in &unfinished {
                eprintln!(
                    "detached from task {} (it keeps running); resume with: {}",
                    j.id,
                    cli.resume_command(&j.id)
                );
                if !cli.quiet {
                    w(out, format!("task {} detached", j.id))?;
                } else if !ids_printed {
                    w(out, &j.id)?;
                }
            }
            Ok(EXIT_INTERRUPTED)
        }
    }
}

fn outcome_word(task: &Task) -> String {
    match (&task.view.status[..], &task.view.error) {
        ("completed", _) => "completed".into(),
        (_, Some(e)) => format!("failed: {}", e.code),
        (s, None) => s.to_owned(),
    }
}

/// Downloads the requested outputs of a completed task; returns the lines to print.
async fn save_outputs(
    cli: &Cli,
    client: &Client,
    task: &Task,
    job: &WaitJob,
) -> Result<Vec<String>, ClientError> {
    let mut lines = Vec::new();
    if task.view.status != "completed" {
        return Ok(lines);
    }
    let wanted = [
        (&job.out, &task.view.output_video_url, "result"),
        (&job.mask_out, &task.view.output_mask_url, "mask"),
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
    if job.out.is_none()
        && let Some(url) = &task.view.output_video_url
    {
        lines.push(format!("result: {}", client.url(url)?));
    }
    Ok(lines)
}

async fn ls(cli: &Cli, client: &Client, args: &LsArgs, out: Out<'_>) -> Result<i32, ClientError> {
    let mut cursor = args.cursor.clone();
    let mut all_tasks = Vec::new();
    let mut raw_pages = Vec::new();
    let next = loop {
        let (tasks, next, raw) = client.list(args.limit, cursor.as_deref()).await?;
        all_tasks.extend(tasks);
        raw_pages.push(raw);
        match next {
            Some(c) if args.all => {
                if cursor.as_deref() == Some(c.as_str()) {
                    return Err(ClientError::Protocol(
                        "the server returned the same cursor twice".into(),
                    ));
                }
                cursor = Some(c);
            }
            other => break other,
        }
    };
    if cli.json {
        if raw_pages.len() == 1 {
            w(out, pretty(&raw_pages[0]))?;
        } else {
            let tasks: Vec<Value> = all_tasks.iter().map(|t| t.raw.clone()).collect();
            w(
                out,
                pretty(&serde_json::json!({"tasks": tasks, "next_cursor": next})),
            )?;
        }
        return Ok(EXIT_OK);
    }
    if cli.quiet {
        for t in &all_tasks {
            w(out, &t.view.task_id)?;
        }
        return Ok(EXIT_OK);
    }
    w(out, describe_list(&all_tasks))?;
    if let Some(c) = next {
        w(out, format!("more: lipsync ls --cursor {c}"))?;
    }
    Ok(EXIT_OK)
}

/// One line per task: id, status, stage, progress, creation time.
pub fn describe_list(tasks: &[Task]) -> String {
    let mut s = format!(
        "{:<36}  {:<10}  {:<6}  {:>4}  CREATED",
        "TASK", "STATUS", "STAGE", "%"
    );
    for t in tasks {
        let v = &t.view;
        let status = match &v.error {
            Some(e) if e.code == "cancelled" => "cancelled".to_owned(),
            _ => v.status.clone(),
        };
        s.push_str(&format!(
            "\n{:<36}  {:<10}  {:<6}  {:>4.0}  {}",
            v.task_id,
            status,
            v.stage.as_deref().unwrap_or("-"),
            v.progress * 100.0,
            t.raw["created_at"].as_str().unwrap_or("")
        ));
    }
    if tasks.is_empty() {
        s.push_str("\n(no tasks)");
    }
    s
}

/// The exit code of a finished task.
pub fn task_exit(task: &Task) -> i32 {
    match (&task.view.status[..], &task.view.error) {
        ("completed", _) => EXIT_OK,
        (_, Some(e)) if e.code == "cancelled" => EXIT_CANCELLED,
        _ => EXIT_TASK_FAILED,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("1h30").is_err());
    }

    #[test]
    fn csv_with_and_without_header() {
        let base = Path::new("/data");
        let items = read_csv(
            "# a comment\nhttps://x/v.mp4,https://x/a.wav\nface.mp4, speech.wav ,out/r.mp4\n\n",
            base,
        )
        .unwrap();
        assert_eq!(
            items,
            vec![
                BatchItem {
                    video: Input::Url("https://x/v.mp4".into()),
                    audio: Input::Url("https://x/a.wav".into()),
                    out: None,
                },
                BatchItem {
                    video: Input::File("/data/face.mp4".into()),
                    audio: Input::File("/data/speech.wav".into()),
                    out: Some("/data/out/r.mp4".into()),
                },
            ]
        );
        let items = read_csv(
            "out,audio,video\n/tmp/r.mp4,\"/abs/a b.wav\",https://x/v\n",
            base,
        )
        .unwrap();
        assert_eq!(
            items,
            vec![BatchItem {
                video: Input::Url("https://x/v".into()),
                audio: Input::File("/abs/a b.wav".into()),
                out: Some("/tmp/r.mp4".into()),
            }]
        );
        let e = read_csv("video,audio\nonly-video.mp4\n", base).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn pairs_and_batch_rules() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_from_args(["lipsync", "submit"].iter().chain(args)).unwrap();
            match cli.command {
                Command::Submit(a) => batch_items(&a),
                _ => unreachable!(),
            }
        };
        let items = parse(&[
            "--video", "a.mp4", "--audio", "a.wav", "--video", "b.mp4", "--audio", "b.wav",
        ])
        .unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].video, Input::File("b.mp4".into()));
        assert!(parse(&["--video", "a.mp4"]).is_err());
        assert!(parse(&[]).is_err());
        assert!(
            parse(&[
                "--video", "a", "--audio", "b", "--video", "c", "--audio", "d", "--out", "r.mp4"
            ])
            .is_err()
        );
    }

    #[test]
    fn help_documents_the_exit_codes_and_completions_render() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Exit codes:"), "{help}");
        assert!(help.contains("authentication failed"), "{help}");
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "lipsync", &mut buf);
            let text = String::from_utf8(buf).unwrap();
            assert!(text.contains("lipsync"), "{shell}");
            assert!(text.contains("cancel-on-interrupt"), "{shell}: {text}");
        }
    }

    #[test]
    fn resume_command_names_a_non_default_server() {
        let cli = Cli::try_from_args(["lipsync", "queue"]).unwrap();
        assert_eq!(cli.resume_command("t1"), "lipsync status t1 --wait");
        let cli = Cli::try_from_args(["lipsync", "--server", "http://gw:8000", "queue"]).unwrap();
        assert_eq!(
            cli.resume_command("t1"),
            "lipsync --server http://gw:8000 status t1 --wait"
        );
    }
}
