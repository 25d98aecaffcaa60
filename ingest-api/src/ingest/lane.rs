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
//! thread in order of arrival, each tenant with at most `lane_tenant_bodies` in the lane at
//! once: its next ones wait outside the lane, so that one tenant's bodies cannot fill the
//! queue before another's. A waiting body is one whose request is still open: it holds its
//! request's share of the in-flight budget ([`crate::shed`]), and when its request is dropped
//! the body is let go of at once (its place in the lane is given back once the lane has
//! passed it). Smaller bodies are worked on where they are, as before.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use shared::per_tenant::PerTenant;
use shared::tenant::TenantId;

type Job = Box<dyn FnOnce() + Send>;

/// The lane: where large bodies are worked on.
#[derive(Clone)]
pub struct Lane {
    jobs: mpsc::Sender<Job>,
    min_bytes: usize,
    /// Each tenant's places in the lane (its bodies waiting there or being worked on).
    places: PerTenant,
}

/// How much lower than the runtime's threads the lane's threads run (a nice value).
const NICENESS: i32 = 10;

impl Lane {
    /// A lane of `threads` threads for bodies of at least `min_bytes`, holding at most
    /// `per_tenant` bodies of one tenant at once; its threads end when the last clone of the
    /// lane is dropped.
    pub fn start(threads: usize, min_bytes: usize, per_tenant: usize) -> Lane {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("large-body-{i}"))
                .spawn(move || {
                    lower_priority();
                    // One job at a time; the lock is held only to take the next one (a
                    // `while let` would hold it while the job runs).
                    loop {
                        let Ok(job) = locked(&queue).recv() else {
                            break;
                        };
                        job();
                    }
                })
                .expect("the lane's threads start");
        }
        Lane {
            jobs,
            min_bytes,
            places: PerTenant::new(per_tenant),
        }
    }

    /// Whether a body of `size` bytes goes to the lane.
    pub fn takes(&self, size: usize) -> bool {
        size >= self.min_bytes
    }

    /// The least size of a body that goes to the lane.
    pub fn min_bytes(&self) -> usize {
        self.min_bytes
    }

    /// `work`'s answer for `tenant`, worked out on a lane thread once one is free (a panic in
    /// `work` resumes in the caller). While the tenant already has `per_tenant` bodies in the
    /// lane, `work` waits for one of them to be done before it joins the lane. If the caller
    /// stops waiting (its request was dropped) before `work` starts, `work` (and the body it
    /// holds) is dropped at once, not when its turn comes.
    pub async fn run<T, F>(&self, tenant: TenantId, work: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        // The place is given back once the job has run, or been skipped: a tenant's dropped
        // requests hold its places until the lane has passed them.
        let place = self.places.acquire(tenant, 1).await;
        let work = Abandon(Arc::new(Mutex::new(Some(work))));
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new({
            let work = work.0.clone();
            move || {
                let Some(work) = locked(&work).take() else {
                    metrics::counter!("ingest_lane_skipped_total").increment(1);
                    return;
                };
                let answered = catch_unwind(AssertUnwindSafe(work));
                // Given back before the caller has its answer.
                drop(place);
                let _ = answer.send(answered);
            }
        });
        metrics::counter!("ingest_lane_bodies_total").increment(1);
        self.jobs
            .send(job)
            .expect("the lane's threads live as long as the lane");
        match answered
            .await
            .expect("a lane job answers its waiting caller")
        {
            Ok(value) => value,
            Err(panic) => resume_unwind(panic),
        }
    }

    /// `work`'s answer: worked out on the lane as one of `tenant`'s bodies when `large`
    /// ([`Lane::run`]), and here otherwise.
    pub async fn run_if<T, F>(&self, large: bool, tenant: TenantId, work: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        if large {
            self.run(tenant, work).await
        } else {
            work()
        }
    }
}

/// Work waiting for the lane, dropped with its caller unless the lane has taken it.
struct Abandon<F>(Arc<Mutex<Option<F>>>);

impl<F> Drop for Abandon<F> {
    fn drop(&mut self) {
        let work = locked(&self.0).take();
        drop(work);
    }
}

