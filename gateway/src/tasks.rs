//! Task routes: `GET /task/{id}`, `DELETE /task/{id}`, `GET /queue` and `GET /tasks`.
//! A key sees only its tenant's tasks (admins and an open service see all); another
//! tenant's task answers exactly as an unknown id.

use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use lipsync_runtime::Updated;
use lipsync_schemas::Status;
use serde::Deserialize;

use crate::AppState;
use crate::api::{QueueResponse, QueuedTask, TaskList, TaskView};
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody, Result};

/// `GET /task/{task_id}`.
#[utoipa::path(
    get,
    path = "/task/{task_id}",
    operation_id = "get_task",
    tag = "tasks",
    params(("task_id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "The task", body = TaskView),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown or malformed id, or another tenant's task", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Backend unavailable", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn get_task(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(task_id): Path<String>,
) -> Result<Json<TaskView>> {
    let (rec, _) = state.load_for(&caller, &task_id).await?;
    Ok(Json(state.view(&rec)))
}

/// `DELETE /task/{task_id}`: cancel.
#[utoipa::path(
    delete,
    path = "/task/{task_id}",
    operation_id = "cancel_task",
    tag = "tasks",
    params(("task_id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "Cancelled (or already failed): the record", body = TaskView),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 403, description = "Cross-origin request refused", body = ErrorBody),
        (status = 404, description = "Unknown or malformed id, or another tenant's task", body = ErrorBody),
        (status = 409, description = "Already completed", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Backend unavailable", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn cancel_task(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(task_id): Path<String>,
) -> Result<Json<TaskView>> {
    state.load_for(&caller, &task_id).await?;
    let updated = state
        .tasks
        .cancel(&task_id)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    match updated {
        Updated::Missing => Err(ApiError::NotFound("no such task".into())),
        Updated::Unchanged(rec) if rec.status == Status::Completed => Err(ApiError::TaskFinished),
        Updated::Written(rec) | Updated::Unchanged(rec) => {
            tracing::info!(task_id = %task_id, caller = %caller.id, "task cancelled");
            if rec.status == Status::Failed {
                // A cancelled task keeps nothing; stages still on it stop at their next
                // check and the runner deletes what they wrote since.
                let store = state.artifacts.clone();
                let r = rec.clone();
                tokio::spawn(async move {
                    if let Err(e) =
                        lipsync_runtime::artifacts::delete_task_artifacts(store.as_ref(), &r).await
                    {
                        tracing::warn!(task_id = %r.task_id, error = %e, "cancelled task artifacts not deleted");
                    }
                });
            }
            Ok(Json(TaskView::from_record(&rec, None)))
        }
    }
}

/// `GET /queue`.
#[utoipa::path(
    get,
    path = "/queue",
    operation_id = "get_queue",
    tag = "tasks",
    responses(
        (status = 200, description = "Tasks not yet on the GPU, in submission order; other tenants' tasks with their position only", body = QueueResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn queue(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Json<QueueResponse> {
    let snap = state.index.queue();
    let queued_tasks = snap
        .waiting
        .into_iter()
        .enumerate()
        .map(|(i, task_id)| {
            let visible = caller.sees_all()
                || state
                    .index
                    .get(&task_id)
                    .is_some_and(|(r, _)| caller.may_access(&r));
            QueuedTask {
                task_id: visible.then_some(task_id),
                position: i as u64,
            }
        })
        .collect();
    Json(QueueResponse {
        queue_length: state.index.queue_length() as u64,
        is_processing: snap.is_processing,
        queued_tasks,
    })
}

/// Query of `GET /tasks`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Page size, 1 to the server's maximum (default 50, capped by `gateway.list_max_limit`).
    #[param(minimum = 1)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// `GET /tasks`: the caller's tasks (an admin's: all), newest first, paginated.
#[utoipa::path(
    get,
    path = "/tasks",
    operation_id = "list_tasks",
    tag = "tasks",
    params(ListQuery),
    responses(
        (status = 200, description = "One page of tasks, newest first", body = TaskList),
        (status = 400, description = "Invalid query", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 422, description = "Invalid limit", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn list_tasks(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<ListQuery>,
) -> Result<Json<TaskList>> {
    let max = state.gw.list_max_limit.max(1);
    let limit = match q.limit {
        None => 50.min(max),
        Some(0) => return Err(ApiError::InvalidRequest("limit must be at least 1".into())),
        Some(n) => (n as usize).min(max),
    };
    let (page, next_cursor) =
        state
            .index
            .list_page(|r| caller.may_access(r), q.cursor.as_deref(), limit);
    Ok(Json(TaskList {
        tasks: page.iter().map(|r| state.view(r)).collect(),
        next_cursor,
    }))
}
