//! The artifact store: inputs, intermediates and outputs, keyed `<task_id>/<name>`.
//! Media is streamed in and out; nothing is buffered whole.

use std::path::Path;
use std::pin::Pin;

use async_nats::jetstream::object_store::{self, ObjectStore};
use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWriteExt};

/// Errors of the artifact store.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// No artifact under this key.
    #[error("artifact {0} not found")]
    NotFound(String),
    /// The backend failed; worth retrying.
    #[error("artifact store: {0}")]
    Backend(String),
    /// Reading the source or writing the destination failed.
    #[error("artifact i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Facts about a stored artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactMeta {
    /// Key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Content digest (usable as an ETag), if the backend keeps one.
    pub digest: Option<String>,
    /// Last modification, RFC 3339.
    pub modified: Option<String>,
}

/// A boxed streaming reader.
pub type ArtifactReader = Pin<Box<dyn AsyncRead + Send>>;

/// Where artifacts live. The JetStream object store is the default backend; an
/// S3-compatible one can be added behind the same trait.
#[async_trait]
pub trait ArtifactStore: Send + Sync + 'static {
    /// Store everything `reader` yields under `key`, replacing any previous artifact.
    async fn put(
        &self,
        key: &str,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<ArtifactMeta, ArtifactError>;
    /// Stream an artifact.
    async fn get(&self, key: &str) -> Result<ArtifactReader, ArtifactError>;
    /// Metadata of an artifact, `None` if absent.
    async fn info(&self, key: &str) -> Result<Option<ArtifactMeta>, ArtifactError>;
    /// Delete an artifact; deleting an absent one is not an error.
    async fn delete(&self, key: &str) -> Result<(), ArtifactError>;

    /// Store a local file.
    async fn put_file(&self, key: &str, path: &Path) -> Result<ArtifactMeta, ArtifactError> {
        let mut f = tokio::fs::File::open(path).await?;
        self.put(key, &mut f).await
    }

    /// Write an artifact into a local file; returns its size.
    async fn get_to_file(&self, key: &str, path: &Path) -> Result<u64, ArtifactError> {
        let mut r = self.get(key).await?;
        let mut f = tokio::fs::File::create(path).await?;
        let n = tokio::io::copy(&mut r, &mut f).await?;
        f.flush().await?;
        f.sync_all().await?;
        Ok(n)
    }
}

/// JetStream Object Store backend.
#[derive(Clone)]
pub struct NatsArtifacts {
    store: ObjectStore,
}

impl NatsArtifacts {
    /// Wrap the `lipsync_artifacts` bucket.
    pub fn new(store: ObjectStore) -> Self {
        Self { store }
    }
}

fn meta(info: &object_store::ObjectInfo) -> ArtifactMeta {
    ArtifactMeta {
        key: info.name.clone(),
        size: info.size as u64,
        digest: info.digest.clone(),
        modified: info.modified.and_then(|m| {
            m.format(&time::format_description::well_known::Rfc3339)
                .ok()
        }),
    }
}

#[async_trait]
impl ArtifactStore for NatsArtifacts {
    async fn put(
        &self,
        key: &str,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<ArtifactMeta, ArtifactError> {
        let info = self
            .store
            .put(key, &mut &mut *reader)
            .await
            .map_err(|e| ArtifactError::Backend(e.to_string()))?;
        Ok(meta(&info))
    }

    async fn get(&self, key: &str) -> Result<ArtifactReader, ArtifactError> {
        match self.store.get(key).await {
            Ok(obj) => Ok(Box::pin(obj)),
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => {
                Err(ArtifactError::NotFound(key.to_owned()))
            }
            Err(e) => Err(ArtifactError::Backend(e.to_string())),
        }
    }

    async fn info(&self, key: &str) -> Result<Option<ArtifactMeta>, ArtifactError> {
        match self.store.info(key).await {
            Ok(i) if !i.deleted => Ok(Some(meta(&i))),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => Ok(None),
            Err(e) => Err(ArtifactError::Backend(e.to_string())),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), ArtifactError> {
        match self.store.delete(key).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => Ok(()),
            Err(e) => Err(ArtifactError::Backend(e.to_string())),
        }
    }
}
