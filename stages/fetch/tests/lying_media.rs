//! Inputs that lie about themselves, generated with ffmpeg: every check runs on what the
//! file decodes to, and no tool ever reaches out of the local file.
//!
//! - an MP3 whose first frames (320 kb/s) make ffprobe estimate 3.5 s while it decodes
//!   to 62 s (a low-rate stream appended);
//! - a Matroska file whose Segment duration says 3 s while its clusters hold 30 s;
//! - an HLS playlist and an ffconcat list named `.mp4` whose URLs point at a local canary
//!   server: refused by content, and the canary never sees a connection;
//! - an MP4 whose first stream is a cover picture: frames come from the real video;
//! - a stream whose resolution changes mid-way: every frame has the validated size;
//! - a frame reader past `max_frames`: `input_too_long`.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use lipsync_fetch::probe::{MediaLimits, MediaTools, ProbeError, validate_audio, validate_video};
use lipsync_runtime::media::{DecodeOptions, FrameReader, MediaError};

fn ffmpeg(dir: &Path, args: &[&str], out: &str) -> PathBuf {
    let path = dir.join(out);
    let st = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-y"])
        .args(args)
        .arg(&path)
        .status()
        .expect("ffmpeg runs");
    assert!(st.success(), "ffmpeg {args:?}");
    path
}

/// `secs` seconds of the lavfi `source` encoded with x264 (ultrafast), then `extra`.
fn x264(dir: &Path, source: &str, secs: &str, extra: &[&str], out: &str) -> PathBuf {
    let mut args = vec![
        "-f",
        "lavfi",
        "-i",
        source,
        "-t",
        secs,
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
    ];
    args.extend_from_slice(extra);
    ffmpeg(dir, &args, out)
}

/// The lavfi `sine` source as an MP3 of `channels` channels at `bitrate`, without a Xing
/// header or ID3 tag.
fn mp3(dir: &Path, sine: &str, channels: &str, bitrate: &str, out: &str) -> PathBuf {
    ffmpeg(
        dir,
        &[
            "-f",
            "lavfi",
            "-i",
            sine,
            "-ac",
            channels,
            "-c:a",
            "libmp3lame",
            "-b:a",
            bitrate,
            "-write_xing",
            "0",
            "-id3v2_version",
            "0",
        ],
        out,
    )
}

