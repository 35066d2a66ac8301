//! The face/audio join (design §4): both stages record their part with compare-and-set;
//! whichever write finds both parts done publishes `work.infer`. A redelivered stage
//! publishes again, which the stream's Msg-Id dedup drops.

use lipsync_schemas::{InferJob, Stage, names};

use crate::runner::{JobCtx, JobError};
use crate::tasks::{Change, Updated};

/// Record that `part` (face or audio) is done and publish the inference job when both
/// are. Returns whether this call published it.
pub async fn complete_part(ctx: &JobCtx, part: Stage) -> Result<bool, JobError> {
    let task_id = ctx.task_id.clone();
    let updated = ctx
        .tasks
        .update(&task_id, |r| {
            match part {
                Stage::Face => r.join.face_done = true,
                Stage::Audio => r.join.audio_done = true,
                _ => return Change::Skip,
            }
            if r.join.face_done && r.join.audio_done {
                r.join.infer_published = true;
            }
            r.raise_progress(part.progress_at(1.0));
            Change::Write
        })
        .await?;
    let record = match updated {
        Updated::Written(r) | Updated::Unchanged(r) => r,
        Updated::Missing => return Err(JobError::Cancelled),
    };
    if record.status.is_terminal() {
        return Err(JobError::Cancelled);
    }
    if !(record.join.face_done && record.join.audio_done) {
        return Ok(false);
    }
    let job = InferJob {
        v: lipsync_schemas::WORK_VERSION,
        task_id: task_id.clone(),
        video: names::artifact_key(&task_id, names::artifact::VIDEO),
        face_track: names::artifact_key(&task_id, names::artifact::FACE_TRACK),
        audio_features: names::artifact_key(&task_id, names::artifact::AUDIO_FEATURES),
    };
    ctx.publish(&job).await?;
    Ok(true)
}
