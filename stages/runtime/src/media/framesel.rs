//! Which source frame each 25 fps output frame shows: the reference's rule.
//!
//! LatentSync re-encodes every input with `ffmpeg -i in -r 25 -crf 18 out.mp4` and reads
//! that file. `-r 25` on an MP4 output is not the `fps` filter: it is ffmpeg's constant
//! frame-rate sync at the encoder ("cfr" frame-rate mode), which keeps a running output
//! clock and drops or repeats a source frame only once the drift passes 1.1 output frames.
//! The `fps` filter instead rounds every output time to the nearest source frame, so the
//! two pick different frames at many positions for 24, 29.97, 30, 50 and 60 fps inputs
//! (and give different frame counts: 102 instead of 100 for 4 s at 30 fps).
//!
//! The decoder therefore asks ffmpeg for the same mode ([`OUTPUT_RATE_ARGS`]), with no
//! user filter in the graph: ffmpeg then runs the very code path of the reference's
//! re-encode, including its use of the packet duration as the frame duration, which ffmpeg
//! applies only when the command has no `-vf` (with a filter, 29.97 and 30 fps inputs
//! select differently). [`select`] is our own model of that rule; it predicts the
//! selection from the stream's timestamps, and the tests check model, decoder and a real
//! `-r 25` re-encode against each other.
//!
//! The rule, per source frame in presentation order, with times in output frames
//! (seconds x 25) and `opts` the number of output frames so far:
//! - `d` = the frame duration: the packet duration rounded half to even when that is at
//!   least 1, else `min(25 / stream_rate, 1)`;
//! - `delta0 = pts - opts`, `delta = delta0 + d`; when `delta0 < 0 < delta`, `delta0 = 0`;
//! - `delta < -1.1`: the frame is dropped; `delta > 1.1`: it is shown `round(delta)`
//!   times, the first `round(delta0 - 0.6)` of them (when `delta0 > 1.1`) being repeats of
//!   the previous source frame; otherwise it is shown once;
//! - at the end, the last frame is repeated the median of the last three repeat counts.

use std::path::Path;

use super::tool::{MediaCommand, settings};
use super::{FPS, MediaError};

/// ffmpeg output options that convert to 25 fps exactly as the reference's `-r 25`
/// re-encode does (see the module docs). Must not be combined with `-vf`.
pub const OUTPUT_RATE_ARGS: [&str; 4] = ["-fps_mode", "cfr", "-r", "25"];

/// One decoded source frame: presentation time relative to the start of the file, and
/// its duration, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SourceFrame {
    /// Presentation time, seconds from the file's start time.
    pub pts_s: f64,
    /// Frame (packet) duration in seconds; 0 when unknown.
    pub duration_s: f64,
}

/// The source frame index shown at every output frame, for frames in presentation order.
/// `stream_rate` is the stream's frame rate (ffprobe `r_frame_rate`); `filtered` is true
/// when the ffmpeg command has a user filter (then packet durations are not used).
pub fn select(frames: &[SourceFrame], stream_rate: Option<f64>, filtered: bool) -> Vec<usize> {
    let out = f64::from(FPS);
    let base = match stream_rate {
        Some(r) if r > 0.0 => (out / r).min(1.0),
        _ => 1.0,
    };
    let mut opts = 0.0f64;
    let mut shown = Vec::with_capacity(frames.len() + frames.len() / 4 + 4);
    let mut last_repeats = [0usize; 3];
    for (k, f) in frames.iter().enumerate() {
        let ipts = f.pts_s * out;
        let pkt = (f.duration_s * out).round_ties_even();
        let d = if !filtered && pkt > 0.0 { pkt } else { base };
        let mut delta0 = ipts - opts;
        let delta = delta0 + d;
        if delta0 < 0.0 && delta > 0.0 {
            delta0 = 0.0;
        }
        let (mut repeats, mut count) = (0usize, 1usize);
        if delta < -1.1 {
            count = 0;
        } else if delta > 1.1 {
            count = delta.round_ties_even() as usize;
            if delta0 > 1.1 {
                repeats = (delta0 - 0.6).round_ties_even() as usize;
            }
        }
        repeats = repeats.min(count);
        last_repeats = [repeats, last_repeats[0], last_repeats[1]];
        let prev = k.saturating_sub(1);
        shown.extend(std::iter::repeat_n(prev, repeats));
        shown.extend(std::iter::repeat_n(k, count - repeats));
        opts += count as f64;
    }
    if let Some(last) = frames.len().checked_sub(1) {
        let mut m = last_repeats;
        m.sort_unstable();
        shown.extend(std::iter::repeat_n(last, m[1]));
    }
    shown
}

