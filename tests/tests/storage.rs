//! Storage budget and hygiene against a real nats-server and gateway: failed, abandoned
//! and rejected puts leave the object store at its baseline, a tail range reads about one
//! chunk, and a full store refuses new tasks at the entry while task records and work
//! messages keep their room.

mod gateway_common;

use std::time::Duration;

use gateway_common::Env;
use lipsync_runtime::artifacts::{self, CHUNK_SIZE};
use lipsync_runtime::{ArtifactError, ArtifactStore, Change, NatsArtifacts};
use lipsync_schemas::{FetchJob, InputSource, Status, names};
use lipsync_tests::{new_record, wait_for};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

fn pattern(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// Bytes the object store holds now (uncached: a fresh handle each time).
async fn stored(env: &Env) -> u64 {
    NatsArtifacts::from_topology(&env.topo)
        .usage()
        .await
        .unwrap()
        .unwrap()
        .bytes
}

async fn back_to(env: &Env, baseline: u64) {
    let r = wait_for(Duration::from_secs(20), || async {
        (stored(env).await == baseline).then_some(())
    })
    .await;
    assert!(
        r.is_ok(),
        "object store holds {} bytes, baseline {baseline}",
        stored(env).await
    );
}

/// A reader that yields `ok` bytes and then fails or stalls.
struct Broken {
    left: usize,
    stall: bool,
}

impl AsyncRead for Broken {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.left == 0 {
            if self.stall {
                return std::task::Poll::Pending;
            }
            return std::task::Poll::Ready(Err(std::io::Error::other("source broke")));
        }
        let n = self.left.min(buf.remaining()).min(50_000);
        buf.put_slice(&vec![7u8; n]);
        self.left -= n;
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn failed_and_abandoned_puts_leave_no_chunks_and_deletes_leave_nothing() {
    let env = Env::start().await;
    let store = NatsArtifacts::from_topology(&env.topo);
    let baseline = stored(&env).await;

    // The source fails after 1 MB: nothing of it stays.
    let mut r = Broken {
        left: 1 << 20,
        stall: false,
    };
    assert!(store.put("t/broken", &mut r).await.is_err());
    assert_eq!(stored(&env).await, baseline, "a failed put left chunks");
    assert!(store.info("t/broken").await.unwrap().is_none());

    // The caller gives up half way (the future is dropped): purged in the background.
    let mut r = Broken {
        left: 700_000,
        stall: true,
    };
    let put = store.put("t/abandoned", &mut r);
    assert!(
        tokio::time::timeout(Duration::from_secs(2), put)
            .await
            .is_err()
    );
    back_to(&env, baseline).await;

    // A stored and deleted artifact leaves no trace (no tombstone either).
    let data = pattern(3 << 20);
    store.put("t/kept", &mut &data[..]).await.unwrap();
    assert!(stored(&env).await > baseline + data.len() as u64);
    let mut back = Vec::new();
    store
        .get("t/kept")
        .await
        .unwrap()
        .read_to_end(&mut back)
        .await
        .unwrap();
    assert!(back == data);
    // Replacing an object drops the old chunks.
    store.put("t/kept", &mut &data[..1000]).await.unwrap();
    assert!(stored(&env).await < baseline + 10_000);
    store.delete("t/kept").await.unwrap();
    assert_eq!(stored(&env).await, baseline);

    // delete_task_artifacts removes every input and intermediate of a failed task.
    let tid = uuid::Uuid::new_v4().to_string();
    let mut rec = new_record(&tid);
    rec.status = Status::Failed;
    for name in [names::artifact::VIDEO, names::artifact::AUDIO_16K] {
        let k = names::artifact_key(&tid, name);
        store.put(&k, &mut &data[..200_000]).await.unwrap();
    }
    let attempt = names::attempt_key(
        &tid,
        lipsync_schemas::Stage::Infer,
        1,
        names::artifact::CROPS,
    );
    store.put(&attempt, &mut &data[..5000]).await.unwrap();
    lipsync_tests::set_done(
        &mut rec,
        lipsync_schemas::Stage::Infer,
        names::artifact::CROPS,
    );
    if let Some(t) = rec.stages.get_mut("infer") {
        t.attempts = 1;
    }
    artifacts::delete_task_artifacts(&store, &rec)
        .await
        .unwrap();
    assert_eq!(stored(&env).await, baseline, "a failed task kept artifacts");
    env.stop().await;
}

#[tokio::test]
async fn a_tail_range_reads_about_one_chunk() {
    let env = Env::start().await;
    let store = NatsArtifacts::from_topology(&env.topo);
    let tid = uuid::Uuid::new_v4().to_string();
    let data = pattern(32 << 20);
    let key = names::artifact_key(&tid, names::artifact::RESULT);
    store.put(&key, &mut &data[..]).await.unwrap();
    let mut rec = new_record(&tid);
    rec.status = Status::Completed;
    rec.output_video_url = Some(format!("/outputs/{tid}/result.mp4"));
    env.tasks.create(&rec).await.unwrap();
    let url = env.url(&format!("/outputs/{tid}/result.mp4"));
    let http = reqwest::Client::new();
    let get = |range: &'static str| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let before = artifacts::bytes_read();
            let r = wait_for(Duration::from_secs(10), || {
                let http = http.clone();
                let url = url.clone();
                async move {
                    let r = http.get(&url).header("Range", range).send().await.ok()?;
                    (r.status() == 206).then_some(r)
                }
            })
            .await
            .unwrap();
            let cr = r.headers()["content-range"].to_str().unwrap().to_owned();
            let body = r.bytes().await.unwrap();
            (cr, body, artifacts::bytes_read() - before)
        }
    };
    let (cr, body, read) = get("bytes=-1").await;
    assert_eq!(
        cr,
        format!("bytes {}-{}/{}", data.len() - 1, data.len() - 1, data.len())
    );
    assert_eq!(&body[..], &data[data.len() - 1..]);
    eprintln!(
        "Range: bytes=-1 on a {} byte result read {read} bytes from the store",
        data.len()
    );
    assert!(
        read > 0 && read <= CHUNK_SIZE as u64,
        "read {read} bytes for a 1-byte tail"
    );

    // A range across chunk boundaries in the middle is exact and reads only its chunks.
    let (start, end) = (10 * CHUNK_SIZE - 5, 13 * CHUNK_SIZE + 7);
    let spec: &'static str = Box::leak(format!("bytes={start}-{end}").into_boxed_str());
    let (_, body, read) = get(spec).await;
    assert!(body[..] == data[start..=end]);
    assert!(read <= 5 * CHUNK_SIZE as u64, "read {read}");
    env.stop().await;
}

