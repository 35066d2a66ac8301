//! The one way this product runs ffmpeg and ffprobe. Every call in every stage is built
//! with [`MediaCommand`], which adds, for each input:
//!
//! - a **protocol whitelist** (`file,pipe`): once fetch has downloaded an input, no tool
//!   may open a URL or anything but local files and pipes;
//! - a **format whitelist** ([`FORMATS`]): real media containers only; playlists (HLS,
//!   DASH), concat scripts, image sequences and text formats are absent, so a downloaded
//!   "video" that is a playlist cannot make ffmpeg open other files;
//! - a **content check** ([`sniff`]) before the tool starts: HLS playlists, ffconcat lists
//!   and other text files are refused whatever their name, as are files that carry such
//!   a playlist in their first bytes (text polyglots);
//! - a **time limit** scaled to the media length ([`TimeLimits`]): a CPU-time limit
//!   (`ulimit -t`, so a reader blocked on a slow consumer is never killed, but a decoder
//!   spinning on a crafted file is), and for one-shot runs a wall-clock limit too;
//! - **bounded stderr**: only the last [`STDERR_TAIL`] bytes are kept;
//! - **path-free errors**: messages are one line of the tool's reason with every local
//!   path removed ([`sanitize`]).

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::RwLock;
use std::time::Duration;

use super::MediaError;

/// Protocols an input may use.
pub const PROTOCOLS: &str = "file,pipe";

/// Demuxers the tools may use. Playlists (hls, dash, concat), image sequences and text
/// formats (tty, subtitles) are deliberately absent. `rawvideo` is for the frame pipes
/// this product feeds its own encoders.
pub const FORMATS: &str = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,flv,mpegts,mpeg,\
ogg,wav,w64,mp3,aac,flac,asf,gif,caf,aiff,amr,wv,ape,mxf,dv,m4v,rawvideo";

/// Bytes of stderr kept per run (the tail: it says why the tool stopped).
pub const STDERR_TAIL: usize = 4096;

/// Bytes at the start of an input examined by [`sniff`].
pub const SNIFF_BYTES: usize = 64 * 1024;

/// Time limits of tool runs, scaled to the length of the media they handle:
/// `base_s + per_media_s x media seconds`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeLimits {
    /// Seconds every run gets.
    pub base_s: f64,
    /// Seconds per second of media.
    pub per_media_s: f64,
}

impl Default for TimeLimits {
    fn default() -> Self {
        Self {
            base_s: 60.0,
            per_media_s: 10.0,
        }
    }
}

impl TimeLimits {
    /// The limit for media of `media_s` seconds (the base alone when unknown).
    pub fn for_media(&self, media_s: Option<f64>) -> Duration {
        let m = media_s.filter(|m| m.is_finite() && *m > 0.0).unwrap_or(0.0);
        Duration::from_secs_f64((self.base_s + self.per_media_s * m).clamp(1.0, 7.0 * 86400.0))
    }
}

/// Process-wide media settings (set once at start-up from the configuration; the defaults
/// are safe).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MediaSettings {
    /// Limits of every tool run.
    pub time: TimeLimits,
    /// Most frames a frame reader returns before it fails with `input_too_long`.
    pub max_frames: u64,
}

impl Default for MediaSettings {
    fn default() -> Self {
        Self {
            time: TimeLimits::default(),
            max_frames: 15_000,
        }
    }
}

static SETTINGS: RwLock<Option<MediaSettings>> = RwLock::new(None);

/// Sets the process-wide media settings.
pub fn configure(settings: MediaSettings) {
    if let Ok(mut s) = SETTINGS.write() {
        *s = Some(settings);
    }
}

/// The process-wide media settings.
pub fn settings() -> MediaSettings {
    SETTINGS.read().ok().and_then(|s| *s).unwrap_or_default()
}

