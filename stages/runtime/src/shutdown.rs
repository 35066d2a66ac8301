//! SIGINT/SIGTERM handling: the first signal cancels the root token (graceful drain), a
//! second one exits at once.

use tokio_util::sync::CancellationToken;

/// Wait for SIGINT or SIGTERM and return its name.
pub async fn signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            std::future::pending::<()>().await;
            unreachable!()
        };
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "ctrl-c"
    }
}

/// A root token cancelled by the first signal; a second signal exits with code 130.
pub fn install() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let name = signal().await;
        tracing::info!(signal = name, "shutdown requested, draining");
        t.cancel();
        let name = signal().await;
        tracing::warn!(signal = name, "second signal, exiting now");
        std::process::exit(130);
    });
    token
}