/// A raw HTTP/1.1 multipart upload of `video` and `audio` (chunked); with `cut`, the
/// connection is reset after that many body bytes.
async fn upload(env: &Env, video: &[u8], audio: &[u8], cut: Option<usize>) -> Option<(u16, Value)> {
    let b = "lipsyncboundary";
    let mut body = Vec::new();
    for (name, data) in [("video", video), ("audio", audio)] {
        body.extend_from_slice(
            format!(
                "--{b}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{b}--\r\n").as_bytes());
    let mut s = tokio::net::TcpStream::connect(env.gw.addr).await.unwrap();
    let head = format!(
        "POST /sync HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary={b}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let send = cut.unwrap_or(body.len()).min(body.len());
    for piece in body[..send].chunks(64 * 1024) {
        if s.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
            .await
            .is_err()
            || s.write_all(piece).await.is_err()
            || s.write_all(b"\r\n").await.is_err()
        {
            break; // the server answered early and closed
        }
    }
    if cut.is_some() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A zero linger sends a reset on close (what a client crash looks like); it does
        // not block, which is what the deprecation is about.
        #[allow(deprecated)]
        s.set_linger(Some(Duration::ZERO)).unwrap();
        drop(s);
        return None;
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut resp)).await;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status: u16 = text.split_whitespace().nth(1)?.parse().ok()?;
    let json = text
        .find("\r\n\r\n")
        .map(|i| &text[i + 4..])
        .and_then(|b| {
            let start = b.find('{')?;
            let end = b.rfind('}')?;
            serde_json::from_str(&b[start..=end]).ok()
        })
        .unwrap_or(Value::Null);
    Some((status, json))
}

