//! Long-lived tasks, supervised: each has a name, and the first one to end (return or panic)
//! is reported as a [`TaskFailure`], so its owner can stop with a clear error instead of running
//! on without it.

use std::collections::HashMap;
use std::future::Future;

use tokio::task::{AbortHandle, Id, JoinSet};

/// A supervised task ended.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TaskFailure {
    #[error("task {name} panicked: {message}")]
    Panicked { name: &'static str, message: String },
    #[error("task {name} ended unexpectedly")]
    Ended { name: &'static str },
}

/// Tasks that should run until their owner stops them, each returning a `T` (`()` by default)
/// when it ends. Dropping the supervisor aborts them.
pub struct Supervisor<T = ()> {
    tasks: JoinSet<T>,
    /// The tasks still running, by id.
    names: HashMap<Id, (&'static str, AbortHandle)>,
}

impl<T> Default for Supervisor<T> {
    fn default() -> Self {
        Self { tasks: JoinSet::new(), names: HashMap::new() }
    }
}

/// A supervised task that ended: its name, and what it returned or why it panicked.
#[derive(Debug)]
pub struct Ended<T> {
    pub name: &'static str,
    pub outcome: Result<T, String>,
}

impl<T: Send + 'static> Supervisor<T> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = T> + Send + 'static) {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), (name, handle));
    }

    /// The next task to end; `None` once none is left.
    pub async fn next(&mut self) -> Option<Ended<T>> {
        let joined = self.tasks.join_next_with_id().await?;
        Some(match joined {
            Ok((id, value)) => Ended { name: self.name(id), outcome: Ok(value) },
            Err(error) => {
                let name = self.name(error.id());
                let message = match error.try_into_panic() {
                    Ok(payload) => panic_message(payload.as_ref()),
                    Err(error) => error.to_string(),
                };
                Ended { name, outcome: Err(message) }
            }
        })
    }

    /// Whether the task `name` still runs.
    pub fn is_running(&self, name: &str) -> bool {
        self.names.values().any(|(n, _)| *n == name)
    }

    /// Asks the task `name` to stop (at its next await); [`Self::join`] waits for it.
    pub fn abort(&mut self, name: &str) {
        self.names.values().filter(|(n, _)| *n == name).for_each(|(_, handle)| handle.abort());
    }

    /// Waits until the task `name` has ended (at once if it has). Tasks ending meanwhile are
    /// passed over: this is for shutting down in order, once the outcome is decided.
    pub async fn join(&mut self, name: &str) {
        while self.is_running(name) {
            if self.next().await.is_none() {
                return;
            }
        }
    }

    /// Stops every task.
    pub fn abort_all(&mut self) {
        self.tasks.abort_all();
    }

    fn name(&mut self, id: Id) -> &'static str {
        self.names.remove(&id).map_or("unnamed", |(name, _)| name)
    }
}

impl Supervisor<()> {
    /// Resolves when a task ends, saying which and how; never while all run (nor when there are
    /// none).
    pub async fn failure(&mut self) -> TaskFailure {
        match self.next().await {
            None => std::future::pending().await,
            Some(Ended { name, outcome: Ok(()) }) => TaskFailure::Ended { name },
            Some(Ended { name, outcome: Err(message) }) => TaskFailure::Panicked { name, message },
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_panicking_task_is_named_with_its_message() {
        let mut supervisor = Supervisor::new();
        supervisor.spawn("forever", std::future::pending());
        supervisor.spawn("stream loop", async {
            tokio::task::yield_now().await;
            panic!("bad update");
        });
        assert_eq!(
            supervisor.failure().await,
            TaskFailure::Panicked { name: "stream loop", message: "bad update".into() }
        );
    }

    #[tokio::test]
    async fn a_task_that_returns_is_a_failure_too() {
        let mut supervisor = Supervisor::new();
        supervisor.spawn("health listener", async {});
        assert_eq!(supervisor.failure().await, TaskFailure::Ended { name: "health listener" });
        assert_eq!(
            TaskFailure::Ended { name: "health listener" }.to_string(),
            "task health listener ended unexpectedly"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_reported_while_every_task_runs() {
        let mut supervisor = Supervisor::new();
        supervisor.spawn("forever", std::future::pending());
        let waited = tokio::time::timeout(Duration::from_secs(3600), supervisor.failure()).await;
        assert!(waited.is_err(), "no failure while the task runs");
        let mut empty = Supervisor::new();
        assert!(tokio::time::timeout(Duration::from_secs(1), empty.failure()).await.is_err());
    }

    #[tokio::test]
    async fn tasks_return_their_outcome_and_can_be_joined_by_name() {
        let mut supervisor: Supervisor<Result<(), String>> = Supervisor::new();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        supervisor.spawn("webhook", async { Err("port in use".to_owned()) });
        supervisor.spawn("lease", async move {
            let _ = released.await;
            Ok(())
        });
        let first = supervisor.next().await.expect("a task ended");
        assert_eq!((first.name, first.outcome), ("webhook", Ok(Err("port in use".to_owned()))));
        assert!(supervisor.is_running("lease") && !supervisor.is_running("webhook"));
        supervisor.join("webhook").await;
        supervisor.spawn("controllers", std::future::pending());
        supervisor.abort("controllers");
        supervisor.join("controllers").await;
        assert!(!supervisor.is_running("controllers"));
        let _ = release.send(());
        supervisor.join("lease").await;
        assert!(!supervisor.is_running("lease"));
        assert!(supervisor.next().await.is_none(), "none left");
    }
}