/// The frames of the first video stream (from the container's packet timestamps, sorted
/// into presentation order) and its frame rate, read with ffprobe without decoding.
pub fn probe_frames(input: &Path) -> Result<(Vec<SourceFrame>, Option<f64>), MediaError> {
    let cmd = MediaCommand::ffprobe()
        .args([
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=time_base,r_frame_rate:format=start_time:packet=pts,duration",
            "-of",
            "json",
        ])
        .input(input)
        .cpu_limit_for(None);
    let out = cmd.run(settings().time.for_media(None))?;
    if !out.status.success() {
        return Err(MediaError::Decode(format!(
            "ffprobe failed on the video: {}",
            cmd.reason(&out.stderr)
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| MediaError::Decode(format!("ffprobe output: {e}")))?;
    let stream = &v["streams"][0];
    let tb = ratio(stream["time_base"].as_str().unwrap_or(""))
        .ok_or_else(|| MediaError::Decode("video stream has no time base".into()))?;
    let rate = ratio(stream["r_frame_rate"].as_str().unwrap_or(""));
    let start: f64 = v["format"]["start_time"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    let mut pk: Vec<(i64, i64)> = v["packets"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p["pts"].as_i64()?, p["duration"].as_i64().unwrap_or(0))))
                .collect()
        })
        .unwrap_or_default();
    pk.sort_unstable();
    let frames = pk
        .into_iter()
        .map(|(pts, dur)| SourceFrame {
            pts_s: pts as f64 * tb - start,
            duration_s: dur as f64 * tb,
        })
        .collect();
    Ok((frames, rate))
}

/// The predicted source frame of every output frame of `input` (for the decoder of
/// [`super::FrameReader`], which has no user filter).
pub fn predict(input: &Path) -> Result<Vec<usize>, MediaError> {
    let (frames, rate) = probe_frames(input)?;
    Ok(select(&frames, rate, false))
}

fn ratio(s: &str) -> Option<f64> {
    let (n, d) = s.split_once('/')?;
    let (n, d): (f64, f64) = (n.trim().parse().ok()?, d.trim().parse().ok()?);
    (d != 0.0 && n > 0.0).then_some(n / d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn constant(num: f64, den: f64, n: usize) -> Vec<SourceFrame> {
        (0..n)
            .map(|k| SourceFrame {
                pts_s: k as f64 * den / num,
                duration_s: den / num,
            })
            .collect()
    }

    // Prefixes of what ffmpeg's `-r 25` re-encode shows for 4 s clips whose pixels carry
    // the source frame number (measured with ffmpeg 5.1).
    #[test]
    fn matches_the_measured_re_encode() {
        let cases: [(f64, f64, usize, &[usize], usize); 5] = [
            (
                24.0,
                1.0,
                96,
                &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 12, 13, 14, 15],
                100,
            ),
            (
                30000.0,
                1001.0,
                120,
                &[
                    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15, 16, 17, 18, 20,
                ],
                102,
            ),
            (
                30.0,
                1.0,
                120,
                &[
                    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15, 16, 17, 18, 20,
                ],
                102,
            ),
            (50.0, 1.0, 200, &[0, 1, 2, 3, 5, 7, 9, 11, 13, 15], 102),
            (60.0, 1.0, 240, &[0, 1, 2, 4, 6, 9, 11, 14, 16, 18, 21], 102),
        ];
        for (num, den, n, prefix, len) in cases {
            let s = select(&constant(num, den, n), Some(num / den), false);
            assert_eq!(&s[..prefix.len()], prefix, "{num}/{den}");
            assert_eq!(s.len(), len, "{num}/{den}");
            assert_eq!(
                *s.last().unwrap(),
                n - 1,
                "{num}/{den}: ends on the last frame"
            );
        }
        // The measured tails.
        let s = select(&constant(30.0, 1.0, 120), Some(30.0), false);
        assert_eq!(&s[s.len() - 4..], [116, 117, 118, 119]);
        let s = select(&constant(60.0, 1.0, 240), Some(60.0), false);
        assert_eq!(&s[s.len() - 4..], [232, 234, 237, 239]);
    }

    #[test]
    fn identity_at_25_fps_and_monotone() {
        let s = select(&constant(25.0, 1.0, 50), Some(25.0), false);
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        for (num, den) in [(24.0, 1.0), (30000.0, 1001.0), (50.0, 1.0), (60.0, 1.0)] {
            let s = select(&constant(num, den, 300), Some(num / den), false);
            assert!(s.windows(2).all(|w| w[0] <= w[1]));
        }
    }

    #[test]
    fn a_user_filter_changes_the_30_fps_selection() {
        let frames = constant(30.0, 1.0, 120);
        let plain = select(&frames, Some(30.0), false);
        let filtered = select(&frames, Some(30.0), true);
        assert_ne!(plain, filtered);
        // 24 fps is the same either way (both durations are one output frame).
        let frames = constant(24.0, 1.0, 96);
        assert_eq!(
            select(&frames, Some(24.0), false),
            select(&frames, Some(24.0), true)
        );
    }

    #[test]
    fn a_gap_repeats_the_previous_frame_first() {
        // Variable frame rate: a 0.4 s hole after frame 2.
        let mut frames = constant(25.0, 1.0, 6);
        for f in frames.iter_mut().skip(3) {
            f.pts_s += 0.4;
        }
        let s = select(&frames, Some(25.0), false);
        assert_eq!(&s[..3], [0, 1, 2]);
        let repeats = s.iter().filter(|&&i| i == 2).count();
        assert!(repeats >= 9, "{s:?}");
        assert_eq!(*s.last().unwrap(), 5);
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio("30000/1001"), Some(30000.0 / 1001.0));
        assert_eq!(ratio("0/0"), None);
        assert_eq!(ratio("x"), None);
    }
}
