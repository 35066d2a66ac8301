//! 16 kHz mono PCM sources, streamed in blocks: the stage's WAV artifact (16-bit PCM, as
//! the fetch stage writes it) and, for any other input, ffmpeg decoding to s16le 16 kHz
//! mono exactly as Whisper's `load_audio` does. Samples are `i16 / 32768`.

use std::io::{BufReader, Read};
use std::path::Path;

use lipsync_runtime::media::{MediaCommand, MediaError};

use crate::error::{Error, Result};
use crate::mel::SAMPLE_RATE;

/// Samples handed to the callback at a time.
const BLOCK: usize = 16_384;

fn convert(bytes: &[u8], out: &mut Vec<f32>) {
    out.clear();
    out.extend(
        bytes
            .chunks_exact(2)
            .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0),
    );
}

/// Streams s16le bytes from `reader` (at most `limit` samples) into `f` as f32 blocks.
/// Returns the samples read.
fn stream_s16le(
    mut reader: impl Read,
    limit: Option<u64>,
    f: &mut dyn FnMut(&[f32]) -> Result<()>,
) -> Result<u64> {
    let mut bytes = vec![0u8; BLOCK * 2];
    let mut filled = 0usize;
    let mut samples = Vec::with_capacity(BLOCK);
    let mut total = 0u64;
    let mut remaining = limit.map(|l| l.saturating_mul(2));
    loop {
        let room = bytes.len() - filled;
        let cap = remaining.map_or(room, |r| (r.min(room as u64)) as usize);
        if cap == 0 {
            break; // limit reached
        }
        let n = match reader.read(&mut bytes[filled..filled + cap]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::Io(e)),
        };
        filled += n;
        if let Some(r) = remaining.as_mut() {
            *r -= n as u64;
        }
        if filled == bytes.len() {
            total += flush(&mut bytes, &mut filled, &mut samples, f)?;
        }
    }
    total += flush(&mut bytes, &mut filled, &mut samples, f)?;
    Ok(total)
}

/// Hands the whole samples in `bytes[..filled]` to `f` and keeps an odd trailing byte.
fn flush(
    bytes: &mut [u8],
    filled: &mut usize,
    samples: &mut Vec<f32>,
    f: &mut dyn FnMut(&[f32]) -> Result<()>,
) -> Result<u64> {
    let whole = *filled / 2 * 2;
    if whole == 0 {
        return Ok(0);
    }
    convert(&bytes[..whole], samples);
    f(samples)?;
    bytes.copy_within(whole..*filled, 0);
    *filled -= whole;
    Ok(samples.len() as u64)
}

/// Reads a 16 kHz mono 16-bit PCM WAV file in blocks. Returns the sample count.
///
/// # Errors
/// [`Error::UnsupportedMedia`] when the file is not such a WAV file.
pub fn read_wav(path: &Path, f: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<u64> {
    let file = std::fs::File::open(path)?;
    let reader = hound::WavReader::new(BufReader::with_capacity(1 << 16, file))
        .map_err(|e| Error::UnsupportedMedia(format!("not a wav file ({e})")))?;
    let spec = reader.spec();
    if spec.channels != 1
        || spec.sample_rate != SAMPLE_RATE
        || spec.bits_per_sample != 16
        || spec.sample_format != hound::SampleFormat::Int
    {
        return Err(Error::UnsupportedMedia(format!(
            "expected 16 kHz mono 16-bit pcm, got {} Hz, {} channel(s), {} bits",
            spec.sample_rate, spec.channels, spec.bits_per_sample
        )));
    }
    let len = u64::from(reader.len());
    let inner = reader.into_inner();
    let n = stream_s16le(inner, Some(len), f)?;
    if n < len {
        return Err(Error::UnsupportedMedia(format!(
            "the wav file is truncated ({n} of {len} samples)"
        )));
    }
    Ok(n)
}

/// Whether `path` starts like a WAV file we can read directly.
pub fn is_pcm16k_wav(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    match hound::WavReader::new(BufReader::new(file)) {
        Ok(r) => {
            let s = r.spec();
            s.channels == 1
                && s.sample_rate == SAMPLE_RATE
                && s.bits_per_sample == 16
                && s.sample_format == hound::SampleFormat::Int
        }
        Err(_) => false,
    }
}

/// Decodes the first audio stream of any media file to 16 kHz mono s16le with ffmpeg
/// (the recipe of Whisper's `load_audio` and the fetch stage) and streams it.
///
/// # Errors
/// [`Error::UnsupportedMedia`] when ffmpeg cannot decode it; [`Error::Io`] when ffmpeg
/// cannot be started.
pub fn decode_with_ffmpeg(
    ffmpeg: &Path,
    input: &Path,
    f: &mut dyn FnMut(&[f32]) -> Result<()>,
) -> Result<u64> {
    let cmd = MediaCommand::ffmpeg()
        .program(ffmpeg)
        .input(input)
        .args([
            "-map",
            "0:a:0",
            "-vn",
            "-sn",
            "-dn",
            "-ac",
            "1",
            "-ar",
            "16000",
            "-c:a",
            "pcm_s16le",
            "-f",
            "s16le",
            "-",
        ])
        .cpu_limit_for(None);
    let media = |e: MediaError| match e {
        MediaError::Spawn(_, io) => Error::Io(io),
        MediaError::Decode(reason) => {
            Error::UnsupportedMedia(format!("ffmpeg could not decode the audio: {reason}"))
        }
        other => Error::UnsupportedMedia(other.to_string()),
    };
    let mut child = cmd.spawn().map_err(media)?;
    let stdout = child.child.stdout.take().expect("piped stdout");
    let result = stream_s16le(stdout, None, f);
    if result.is_err() {
        let _ = child.child.kill();
    }
    let finished = child.finish();
    let n = result?;
    finished.map_err(media)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn playlists_are_refused_before_ffmpeg_opens_anything() {
        let canary = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        canary.set_nonblocking(true).unwrap();
        let seg = format!("http://{}/seg.ts", canary.local_addr().unwrap());
        let dir = std::env::temp_dir().join(format!("lipsync-pcm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hls = dir.join("voice.wav");
        std::fs::write(
            &hls,
            format!("#EXTM3U\n#EXTINF:2.0,\n{seg}\n#EXT-X-ENDLIST\n"),
        )
        .unwrap();
        let e = decode_with_ffmpeg(Path::new("ffmpeg"), &hls, &mut |_| Ok(())).unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(e, Error::UnsupportedMedia(_)), "{e}");
        assert!(!e.to_string().contains(&*dir.to_string_lossy()), "{e}");
        assert!(canary.accept().is_err(), "ffmpeg reached the canary");
    }

    #[test]
    fn s16le_blocks_are_exact_and_bounded() {
        let values: Vec<i16> = (0..40_001).map(|i| (i % 65_536 - 32_768) as i16).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut got = Vec::new();
        let n = stream_s16le(&bytes[..], None, &mut |b| {
            got.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        assert_eq!(n, values.len() as u64);
        for (g, v) in got.iter().zip(&values) {
            assert_eq!(*g, f32::from(*v) / 32768.0);
        }
        let mut limited = 0;
        let n = stream_s16le(&bytes[..], Some(1000), &mut |b| {
            limited += b.len();
            Ok(())
        })
        .unwrap();
        assert_eq!((n, limited), (1000, 1000));
    }
}
