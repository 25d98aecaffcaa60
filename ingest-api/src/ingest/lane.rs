//! The large-body lane.
//!
//! Inflating, checking, parsing and stamping a body is CPU work that a door does in one step
//! of its request's task. A 9 MB batch holds a thread for tens of milliseconds, and the
//! runtime has one thread per core: a few such bodies at once made every other request wait
//! behind them (a one-event request's p99 went from 10 to 50 ms beside 8 senders of 9 MB
//! batches; `tests/clients/big_bodies.py`).
//!
//! A body of at least `lane_min_bytes` (as sent, or once inflating it passes that) is
//! therefore worked on by one of the lane's own threads (`lane_threads`), which run at a lower
//! priority than the runtime's (nice +10, where the system allows it). Bodies wait for a lane
//! thread in order of arrival; a waiting body still holds its share of the in-flight budget
//! ([`crate::shed`]), which bounds the queue. Smaller bodies are worked on where they are, as
//! before. A request whose sender has gone by the time its body's turn comes is skipped.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// The lane: where large bodies are worked on.
#[derive(Clone)]
pub struct Lane {
    jobs: mpsc::Sender<Job>,
    min_bytes: usize,
}

/// How much lower than the runtime's threads the lane's threads run (a nice value).
const NICENESS: i32 = 10;

impl Lane {
    /// A lane of `threads` threads for bodies of at least `min_bytes`; its threads end when
    /// the last clone of the lane is dropped.
    pub fn start(threads: usize, min_bytes: usize) -> Lane {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("large-body-{i}"))
                .spawn(move || {
                    lower_priority();
                    // One job at a time; the lock is held only to take the next one.
                    while let Ok(job) = {
                        let next = queue.lock().unwrap_or_else(|e| e.into_inner());
                        next.recv()
                    } {
                        job();
                    }
                })
                .expect("the lane's threads start");
        }
        Lane { jobs, min_bytes }
    }

    /// Whether a body of `size` bytes goes to the lane.
    pub fn takes(&self, size: usize) -> bool {
        size >= self.min_bytes
    }

    /// The least size of a body that goes to the lane.
    pub fn min_bytes(&self) -> usize {
        self.min_bytes
    }

    /// `work`'s answer, worked out on a lane thread once one is free (a panic in `work`
    /// resumes in the caller). If the caller stops waiting (its request was dropped) before
    /// `work` starts, `work` is not run.
    pub async fn run<T, F>(&self, work: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if answer.is_closed() {
                metrics::counter!("ingest_lane_skipped_total").increment(1);
                return;
            }
            let _ = answer.send(catch_unwind(AssertUnwindSafe(work)));
        });
        metrics::counter!("ingest_lane_bodies_total").increment(1);
        self.jobs
            .send(job)
            .expect("the lane's threads live as long as the lane");
        match answered.await.expect("a lane job answers once it has run") {
            Ok(value) => value,
            Err(panic) => resume_unwind(panic),
        }
    }
}

/// Lowers the calling thread's priority by [`NICENESS`] (Linux applies a nice value to the
/// one thread named by its id). Where that is refused, the thread keeps the runtime's.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    if let Ok(now) = thread_nice() {
        let tid = rustix::thread::gettid();
        let _ = rustix::process::setpriority_process(Some(tid), now + NICENESS);
    }
}

/// The calling thread's nice value.
#[cfg(target_os = "linux")]
fn thread_nice() -> rustix::io::Result<i32> {
    rustix::process::getpriority_process(Some(rustix::thread::gettid()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The lane's work runs on the lane's thread, not the caller's: on a runtime with a
    /// single thread, a lane job that blocks until told does not stop another task from
    /// running (that task is what tells it).
    #[tokio::test(flavor = "current_thread")]
    async fn large_bodies_leave_the_runtime_threads_free() {
        let lane = Lane::start(1, 100);
        assert!(!lane.takes(99) && lane.takes(100));
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let job = tokio::spawn({
            let lane = lane.clone();
            async move {
                lane.run(move || {
                    wait.recv_timeout(Duration::from_secs(10))
                        .expect("the runtime's other task ran while this blocked");
                    std::thread::current().name().map(str::to_string)
                })
                .await
            }
        });
        tokio::task::yield_now().await;
        go.send(()).unwrap();
        let ran_on = job.await.unwrap();
        assert_eq!(ran_on.as_deref(), Some("large-body-0"));
    }

    /// A panic in the lane's work is the caller's, and the lane goes on working.
    #[tokio::test]
    async fn a_panic_is_the_callers_and_the_lane_goes_on() {
        let lane = Lane::start(1, 1);
        let panicked = tokio::spawn({
            let lane = lane.clone();
            async move { lane.run(|| -> u8 { panic!("bad body") }).await }
        })
        .await;
        assert!(panicked.unwrap_err().is_panic());
        assert_eq!(lane.run(|| 7).await, 7);
    }

    /// Work whose caller stopped waiting before its turn is not run.
    #[tokio::test]
    async fn work_of_a_dropped_request_is_skipped() {
        let lane = Lane::start(1, 1);
        let (hold, held) = std::sync::mpsc::channel::<()>();
        let (ran, ran_rx) = std::sync::mpsc::channel::<&str>();
        let (started, busy_now) = tokio::sync::oneshot::channel();
        // The lane's one thread is busy until `hold` sends.
        let busy = tokio::spawn({
            let lane = lane.clone();
            async move {
                lane.run(move || {
                    started.send(()).unwrap();
                    held.recv_timeout(Duration::from_secs(10))
                })
                .await
            }
        });
        busy_now.await.unwrap();
        let queued = tokio::spawn({
            let lane = lane.clone();
            let ran = ran.clone();
            async move { lane.run(move || ran.send("dropped").unwrap()).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        queued.abort();
        let _ = queued.await;
        hold.send(()).unwrap();
        busy.await.unwrap().unwrap();
        lane.run(move || ran.send("next").unwrap()).await;
        assert_eq!(ran_rx.try_iter().collect::<Vec<_>>(), ["next"]);
    }

    /// The lane's threads run below the runtime's priority.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn lane_threads_run_at_a_lower_priority() {
        let lane = Lane::start(1, 1);
        let ours = thread_nice().unwrap();
        let theirs = lane.run(|| thread_nice().unwrap()).await;
        assert_eq!(theirs, (ours + NICENESS).min(19));
    }
}
