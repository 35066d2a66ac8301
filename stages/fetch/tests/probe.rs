//! ffprobe/ffmpeg wrappers on real media generated with ffmpeg in a temp dir.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lipsync_fetch::probe::{
    MediaInfo, MediaLimits, MediaTools, ProbeError, probe, to_pcm16k_wav, validate_audio,
    validate_video,
};
use tokio::process::Command;

struct Media {
    dir: tempfile::TempDir,
}

impl Media {
    fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("lipsync-probe-secret-dir")
                .tempdir()
                .unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs ffmpeg (bounded inputs only) and returns the output path.
    async fn ffmpeg(&self, args: &[&str], out: &str) -> PathBuf {
        let path = self.path(out);
        let mut cmd = Command::new("ffmpeg");
        cmd.args(["-nostdin", "-v", "error", "-y"])
            .args(args)
            .arg(&path)
            .kill_on_drop(true);
        let status = tokio::time::timeout(Duration::from_secs(60), cmd.status())
            .await
            .expect("ffmpeg took too long")
            .expect("ffmpeg is installed");
        assert!(status.success(), "ffmpeg failed for {out}");
        path
    }

    /// 2 s, 320x240 @ 25 fps H.264 + 44.1 kHz mono AAC sine.
    #[rustfmt::skip]
    async fn av_mp4(&self) -> PathBuf {
        self.ffmpeg(
            &[
                "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25:duration=2",
                "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=2",
                "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                "-c:a", "aac", "-shortest",
            ],
            "av.mp4",
        )
        .await
    }

    /// 1 s, 160x120 @ 30000/1001 fps, no audio.
    #[rustfmt::skip]
    async fn video_only_mp4(&self) -> PathBuf {
        self.ffmpeg(
            &[
                "-f", "lavfi", "-i", "testsrc=size=160x120:rate=30000/1001:duration=1",
                "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
            ],
            "video-only.mp4",
        )
        .await
    }

    /// 1.5 s, 22.05 kHz stereo PCM WAV.
    #[rustfmt::skip]
    async fn audio_wav(&self) -> PathBuf {
        self.ffmpeg(
            &[
                "-f", "lavfi", "-i", "sine=frequency=300:sample_rate=22050:duration=1.5",
                "-ac", "2", "-c:a", "pcm_s16le",
            ],
            "audio.wav",
        )
        .await
    }
}

fn assert_unsupported(r: Result<impl std::fmt::Debug, ProbeError>, dir: &Path) -> String {
    match r {
        Err(e @ ProbeError::UnsupportedMedia { .. }) => {
            assert_eq!(e.code(), "unsupported_media");
            assert!(!e.is_transient());
            let msg = e.to_string();
            assert!(
                !msg.contains(&*dir.to_string_lossy()),
                "leaks a path: {msg}"
            );
            assert!(!msg.contains("secret-dir"), "leaks a path: {msg}");
            assert!(!msg.is_empty());
            msg
        }
        other => panic!("expected UnsupportedMedia, got {other:?}"),
    }
}

#[tokio::test]
async fn mp4_with_audio_is_parsed_and_valid_for_both_inputs() {
    let m = Media::new();
    let path = m.av_mp4().await;
    let info: MediaInfo = probe(&path).await.unwrap();
    assert!(info.container.contains("mp4"), "{}", info.container);
    let d = info.duration_s.unwrap();
    assert!((d - 2.0).abs() < 0.1, "duration {d}");
    assert_eq!(info.video.len(), 1);
    let v = &info.video[0];
    assert_eq!(v.codec, "h264");
    assert_eq!((v.width, v.height), (320, 240));
    assert_eq!(v.avg_frame_rate.map(|r| (r.num, r.den)), Some((25, 1)));
    assert_eq!(v.r_frame_rate.map(|r| (r.num, r.den)), Some((25, 1)));
    assert_eq!(v.fps(), Some(25.0));
    assert_eq!(v.nb_frames, Some(50));
    assert_eq!(v.frame_count(None), Some(50));
    assert_eq!(v.rotation, 0);
    assert_eq!(v.pix_fmt.as_deref(), Some("yuv420p"));
    assert_eq!(info.audio.len(), 1);
    let a = &info.audio[0];
    assert_eq!(a.codec, "aac");
    assert_eq!(a.sample_rate, 44100);
    assert_eq!(a.channels, 1);
    assert!(info.size_bytes.unwrap() > 1000);

    let limits = MediaLimits::default();
    validate_video(&info, &limits).unwrap();
    // A video file with sound is a valid audio input.
    validate_audio(&info, &limits).unwrap();

    // Integrity check passes on a complete file.
    MediaTools::default().check_integrity(&path).await.unwrap();
}