/// `a`'s bytes followed by `b`'s, written to `out` in `dir`.
fn joined(dir: &Path, a: &Path, b: &Path, out: &str) -> PathBuf {
    let mut bytes = std::fs::read(a).unwrap();
    bytes.extend(std::fs::read(b).unwrap());
    let path = dir.join(out);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn tools(max_duration_s: f64) -> MediaTools {
    MediaTools {
        max_duration_s,
        ..MediaTools::default()
    }
}

fn limits(max_duration_s: f64) -> MediaLimits {
    MediaLimits {
        max_duration_s,
        ..MediaLimits::default()
    }
}

fn assert_no_path(msg: &str, dir: &Path) {
    assert!(
        !msg.contains(&*dir.to_string_lossy()) && !msg.contains("/tmp"),
        "message leaks a path: {msg}"
    );
}

/// The MP3: 2 s at 320 kb/s, then 60 s at 8 kb/s; ffprobe estimates the length from the
/// first frames' bit rate.
fn lying_mp3(dir: &Path) -> PathBuf {
    let a = mp3(
        dir,
        "sine=f=440:d=2:sample_rate=44100",
        "2",
        "320k",
        "a.mp3",
    );
    let b = mp3(dir, "sine=f=300:d=60:sample_rate=8000", "1", "8k", "b.mp3");
    joined(dir, &a, &b, "lying.mp3")
}

#[tokio::test]
async fn an_mp3_that_decodes_past_the_cap_is_input_too_long() {
    let dir = tempfile::tempdir().unwrap();
    let mp3 = lying_mp3(dir.path());
    let t = tools(10.0);
    let info = t.probe(&mp3).await.unwrap();
    // What it claims passes the 10 s cap...
    let claimed = info.duration_s.unwrap();
    assert!(claimed < 10.0, "ffprobe claims {claimed} s");
    validate_audio(&info, &limits(10.0)).unwrap();
    // ...what it decodes to does not.
    let wav = dir.path().join("a16k.wav");
    let e = t.to_pcm16k_wav(&mp3, &wav).await.unwrap_err();
    assert!(matches!(e, ProbeError::InputTooLong { .. }), "{e}");
    assert_eq!(e.code(), "input_too_long");
    assert_no_path(&e.to_string(), dir.path());
    // The conversion stopped at the cap plus the margin instead of decoding 62 s.
    let wav_len = std::fs::metadata(&wav).unwrap().len();
    assert!(wav_len <= 32_000 * 12, "wrote {wav_len} bytes");
    // Under a cap above its real length the same file converts.
    tools(120.0).to_pcm16k_wav(&mp3, &wav).await.unwrap();
}

#[tokio::test]
async fn a_matroska_file_that_declares_less_than_it_holds_is_input_too_long() {
    let dir = tempfile::tempdir().unwrap();
    let real = x264(
        dir.path(),
        "testsrc2=size=160x120:rate=25",
        "30",
        &[],
        "real.mkv",
    );
    // Rewrite the Segment Info duration (EBML id 0x4489, 8-byte float, milliseconds).
    let mut b = std::fs::read(&real).unwrap();
    let i = b
        .windows(3)
        .position(|w| w == [0x44, 0x89, 0x88])
        .expect("a Duration element");
    b[i + 3..i + 11].copy_from_slice(&3000.0f64.to_be_bytes());
    let lying = dir.path().join("lying.mkv");
    std::fs::write(&lying, b).unwrap();

    let t = tools(10.0);
    let info = t.probe(&lying).await.unwrap();
    assert!(info.duration_s.unwrap() < 4.0, "{:?}", info.duration_s);
    validate_video(&info, &limits(10.0)).unwrap();
    let e = t.check_integrity(&lying).await.unwrap_err();
    assert!(matches!(e, ProbeError::InputTooLong { .. }), "{e}");
    assert_no_path(&e.to_string(), dir.path());
    // The honest file within a larger cap reports what it holds.
    let ok = tools(60.0).check_integrity(&real).await.unwrap();
    assert!((ok.duration_s - 30.0).abs() < 0.5, "{}", ok.duration_s);
    // The frame reader stops at its frame cap on the lying file too.
    let mut r = FrameReader::open_with(
        &lying,
        &DecodeOptions {
            max_frames: Some(100),
            ..DecodeOptions::default()
        },
    )
    .unwrap();
    let mut buf = Vec::new();
    let e = loop {
        match r.read_into(&mut buf) {
            Ok(true) => {}
            Ok(false) => panic!("reader ended at {} frames", r.index),
            Err(e) => break e,
        }
    };
    assert!(matches!(e, MediaError::TooLong(_)), "{e}");
    assert_eq!(r.index, 100);
    assert_eq!(e.code(), lipsync_schemas::ErrorCode::InputTooLong);
}

/// A TCP listener counting connections.
struct Canary {
    port: u16,
    hits: Arc<AtomicUsize>,
}

impl Canary {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                h.fetch_add(1, Ordering::SeqCst);
                let mut s = s;
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
            }
        });
        Self { port, hits }
    }
}

#[tokio::test]
async fn playlists_named_mp4_are_refused_and_fetch_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let canary = Canary::start();
    let seg = format!("http://127.0.0.1:{}/seg.ts", canary.port);
    let hls = dir.path().join("video.mp4");
    std::fs::write(
        &hls,
        format!("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{seg}\n#EXT-X-ENDLIST\n"),
    )
    .unwrap();
    let concat = dir.path().join("list.mp4");
    std::fs::write(&concat, format!("ffconcat version 1.0\nfile '{seg}'\n")).unwrap();
    let bare = dir.path().join("bare.mp4");
    std::fs::write(&bare, format!("file '{seg}'\nfile '/etc/passwd'\n")).unwrap();
    let t = tools(600.0);
    for f in [&hls, &concat, &bare] {
        let e = t.probe(f).await.unwrap_err();
        assert_eq!(e.code(), "unsupported_media", "{e}");
        assert_no_path(&e.to_string(), dir.path());
        let e = t.check_integrity(f).await.unwrap_err();
        assert_eq!(e.code(), "unsupported_media", "{e}");
        let e = t
            .to_pcm16k_wav(f, &dir.path().join("x.wav"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "unsupported_media", "{e}");
        let e = FrameReader::open(f).err().expect("refused");
        assert!(matches!(e, MediaError::Refused(_)), "{e}");
        // The readers of the later stages refuse it too (frame timestamps for the 25 fps
        // selection of face and mux).
        let e = lipsync_runtime::media::framesel::probe_frames(f).unwrap_err();
        assert!(matches!(e, MediaError::Refused(_)), "{e}");
    }
    // Even past the content check (a tool called on the playlist directly with the
    // wrapper's whitelists) ffmpeg refuses the format and opens no URL.
    let out = lipsync_runtime::media::MediaCommand::ffprobe()
        .args(["-show_format"])
        .input(&hls)
        .command();
    assert!(out.is_err(), "the wrapper refuses to build the command");
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        canary.hits.load(Ordering::SeqCst),
        0,
        "a tool reached the canary"
    );
}