/// Settings from the `[fetch]` section (which validates the inputs every later stage
/// decodes).
pub fn settings_from(cfg: &crate::config::FetchConfig) -> MediaSettings {
    MediaSettings {
        time: TimeLimits {
            base_s: cfg.tool_time_base_s,
            per_media_s: cfg.tool_time_per_media_s,
        },
        max_frames: cfg.max_frames,
    }
}

/// Which tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `ffmpeg`.
    Ffmpeg,
    /// `ffprobe`.
    Ffprobe,
}

impl Tool {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Ffmpeg => "ffmpeg",
            Tool::Ffprobe => "ffprobe",
        }
    }
}

/// An ffmpeg/ffprobe command line with the product's safety flags.
#[derive(Debug, Clone)]
pub struct MediaCommand {
    tool: Tool,
    program: PathBuf,
    args: Vec<OsString>,
    files: Vec<PathBuf>,
    cpu_limit: Option<Duration>,
}

impl MediaCommand {
    /// An `ffmpeg` run (from PATH), quiet, never reading the terminal.
    pub fn ffmpeg() -> Self {
        Self::new(Tool::Ffmpeg, "ffmpeg").args(["-nostdin", "-hide_banner", "-v", "error"])
    }

    /// An `ffprobe` run (from PATH), quiet.
    pub fn ffprobe() -> Self {
        Self::new(Tool::Ffprobe, "ffprobe").args(["-hide_banner", "-v", "error"])
    }

    fn new(tool: Tool, program: &str) -> Self {
        Self {
            tool,
            program: PathBuf::from(program),
            args: Vec::new(),
            files: Vec::new(),
            cpu_limit: None,
        }
    }