#[tokio::test]
async fn limits_reject_long_and_large_inputs() {
    let m = Media::new();
    let info = probe(m.av_mp4().await).await.unwrap();
    let short = MediaLimits {
        max_duration_s: 1.0,
        ..MediaLimits::default()
    };
    let e = validate_video(&info, &short).unwrap_err();
    assert!(matches!(e, ProbeError::InputTooLong { .. }), "{e}");
    assert_eq!(e.code(), "input_too_long");
    let e = validate_audio(&info, &short).unwrap_err();
    assert_eq!(e.code(), "input_too_long");

    let few_frames = MediaLimits {
        max_frames: 40,
        ..MediaLimits::default()
    };
    let e = validate_video(&info, &few_frames).unwrap_err();
    assert!(matches!(e, ProbeError::InputTooLong { .. }), "{e}");
    assert!(e.to_string().contains("50 frames"), "{e}");

    let small = MediaLimits {
        max_width: 200,
        max_height: 200,
        ..MediaLimits::default()
    };
    let e = validate_video(&info, &small).unwrap_err();
    assert_eq!(e.code(), "unsupported_media");
    assert!(e.to_string().contains("320x240"), "{e}");

    let too_short = MediaLimits {
        min_duration_s: 5.0,
        ..MediaLimits::default()
    };
    assert_eq!(
        validate_video(&info, &too_short).unwrap_err().code(),
        "unsupported_media"
    );
}

#[tokio::test]
async fn video_only_mp4_fractional_fps_and_no_audio() {
    let m = Media::new();
    let path = m.video_only_mp4().await;
    let info = probe(&path).await.unwrap();
    assert!(info.audio.is_empty());
    let v = info.primary_video().unwrap();
    assert_eq!(
        v.avg_frame_rate.map(|r| (r.num, r.den)),
        Some((30000, 1001))
    );
    assert!((v.fps().unwrap() - 29.97).abs() < 0.01);
    assert_eq!((v.width, v.height), (160, 120));
    assert_eq!(v.nb_frames, Some(30));
    validate_video(&info, &MediaLimits::default()).unwrap();
    // A silent video is not a valid audio input.
    assert_eq!(
        validate_audio(&info, &MediaLimits::default()),
        Err(ProbeError::NoAudioStream)
    );
    assert_eq!(ProbeError::NoAudioStream.code(), "no_audio_stream");
    // And it cannot be converted to speech audio.
    let out = m.path("out.wav");
    assert_eq!(
        to_pcm16k_wav(&path, &out).await,
        Err(ProbeError::NoAudioStream)
    );
}

#[tokio::test]
async fn wav_is_audio_only() {
    let m = Media::new();
    let path = m.audio_wav().await;
    let info = probe(&path).await.unwrap();
    assert_eq!(info.container, "wav");
    assert!(info.video.is_empty());
    let a = info.primary_audio().unwrap();
    assert_eq!(a.codec, "pcm_s16le");
    assert_eq!((a.sample_rate, a.channels), (22050, 2));
    assert!((info.duration_s.unwrap() - 1.5).abs() < 0.01);
    validate_audio(&info, &MediaLimits::default()).unwrap();
    // An audio-only file as video_url.
    assert_eq!(
        validate_video(&info, &MediaLimits::default()),
        Err(ProbeError::NoVideoStream)
    );
    assert_eq!(ProbeError::NoVideoStream.code(), "no_video_stream");
}

