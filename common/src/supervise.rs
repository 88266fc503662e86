//! Long-lived tasks, supervised: each has a name, and the first one to end (return or panic)
//! is reported as a [`TaskFailure`], so its owner can stop with a clear error instead of running
//! on without it.

use std::collections::HashMap;
use std::future::Future;

use tokio::task::{Id, JoinSet};

/// A supervised task ended.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TaskFailure {
    #[error("task {name} panicked: {message}")]
    Panicked { name: &'static str, message: String },
    #[error("task {name} ended unexpectedly")]
    Ended { name: &'static str },
}

/// Tasks that should run until their owner stops them. Dropping the supervisor aborts them.
#[derive(Default)]
pub struct Supervisor {
    tasks: JoinSet<()>,
    names: HashMap<Id, &'static str>,
}

impl Supervisor {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Resolves when a task ends, saying which and how; never while all run (nor when there are
    /// none).
    pub async fn failure(&mut self) -> TaskFailure {
        let Some(joined) = self.tasks.join_next_with_id().await else {
            return std::future::pending().await;
        };
        match joined {
            Ok((id, ())) => TaskFailure::Ended { name: self.name(id) },
            Err(error) => {
                let name = self.name(error.id());
                let message = match error.try_into_panic() {
                    Ok(payload) => panic_message(payload.as_ref()),
                    Err(error) => error.to_string(),
                };
                TaskFailure::Panicked { name, message }
            }
        }
    }

    /// Stops every task.
    pub fn abort_all(&mut self) {
        self.tasks.abort_all();
    }

    fn name(&mut self, id: Id) -> &'static str {
        self.names.remove(&id).unwrap_or("unnamed")
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
}