    /// Use another binary for the same tool.
    pub fn program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = program.into();
        self
    }

    /// Which tool this runs.
    pub fn tool(&self) -> Tool {
        self.tool
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds a local media file as an input, with the whitelists; [`sniff`] checks it
    /// before the tool starts.
    pub fn input(mut self, path: &Path) -> Self {
        self.args.extend(
            [
                "-protocol_whitelist",
                PROTOCOLS,
                "-format_whitelist",
                FORMATS,
                "-i",
            ]
            .iter()
            .map(OsString::from),
        );
        self.args.push(path.as_os_str().to_owned());
        self.files.push(path.to_path_buf());
        self
    }

    /// Adds a pipe input of a format this product produces itself (`format_args`, e.g.
    /// `["-f", "rawvideo", "-pix_fmt", "rgb24", ...]`, then `-i pipe:0`).
    pub fn pipe_input<I, S>(mut self, format_args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args.extend(
            [
                "-protocol_whitelist",
                PROTOCOLS,
                "-format_whitelist",
                FORMATS,
            ]
            .iter()
            .map(OsString::from),
        );
        self.args
            .extend(format_args.into_iter().map(|a| a.as_ref().to_owned()));
        self.args
            .extend(["-i", "pipe:0"].iter().map(OsString::from));
        self
    }

    /// Adds an output file (remembered so that errors never name it).
    pub fn output(mut self, path: &Path) -> Self {
        self.args.push(path.as_os_str().to_owned());
        self.files.push(path.to_path_buf());
        self
    }

    /// Limits the CPU time of the run.
    pub fn cpu_limit(mut self, limit: Duration) -> Self {
        self.cpu_limit = Some(limit);
        self
    }

    /// Limits the CPU time of the run to the process-wide limit for `media_s` seconds of
    /// media.
    pub fn cpu_limit_for(self, media_s: Option<f64>) -> Self {
        let limit = settings().time.for_media(media_s);
        self.cpu_limit(limit)
    }

    /// The files this command reads or writes (for [`sanitize`]).
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Checks the inputs and builds the process: stdin closed, stdout and stderr piped.
    ///
    /// # Errors
    /// An input is a playlist or text file ([`MediaError::Refused`]) or cannot be read.
    pub fn command(&self) -> Result<Command, MediaError> {
        for (i, f) in self.files.iter().enumerate() {
            // Outputs may not exist yet: only inputs are checked.
            if self.is_input(i) {
                sniff(f)?;
            }
        }
        Ok(self.command_unchecked())
    }

    /// The process, without the content check of the inputs.
    fn command_unchecked(&self) -> Command {
        let mut c = match self.cpu_limit {
            Some(limit) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg("ulimit -t \"$1\" || exit 126; shift; exec \"$@\"")
                    .arg("sh")
                    .arg(limit.as_secs().max(1).to_string())
                    .arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        c.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn is_input(&self, i: usize) -> bool {
        // An input path is always preceded by `-i`.
        let f = self.files[i].as_os_str();
        self.args
            .windows(2)
            .any(|w| w[0] == OsStr::new("-i") && w[1] == f)
    }

    /// Starts the tool; stderr is drained in the background, keeping its tail.
    ///
    /// # Errors
    /// The inputs are refused or the tool cannot start.
    pub fn spawn(&self) -> Result<MediaChild, MediaError> {
        self.spawn_with(|_| {})
    }

    /// Starts the tool after `adjust` changed the process (e.g. stdin piped).
    ///
    /// # Errors
    /// The inputs are refused or the tool cannot start.
    pub fn spawn_with(&self, adjust: impl FnOnce(&mut Command)) -> Result<MediaChild, MediaError> {
        let mut c = self.command()?;
        adjust(&mut c);
        let mut child = c
            .spawn()
            .map_err(|e| MediaError::Spawn(self.tool.name(), e))?;
        let stderr = child.stderr.take().map(drain_tail);
        let job = crate::jobscope::track(child.id());
        Ok(MediaChild {
            _job: job,
            child,
            stderr,
            tool: self.tool,
            files: self.files.clone(),
            cpu_limit: self.cpu_limit,
        })
    }

    /// Runs the tool to the end within `wall` (killed after it), collecting stdout.
    ///
    /// # Errors
    /// Refused inputs, no tool, a time limit hit.
    pub fn run(&self, wall: Duration) -> Result<ToolOutput, MediaError> {
        let mut child = self.spawn()?;
        let mut out = child.child.stdout.take().expect("piped stdout");
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = out.read_to_end(&mut buf);
            buf
        });
        let deadline = std::time::Instant::now() + wall;
        let status = loop {
            match child.child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if std::time::Instant::now() >= deadline => {
                    let _ = child.child.kill();
                    let _ = child.child.wait();
                    return Err(MediaError::Timeout(format!(
                        "{} did not finish within {} s; the file may be malformed",
                        self.tool.name(),
                        wall.as_secs()
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(MediaError::Spawn(self.tool.name(), e)),
            }
        };
        let stdout = reader.join().unwrap_or_default();
        let stderr = child.take_stderr();
        not_started(self.tool, self.cpu_limit.is_some(), status)?;
        child.check_cpu(status)?;
        Ok(ToolOutput {
            status,
            stdout,
            stderr,
        })
    }

    /// [`MediaCommand::run`] for async callers: the same process, driven by tokio.
    ///
    /// # Errors
    /// Refused inputs, no tool, a time limit hit.
    pub async fn run_async(&self, wall: Duration) -> Result<ToolOutput, MediaError> {
        let inputs: Vec<PathBuf> = self
            .files
            .iter()
            .enumerate()
            .filter(|(i, _)| self.is_input(*i))
            .map(|(_, f)| f.clone())
            .collect();
        // The content check reads files: off the async threads.
        tokio::task::spawn_blocking(move || inputs.iter().try_for_each(|f| sniff(f)))
            .await
            .map_err(|e| MediaError::Decode(e.to_string()))??;
        let mut c = tokio::process::Command::from(self.command_unchecked());
        c.kill_on_drop(true);
        let child = c
            .spawn()
            .map_err(|e| MediaError::Spawn(self.tool.name(), e))?;
        let _job = child.id().map(crate::jobscope::track);
        match tokio::time::timeout(wall, child.wait_with_output()).await {
            Err(_) => Err(MediaError::Timeout(format!(
                "{} did not finish within {} s; the file may be malformed",
                self.tool.name(),
                wall.as_secs()
            ))),
            Ok(Err(e)) => Err(MediaError::Spawn(self.tool.name(), e)),
            Ok(Ok(out)) => {
                let stderr = tail_string(&out.stderr);
                not_started(self.tool, self.cpu_limit.is_some(), out.status)?;
                if cpu_killed(out.status) && self.cpu_limit.is_some() {
                    return Err(self.cpu_timeout());
                }
                Ok(ToolOutput {
                    status: out.status,
                    stdout: out.stdout,
                    stderr,
                })
            }
        }
    }

    fn cpu_timeout(&self) -> MediaError {
        MediaError::Timeout(format!(
            "{} used more than {} s of CPU time; the file may be malformed",
            self.tool.name(),
            self.cpu_limit.map_or(0, |l| l.as_secs())
        ))
    }

    /// A path-free one-line reason from this command's stderr.
    pub fn reason(&self, stderr: &str) -> String {
        sanitize(stderr, &self.files)
    }
}

/// What a finished run produced.
#[derive(Debug)]
pub struct ToolOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything written to stdout.
    pub stdout: Vec<u8>,
    /// The tail of stderr.
    pub stderr: String,
}

/// A running tool.
#[derive(Debug)]
pub struct MediaChild {
    /// The process (stdout piped; stderr taken).
    pub child: Child,
    stderr: Option<std::thread::JoinHandle<String>>,
    tool: Tool,
    files: Vec<PathBuf>,
    cpu_limit: Option<Duration>,
    /// Registered with the job it runs for: a stopped job kills it.
    _job: crate::jobscope::Tracked,
}

impl MediaChild {
    /// The tail of stderr; waits for the tool to close it.
    pub fn take_stderr(&mut self) -> String {
        self.stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Waits for the tool; a CPU-limit kill is reported as [`MediaError::Timeout`], any
    /// other failure as [`MediaError::Decode`] with a path-free reason.
    ///
    /// # Errors
    /// See above.
    pub fn finish(&mut self) -> Result<(), MediaError> {
        let status = self
            .child
            .wait()
            .map_err(|e| MediaError::Spawn(self.tool.name(), e))?;
        let stderr = self.take_stderr();
        not_started(self.tool, self.cpu_limit.is_some(), status)?;
        self.check_cpu(status)?;
        if !status.success() {
            return Err(MediaError::Decode(sanitize(&stderr, &self.files)));
        }
        Ok(())
    }

    /// Maps a CPU-limit kill to [`MediaError::Timeout`].
    ///
    /// # Errors
    /// The tool was killed for its CPU time.
    pub fn check_cpu(&self, status: ExitStatus) -> Result<(), MediaError> {
        if self.cpu_limit.is_some() && cpu_killed(status) {
            return Err(MediaError::Timeout(format!(
                "{} used more than {} s of CPU time; the file may be malformed",
                self.tool.name(),
                self.cpu_limit.map_or(0, |l| l.as_secs())
            )));
        }
        Ok(())
    }

    /// A path-free one-line reason from `stderr`.
    pub fn reason(&self, stderr: &str) -> String {
        sanitize(stderr, &self.files)
    }
}

impl Drop for MediaChild {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The `sh` wrapper of a CPU-limited run exits 127 (or 126) when the tool itself
/// cannot be started: report that as a start failure, not as a media error.
fn not_started(tool: Tool, wrapped: bool, status: ExitStatus) -> Result<(), MediaError> {
    if wrapped && matches!(status.code(), Some(126) | Some(127)) {
        return Err(MediaError::Spawn(
            tool.name(),
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the tool could not be started",
            ),
        ));
    }
    Ok(())
}

fn cpu_killed(status: ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    // SIGXCPU at the soft limit; SIGKILL at the hard one.
    matches!(status.signal(), Some(24) | Some(9))
}

fn tail_string(b: &[u8]) -> String {
    let start = b.len().saturating_sub(STDERR_TAIL);
    String::from_utf8_lossy(&b[start..]).into_owned()
}

/// Reads a stream to its end, keeping only the last [`STDERR_TAIL`] bytes.
fn drain_tail(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut keep: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    keep.extend_from_slice(&buf[..n]);
                    if keep.len() > 2 * STDERR_TAIL {
                        keep.drain(..keep.len() - STDERR_TAIL);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        tail_string(&keep)
    })
}

/// One human line from a tool's stderr with no local path in it: the last non-empty
/// line, without `[demuxer @ 0x...]` prefixes, the given paths removed and any other
/// word that looks like a path replaced by `<file>`; at most 200 characters.
pub fn sanitize(stderr: &str, paths: &[PathBuf]) -> String {
    if stderr.contains("not on whitelist") || stderr.contains("not in whitelist") {
        return "unsupported container format; playlists and scripts are not accepted".into();
    }
    let line = stderr
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with("Conversion failed"))
        .or_else(|| stderr.lines().map(str::trim).rfind(|l| !l.is_empty()))
        .unwrap_or("");
    let mut line = line.to_owned();
    for p in paths {
        let s = p.to_string_lossy();
        if !s.is_empty() {
            line = line.replace(&*s, "<file>");
        }
    }
    if line.starts_with('[')
        && let Some(pos) = line.find("] ")
    {
        line = line[pos + 2..].to_owned();
    }
    let words: Vec<String> = line
        .split_whitespace()
        .map(|w| {
            if w.contains('/') || w.contains('\\') {
                "<file>".to_owned()
            } else {
                w.to_owned()
            }
        })
        .collect();
    let line = words.join(" ");
    let line = line.trim_start_matches("<file>:").trim();
    if line.is_empty() {
        return "unknown error".into();
    }
    line.chars().take(200).collect()
}

/// Refuses inputs that are playlists or concat lists, whatever their name: HLS
/// (`#EXTM3U`, `#EXT-X-`), DASH manifests, ffconcat lists (`ffconcat version`, `file '...'`
/// lines), and text files in general (media containers are binary). A playlist marker
/// anywhere in the first [`SNIFF_BYTES`] also refuses a file that looks binary (a text
/// polyglot: e.g. a playlist behind a few bytes of a media header).
///
/// # Errors
/// [`MediaError::Refused`], or [`MediaError::Decode`] when the file cannot be read.
pub fn sniff(path: &Path) -> Result<(), MediaError> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| MediaError::Decode(format!("cannot open the input: {}", e.kind())))?;
    let mut head = Vec::with_capacity(SNIFF_BYTES);
    (&mut f)
        .take(SNIFF_BYTES as u64)
        .read_to_end(&mut head)
        .map_err(|e| MediaError::Decode(format!("cannot read the input: {}", e.kind())))?;
    check_head(&head)
}