#[tokio::test]
async fn cover_art_is_not_a_video_stream() {
    let m = Media::new();
    let path = m
        .ffmpeg(
            &[
                "-f",
                "lavfi",
                "-i",
                "sine=frequency=300:duration=1",
                "-f",
                "lavfi",
                "-i",
                "testsrc=size=64x64:rate=1:duration=1",
                "-map",
                "0:a",
                "-map",
                "1:v",
                "-c:a",
                "libmp3lame",
                "-c:v",
                "png",
                "-disposition:v",
                "attached_pic",
                "-id3v2_version",
                "3",
            ],
            "cover.mp3",
        )
        .await;
    let info = probe(&path).await.unwrap();
    assert!(info.video.is_empty(), "{:?}", info.video);
    assert_eq!(info.audio.len(), 1);
    assert_eq!(
        validate_video(&info, &MediaLimits::default()),
        Err(ProbeError::NoVideoStream)
    );
    validate_audio(&info, &MediaLimits::default()).unwrap();
}

#[tokio::test]
async fn rotation_from_display_matrix() {
    let m = Media::new();
    let src = m.video_only_mp4().await;
    let src = src.to_str().unwrap().to_string();
    let path = m
        .ffmpeg(
            &["-i", &src, "-c", "copy", "-metadata:s:v:0", "rotate=90"],
            "rotated.mp4",
        )
        .await;
    let info = probe(&path).await.unwrap();
    let v = info.primary_video().unwrap();
    assert!(v.rotation == 90 || v.rotation == 270, "{}", v.rotation);
    assert_eq!((v.width, v.height), (160, 120));
    assert_eq!(v.display_size(), (120, 160));
}

#[tokio::test]
async fn converts_to_16k_mono_wav() {
    let m = Media::new();
    let out = m.path("speech.wav");
    to_pcm16k_wav(m.av_mp4().await, &out).await.unwrap();
    let info = probe(&out).await.unwrap();
    assert_eq!(info.container, "wav");
    assert!(info.video.is_empty());
    let a = info.primary_audio().unwrap();
    assert_eq!(a.codec, "pcm_s16le");
    assert_eq!((a.sample_rate, a.channels), (16000, 1));
    assert!((info.duration_s.unwrap() - 2.0).abs() < 0.1);
    // 16-bit mono at 16 kHz: 32000 bytes per second plus a small header.
    let len = std::fs::metadata(&out).unwrap().len();
    assert!((60_000..70_000).contains(&len), "{len}");

    // Stereo 22.05 kHz WAV too.
    let out2 = m.path("speech2.wav");
    to_pcm16k_wav(m.audio_wav().await, &out2).await.unwrap();
    let a = probe(&out2).await.unwrap().audio[0].clone();
    assert_eq!((a.sample_rate, a.channels), (16000, 1));
}

