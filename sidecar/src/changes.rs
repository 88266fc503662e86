//! Directory watches that report changes and never reads (the agent's own reads would otherwise
//! turn a watch into a polling loop), and the settling of a burst of events into one.

use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc;

/// Sends `()` on `events` for every change under `dir` (create, write, rename, remove).
pub fn watch(
    dir: &Path,
    mode: notify::RecursiveMode,
    events: mpsc::UnboundedSender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
            let _ = events.send(());
        }
    })?;
    watcher.watch(dir, mode)?;
    Ok(watcher)
}

/// After a first event: waits `quiet`, then drops what arrived meanwhile (a swap or a rewrite is
/// several events; they are acted on once).
pub async fn settle(events: &mut mpsc::UnboundedReceiver<()>, quiet: Duration) {
    tokio::time::sleep(quiet).await;
    while events.try_recv().is_ok() {}
}