#[tokio::test]
async fn rejected_and_aborted_uploads_leave_the_store_at_its_baseline() {
    let env = Env::start_with(|c| {
        c.gateway.max_upload_bytes = 2 << 20;
        c.nats.max_queued_jobs = 1;
    })
    .await;
    let baseline = stored(&env).await;
    let small = pattern(300_000);

    // Over the upload cap, streamed (no Content-Length to refuse it early).
    let (status, v) = upload(&env, &small, &pattern(3 << 20), None).await.unwrap();
    assert_eq!(status, 413, "{v}");
    back_to(&env, baseline).await;

    // The connection is reset in the middle of the second file.
    assert!(
        upload(&env, &small, &pattern(1 << 20), Some(600_000))
            .await
            .is_none()
    );
    back_to(&env, baseline).await;

    // The queue is full (one queued task, no stage running): 503, uploads deleted.
    let r = env.submit(gateway_common::valid_body()).await;
    assert_eq!(r.status(), 200);
    let (status, v) = upload(&env, &small, &small, None).await.unwrap();
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "queue_full", "{v}");
    back_to(&env, baseline).await;
    env.stop().await;
}

#[tokio::test]
async fn a_full_store_refuses_new_tasks_and_running_tasks_keep_their_records() {
    let env = Env::start_with(|c| {
        c.artifacts.max_bytes = 8 << 20;
        c.artifacts.admission_reserve_bytes = 2 << 20;
    })
    .await;
    let store = NatsArtifacts::from_topology(&env.topo);
    // A task already running.
    let running = uuid::Uuid::new_v4().to_string();
    env.tasks.create(&new_record(&running)).await.unwrap();

    // Media fills the store: the put that does not fit fails typed and leaves nothing.
    store
        .put("fill/a", &mut &pattern(7 << 20)[..])
        .await
        .unwrap();
    let before = stored(&env).await;
    let e = store
        .put("fill/b", &mut &pattern(3 << 20)[..])
        .await
        .unwrap_err();
    assert!(matches!(e, ArtifactError::Full(_)), "{e}");
    back_to(&env, before).await;
    assert!(before <= 8 << 20);

    // New tasks get a typed error at the entry.
    let r = env.submit(gateway_common::valid_body()).await;
    assert_eq!(gateway_common::error_code(r, 507).await, "storage_full");

    // The running task's record and its work messages still have room.
    for i in 0..20 {
        env.tasks
            .update(&running, |r| {
                r.message = format!("still working {i}");
                Change::Write
            })
            .await
            .unwrap();
    }
    lipsync_runtime::publish_work(
        &env.topo.js,
        &FetchJob {
            v: lipsync_schemas::WORK_VERSION,
            task_id: running.clone(),
            video: InputSource::Url("https://example.com/v.mp4".into()),
            audio: InputSource::Url("https://example.com/a.wav".into()),
        },
    )
    .await
    .unwrap();
    let (rec, _) = env.tasks.get(&running).await.unwrap().unwrap();
    assert_eq!(rec.message, "still working 19");

    // Freed space admits tasks again.
    store.delete("fill/a").await.unwrap();
    let ok = wait_for(Duration::from_secs(10), || async {
        let r = env.submit(gateway_common::valid_body()).await;
        (r.status() == 200).then_some(())
    })
    .await;
    assert!(
        ok.is_ok(),
        "tasks are still refused after the store emptied"
    );
    env.stop().await;
}