#[tokio::test]
async fn zero_byte_text_and_truncated_files_are_unsupported() {
    let m = Media::new();
    let dir = m.dir.path().to_path_buf();

    let empty = m.path("empty.mp4");
    std::fs::write(&empty, b"").unwrap();
    let msg = assert_unsupported(probe(&empty).await, &dir);
    assert!(msg.contains("empty"), "{msg}");
    assert_unsupported(to_pcm16k_wav(&empty, m.path("o1.wav")).await, &dir);

    let text = m.path("text.mp4");
    std::fs::write(&text, "this is a plain text file, not a video\n".repeat(20)).unwrap();
    let msg = assert_unsupported(probe(&text).await, &dir);
    assert!(msg.contains("not media"), "{msg}");
    assert_unsupported(to_pcm16k_wav(&text, m.path("o2.wav")).await, &dir);

    // First half of an mp4 whose index (moov) is at the end: no index, unreadable.
    let full = std::fs::read(m.av_mp4().await).unwrap();
    let half = m.path("half.mp4");
    std::fs::write(&half, &full[..full.len() / 2]).unwrap();
    assert_unsupported(probe(&half).await, &dir);
    assert_unsupported(to_pcm16k_wav(&half, m.path("o3.wav")).await, &dir);

    // First half of a "faststart" mp4 (index at the front): the headers probe fine, the
    // integrity check catches the missing data.
    let av = m.path("av.mp4");
    let av = av.to_str().unwrap().to_string();
    let fs = m
        .ffmpeg(
            &["-i", &av, "-c", "copy", "-movflags", "+faststart"],
            "fs.mp4",
        )
        .await;
    let full = std::fs::read(&fs).unwrap();
    let fs_half = m.path("fs-half.mp4");
    std::fs::write(&fs_half, &full[..full.len() / 2]).unwrap();
    let tools = MediaTools::default();
    assert!(probe(&fs_half).await.is_ok());
    tools.check_integrity(&fs).await.unwrap();
    let msg = assert_unsupported(tools.check_integrity(&fs_half).await, &dir);
    assert!(msg.contains("truncated or corrupt"), "{msg}");
    assert_unsupported(tools.check_integrity(&empty).await, &dir);
}

#[tokio::test]
async fn playlists_disguised_as_media_are_refused() {
    // An HLS playlist saved as .mp4 would make ffmpeg open the listed files or URLs.
    let m = Media::new();
    let dir = m.dir.path().to_path_buf();
    let real = m.av_mp4().await;
    let playlist = m.path("playlist.mp4");
    std::fs::write(
        &playlist,
        format!(
            "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2,\n{}\n#EXT-X-ENDLIST\n",
            real.display()
        ),
    )
    .unwrap();
    let msg = assert_unsupported(probe(&playlist).await, &dir);
    assert!(msg.contains("playlist"), "{msg}");
    assert_unsupported(to_pcm16k_wav(&playlist, m.path("o.wav")).await, &dir);

    let concat = m.path("concat.mp4");
    std::fs::write(
        &concat,
        format!("ffconcat version 1.0\nfile '{}'\n", real.display()),
    )
    .unwrap();
    assert_unsupported(probe(&concat).await, &dir);
}

#[tokio::test]
async fn tool_timeouts_kill_the_child_and_missing_tools_are_internal() {
    let m = Media::new();
    let media = m.audio_wav().await;
    let slow = m.path("slow-ffprobe.sh");
    std::fs::write(&slow, "#!/bin/sh\nexec sleep 30\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&slow, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let tools = MediaTools {
        ffprobe: slow.clone(),
        ffmpeg: slow,
        probe_timeout: Duration::from_millis(300),
        convert_timeout: Duration::from_millis(300),
        ..MediaTools::default()
    };
    let started = std::time::Instant::now();
    let e = tools.probe(&media).await.unwrap_err();
    assert!(
        matches!(
            e,
            ProbeError::Timeout {
                tool: "ffprobe",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.code(), "unsupported_media");
    let e = tools
        .to_pcm16k_wav(&media, &m.path("x.wav"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ProbeError::Timeout { tool: "ffmpeg", .. }),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    let missing = MediaTools {
        ffprobe: PathBuf::from("/nonexistent/ffprobe"),
        ..MediaTools::default()
    };
    let e = missing.probe(&media).await.unwrap_err();
    assert_eq!(e.code(), "internal");
    assert!(e.is_transient());
    assert!(!e.to_string().contains("nonexistent"), "{e}");

    let e = probe(m.path("does-not-exist.mp4")).await.unwrap_err();
    assert_eq!(e.code(), "internal");
    assert!(!e.to_string().contains("secret-dir"), "{e}");
}