/// The content rule of [`sniff`] on the first bytes of a file.
///
/// # Errors
/// [`MediaError::Refused`].
pub fn check_head(head: &[u8]) -> Result<(), MediaError> {
    let lower: Vec<u8> = head.iter().map(u8::to_ascii_lowercase).collect();
    let has = |needle: &[u8]| lower.windows(needle.len()).any(|w| w == needle);
    let markers: [(&[u8], &str); 5] = [
        (b"#extm3u", "an HLS playlist"),
        (b"#ext-x-", "an HLS playlist"),
        (b"ffconcat version", "a concat list"),
        (b"<mpd", "a DASH manifest"),
        (b"#extinf", "a playlist"),
    ];
    for (m, what) in markers {
        if has(m) {
            return Err(MediaError::Refused(format!(
                "the file is {what}; playlists and lists of files are not accepted"
            )));
        }
    }
    if !head.is_empty() && looks_like_text(head) {
        return Err(MediaError::Refused(
            "the file is text, not media; playlists and lists of files are not accepted".into(),
        ));
    }
    Ok(())
}

/// Whether the first bytes are (UTF-8 or ASCII) text: no NUL and no control bytes
/// besides whitespace in the first 4 KiB. Every accepted container is binary within its
/// first bytes (MP3 frames and ID3 tags, WAV/RIFF, MP4 boxes, EBML, ...).
fn looks_like_text(head: &[u8]) -> bool {
    let n = head.len().min(4096);
    let h = &head[..n];
    // MPEG transport streams start with the 0x47 sync byte and are binary later; ADTS AAC
    // and MP3 frames start with 0xFF; none of those is text.
    h.iter()
        .all(|&b| b == b'\n' || b == b'\r' || b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80)
        && std::str::from_utf8(h).is_ok_and(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn playlists_and_text_are_refused() {
        assert!(check_head(b"#EXTM3U\n#EXTINF:10,\nhttp://127.0.0.1:9/a.ts\n").is_err());
        assert!(check_head(b"ffconcat version 1.0\nfile 'http://x/a.mp4'\n").is_err());
        assert!(check_head(b"file 'a.mp4'\nfile 'b.mp4'\n").is_err());
        // A polyglot: binary bytes, then a playlist.
        let mut p = vec![0u8, 0, 0, 0x18, b'f', b't', b'y', b'p', 0xff, 0x01];
        p.extend_from_slice(b"\n#EXTM3U\n#EXT-X-TARGETDURATION:1\n");
        assert!(check_head(&p).is_err());
        // Real media headers pass.
        assert!(check_head(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00").is_ok());
        assert!(check_head(b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00").is_ok());
        assert!(check_head(b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb").is_ok());
        assert!(check_head(b"\x1a\x45\xdf\xa3\x01\x00\x00\x00").is_ok());
        assert!(check_head(b"").is_ok());
    }

    #[test]
    fn sanitize_removes_paths() {
        let p = vec![PathBuf::from("/srv/scratch/x/in.mp4")];
        assert_eq!(
            sanitize(
                "[mov,mp4 @ 0x55] moov atom not found\n/srv/scratch/x/in.mp4: Invalid data found when processing input\n",
                &p
            ),
            "Invalid data found when processing input"
        );
        assert_eq!(
            sanitize("Error opening /etc/passwd for reading", &p),
            "Error opening <file> for reading"
        );
        assert_eq!(sanitize("", &p), "unknown error");
        assert!(
            sanitize("Protocol 'http' not on whitelist 'file,pipe'!", &p).contains("playlists")
        );
    }

    #[test]
    fn limits_scale_with_media_length() {
        let t = TimeLimits {
            base_s: 10.0,
            per_media_s: 2.0,
        };
        assert_eq!(t.for_media(Some(5.0)), Duration::from_secs(20));
        assert_eq!(t.for_media(None), Duration::from_secs(10));
        assert_eq!(t.for_media(Some(f64::NAN)), Duration::from_secs(10));
    }

    #[test]
    fn cpu_limit_kills_a_spinning_tool() {
        // `sh` stands in for ffmpeg: a busy loop under a 1 s CPU limit.
        let c = MediaCommand::new(Tool::Ffmpeg, "sh")
            .args(["-c", "while :; do :; done"])
            .cpu_limit(Duration::from_secs(1));
        let e = c.run(Duration::from_secs(60)).unwrap_err();
        assert!(matches!(e, MediaError::Timeout(_)), "{e}");
    }

    #[test]
    fn wall_limit_kills_a_stuck_tool() {
        let c = MediaCommand::new(Tool::Ffmpeg, "sleep").arg("30");
        let e = c.run(Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, MediaError::Timeout(_)), "{e}");
    }
}