/// A lock whose holder cannot leave it inconsistent (a panic inside is caught apart).
fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
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

    fn tenant() -> TenantId {
        TenantId::new()
    }

    /// The lane's work runs on the lane's thread, not the caller's: on a runtime with a
    /// single thread, a lane job that blocks until told does not stop another task from
    /// running (that task is what tells it).
    #[tokio::test(flavor = "current_thread")]
    async fn large_bodies_leave_the_runtime_threads_free() {
        let lane = Lane::start(1, 100, 2);
        assert!(!lane.takes(99) && lane.takes(100));
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let job = tokio::spawn({
            let lane = lane.clone();
            async move {
                lane.run(tenant(), move || {
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
        let lane = Lane::start(1, 1, 2);
        let panicked = tokio::spawn({
            let lane = lane.clone();
            async move { lane.run(tenant(), || -> u8 { panic!("bad body") }).await }
        })
        .await;
        assert!(panicked.unwrap_err().is_panic());
        assert_eq!(lane.run(tenant(), || 7).await, 7);
    }

    /// Keeps the lane's one thread busy until the returned sender sends (or is dropped).
    async fn occupy(lane: &Lane) -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<()>) {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, busy) = tokio::sync::oneshot::channel();
        let job = tokio::spawn({
            let lane = lane.clone();
            async move {
                lane.run(tenant(), move || {
                    started.send(()).unwrap();
                    let _ = held.recv_timeout(Duration::from_secs(10));
                })
                .await
            }
        });
        busy.await.unwrap();
        (release, job)
    }

    /// A body waiting for the lane whose request is dropped is let go of at once, and its
    /// work is never run.
    #[tokio::test]
    async fn a_dropped_requests_body_is_let_go_of_at_once() {
        let lane = Lane::start(1, 1, 2);
        let (release, busy) = occupy(&lane).await;
        let body = Arc::new(vec![0u8; 1 << 20]);
        let (ran, ran_rx) = std::sync::mpsc::channel::<&str>();
        let queued = tokio::spawn({
            let (lane, body, ran) = (lane.clone(), body.clone(), ran.clone());
            async move {
                lane.run(tenant(), move || {
                    ran.send(if body.is_empty() { "" } else { "dropped" })
                })
                .await
            }
        });
        while !queued_in(&lane) {
            tokio::task::yield_now().await;
        }
        queued.abort();
        let _ = queued.await;
        // The lane's thread has not moved on, and the body is already let go of.
        assert_eq!(Arc::strong_count(&body), 1);
        release.send(()).unwrap();
        busy.await.unwrap();
        lane.run(tenant(), move || ran.send("next").unwrap()).await;
        assert_eq!(ran_rx.try_iter().collect::<Vec<_>>(), ["next"]);
    }

    /// Whether a body is in the lane besides the one being worked on.
    fn queued_in(lane: &Lane) -> bool {
        lane.places.held_in_all() > 1
    }

    /// A tenant has at most its places in the lane; its next body waits outside, and another
    /// tenant's body arriving after it goes ahead of it.
    #[tokio::test]
    async fn a_tenant_holds_at_most_its_places() {
        let lane = Lane::start(1, 1, 2);
        let (release, busy) = occupy(&lane).await;
        let (greedy, other) = (tenant(), tenant());
        let (order, ran) = std::sync::mpsc::channel::<&str>();
        let mut bodies = Vec::new();
        for (who, name) in [
            (greedy, "greedy 1"),
            (greedy, "greedy 2"),
            (greedy, "greedy 3"),
            (other, "other"),
        ] {
            let (lane, order) = (lane.clone(), order.clone());
            bodies.push(tokio::spawn(async move {
                lane.run(who, move || order.send(name).unwrap()).await
            }));
            // Each has joined the lane, or waits for a place, before the next comes.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(lane.places.held(greedy), 2, "greedy holds both its places");
        // A body that gives up waiting for a place is no longer counted.
        let gave_up = tokio::spawn({
            let lane = lane.clone();
            async move { lane.run(greedy, || unreachable!("never run")).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(lane.places.users(greedy), 4);
        gave_up.abort();
        let _ = gave_up.await;
        assert_eq!(lane.places.users(greedy), 3);
        release.send(()).unwrap();
        busy.await.unwrap();
        for body in bodies {
            body.await.unwrap();
        }
        assert_eq!(
            ran.try_iter().collect::<Vec<_>>(),
            ["greedy 1", "greedy 2", "other", "greedy 3"]
        );
        // Places are given back, and forgotten, once the tenant's bodies are done.
        assert_eq!(lane.places.tenants(), 0);
    }

    /// A lane of two threads works on two bodies at once: each of these two waits for the
    /// other to have started.
    #[tokio::test]
    async fn two_lane_threads_work_on_two_bodies_at_once() {
        let lane = Lane::start(2, 1, 2);
        let (a_started, a_seen) = std::sync::mpsc::channel::<()>();
        let (b_started, b_seen) = std::sync::mpsc::channel::<()>();
        let both = |started: std::sync::mpsc::Sender<()>, seen: std::sync::mpsc::Receiver<()>| {
            move || {
                started.send(()).unwrap();
                seen.recv_timeout(Duration::from_secs(10)).is_ok()
            }
        };
        let (a, b) = tokio::join!(
            lane.run(tenant(), both(a_started, b_seen)),
            lane.run(tenant(), both(b_started, a_seen)),
        );
        assert!(a && b, "the second body waited for the first");
    }

    /// The lane's threads run below the runtime's priority.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn lane_threads_run_at_a_lower_priority() {
        let lane = Lane::start(1, 1, 2);
        let ours = thread_nice().unwrap();
        let theirs = lane.run(tenant(), || thread_nice().unwrap()).await;
        assert_eq!(theirs, (ours + NICENESS).min(19));
    }
}