/// `(type, offset, size)` of the boxes in `data[start..end]`.
fn boxes(data: &[u8], start: usize, end: usize) -> Vec<([u8; 4], usize, usize)> {
    let mut out = Vec::new();
    let mut i = start;
    while i + 8 <= end {
        let size = u32::from_be_bytes(data[i..i + 4].try_into().unwrap()) as usize;
        let kind: [u8; 4] = data[i + 4..i + 8].try_into().unwrap();
        out.push((kind, i, size));
        i += size.max(8);
    }
    out
}

/// The file with `moov`'s `udta` child moved right after `mvhd`.
fn udta_first(b: &[u8]) -> Vec<u8> {
    let (_, mo, ms) = *boxes(b, 0, b.len())
        .iter()
        .find(|x| &x.0 == b"moov")
        .expect("moov");
    let kids = boxes(b, mo + 8, mo + ms);
    let rank = |k: &[u8; 4]| match k {
        b"mvhd" => 0,
        b"udta" => 1,
        _ => 2,
    };
    let mut order = kids.clone();
    order.sort_by_key(|k| rank(&k.0));
    let mut out = b[..mo + 8].to_vec();
    for (_, o, s) in order {
        out.extend_from_slice(&b[o..o + s]);
    }
    out.extend_from_slice(&b[mo + ms..]);
    out
}

#[test]
fn cover_art_first_mp4_decodes_the_real_video() {
    let dir = tempfile::tempdir().unwrap();
    let cover = ffmpeg(
        dir.path(),
        &[
            "-f",
            "lavfi",
            "-i",
            "color=c=red:s=300x300",
            "-frames:v",
            "1",
        ],
        "cover.png",
    );
    let video = x264(
        dir.path(),
        "testsrc2=size=192x108:rate=25",
        "2",
        &["-pix_fmt", "yuv420p"],
        "video.mp4",
    );
    let with_cover = ffmpeg(
        dir.path(),
        &[
            "-i",
            video.to_str().unwrap(),
            "-i",
            cover.to_str().unwrap(),
            "-map",
            "0",
            "-map",
            "1",
            "-c",
            "copy",
            "-disposition:v:1",
            "attached_pic",
        ],
        "with_cover.mp4",
    );
    // ffmpeg writes the cover (`udta/meta/ilst/covr`) after the video track; move `udta`
    // before the `trak` boxes so the demuxer lists the picture as stream 0. The `moov`
    // box (at the end) keeps its size, so no chunk offset changes.
    let both = dir.path().join("cover_first.mp4");
    std::fs::write(&both, udta_first(&std::fs::read(&with_cover).unwrap())).unwrap();
    // Stream 0 is the picture.
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "stream=index,width,height:stream_disposition=attached_pic",
            "-of",
            "csv=p=0",
        ])
        .arg(&both)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.lines().next().unwrap().starts_with("0,300,300,1"),
        "{listing}"
    );
    let mut r = FrameReader::open(&both).unwrap();
    assert_eq!((r.geometry.width, r.geometry.height), (192, 108));
    let mut buf = Vec::new();
    while r.read_into(&mut buf).unwrap() {}
    assert_eq!(r.index, 50);
    // The validated stream index selects the same stream.
    let mut r = FrameReader::open_with(
        &both,
        &DecodeOptions {
            stream: Some(1),
            ..DecodeOptions::default()
        },
    )
    .unwrap();
    assert_eq!((r.geometry.width, r.geometry.height), (192, 108));
    while r.read_into(&mut buf).unwrap() {}
    assert_eq!(r.index, 50);
}

#[test]
fn a_resolution_change_mid_stream_is_scaled_to_the_validated_size() {
    let dir = tempfile::tempdir().unwrap();
    let a = x264(
        dir.path(),
        "testsrc=size=320x240:rate=25",
        "1",
        &["-pix_fmt", "yuv420p"],
        "a.ts",
    );
    let b = x264(
        dir.path(),
        "testsrc=size=640x480:rate=25",
        "1",
        &["-pix_fmt", "yuv420p", "-output_ts_offset", "1"],
        "b.ts",
    );
    let ab = joined(dir.path(), &a, &b, "ab.ts");
    let mut r = FrameReader::open(&ab).unwrap();
    assert_eq!((r.geometry.width, r.geometry.height), (320, 240));
    let mut buf = Vec::new();
    let mut n = 0;
    while r.read_into(&mut buf).unwrap() {
        assert_eq!(buf.len(), 320 * 240 * 3);
        n += 1;
    }
    // Both halves came through (the second scaled), none as misaligned bytes.
    assert!((45..=52).contains(&n), "{n} frames");
}
