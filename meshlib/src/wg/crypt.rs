//! Crypto across cores for one busy peer, its packets kept in order
//! (wireguard-go's design: a per-peer FIFO of batches that parallel workers
//! fill).
//!
//! A packet loop reads a batch (from the device, or from the UDP socket)
//! into a [`Job`], routes it and takes what needs the peer's `Tunn` lock on
//! its own thread (the session, and for sending one counter per packet, in
//! the order the packets are to leave), puts the job at the back of its
//! [`Lane`]'s FIFO and hands it to the pool. A worker seals or opens the
//! job's packets with no lock but the job's own; then whoever finished a
//! job (any worker) sends every finished job at the front of the FIFO, in
//! order, holding the lane's send token: so packets leave in the order they
//! were read, however the workers raced. A batch read while nothing is in
//! flight and small enough is processed on the loop's own thread (no
//! hand-off: an idle ping takes no extra thread hop).
//!
//! The pool's size is the engine's `crypto_workers` (0: no pool, every
//! packet is handled on its loop's thread, as before). Jobs are recycled:
//! at most [`Lane::cap`] per lane, the loop waits for one when all are in
//! flight (backpressure), and nothing is allocated per packet.
//!
//! Locks: the pool's queue, a lane's FIFO and free list are held only to
//! push or pop; a job's own mutex by the one thread working on or finishing
//! it; the send token is an atomic flag (never waited on), and no lock is
//! held across a send except the finishing state's, which only the token's
//! holder takes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

/// A batch of packets sealed or opened by a worker and then finished in
/// order.
pub(crate) trait Job: Send + 'static {
    /// What finishing needs (the engine's state, and across jobs e.g. the
    /// receive side's flow cursor), held by the lane.
    type Finish: Send + 'static;
    /// The crypto: runs on a worker with no other lock held.
    fn work(&mut self);
    /// Sends or writes the job's packets; jobs are finished in the order
    /// they were submitted.
    fn finish(&mut self, state: &mut Self::Finish);
    /// Empties the job for reuse (keeps its buffers).
    fn reset(&mut self);
}

type Task = Box<dyn FnOnce() + Send>;

/// The worker threads, shared by an engine's lanes.
pub(crate) struct Pool {
    queue: Mutex<VecDeque<Task>>,
    ready: Condvar,
    stop: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    size: usize,
}

/// How long an idle worker sleeps before looking at the stop flag again.
const IDLE: Duration = Duration::from_millis(200);

impl Pool {
    /// Starts `size` workers (none for 0).
    pub fn start(size: usize) -> std::io::Result<Arc<Self>> {
        let pool = Arc::new(Self {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            size,
        });
        for i in 0..size {
            let p = pool.clone();
            let handle = std::thread::Builder::new()
                .name(format!("wg-crypt{i}"))
                .spawn(move || p.run())?;
            pool.threads.lock().push(handle);
        }
        Ok(pool)
    }

    /// Number of workers.
    pub fn size(&self) -> usize {
        self.size
    }

    fn run(&self) {
        loop {
            let task = {
                let mut q = self.queue.lock();
                loop {
                    if let Some(t) = q.pop_front() {
                        break Some(t);
                    }
                    if self.stop.load(Ordering::Relaxed) {
                        break None;
                    }
                    self.ready.wait_for(&mut q, IDLE);
                }
            };
            match task {
                Some(t) => t(),
                None => return,
            }
        }
    }

    fn push(&self, task: Task) {
        self.queue.lock().push_back(task);
        self.ready.notify_one();
    }

    /// Stops the workers (after the tasks queued) and joins them.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.ready.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
    }

    /// Drops what is still queued (after [`Self::stop`] and once no loop
    /// submits: their tasks hold the lanes, which hold the engine).
    pub fn clear(&self) {
        let tasks = std::mem::take(&mut *self.queue.lock());
        drop(tasks);
    }
}

/// A submitted job: done once its crypto ran.
struct Slot<J> {
    done: AtomicBool,
    job: Mutex<Option<J>>,
}

/// One packet loop's ordered stream of jobs.
pub(crate) struct Lane<J: Job> {
    pool: Arc<Pool>,
    fifo: Mutex<VecDeque<Arc<Slot<J>>>>,
    /// Held (true) by the thread sending the front of the FIFO.
    token: AtomicBool,
    finish: Mutex<J::Finish>,
    /// Jobs submitted and not yet finished.
    in_flight: AtomicUsize,
    free: Mutex<Vec<J>>,
    freed: Condvar,
    /// Jobs made so far (at most `cap`).
    made: AtomicUsize,
    cap: usize,
    make: Box<dyn Fn() -> J + Send + Sync>,
}

impl<J: Job> Lane<J> {
    /// A lane on `pool`, its jobs made by `make` (at most two per worker
    /// and two more), finishing with `finish`.
    pub fn new(
        pool: Arc<Pool>,
        finish: J::Finish,
        make: impl Fn() -> J + Send + Sync + 'static,
    ) -> Arc<Self> {
        let cap = 2 * pool.size() + 2;
        Arc::new(Self {
            pool,
            fifo: Mutex::new(VecDeque::new()),
            token: AtomicBool::new(false),
            finish: Mutex::new(finish),
            in_flight: AtomicUsize::new(0),
            free: Mutex::new(Vec::new()),
            freed: Condvar::new(),
            made: AtomicUsize::new(0),
            cap,
            make: Box::new(make),
        })
    }

    /// Jobs this lane keeps at most.
    #[cfg(test)]
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// An empty job: a recycled one, a new one below the cap, or the next
    /// one finished (waits; `None` if the pool stops meanwhile).
    pub fn take(&self) -> Option<J> {
        let mut free = self.free.lock();
        loop {
            if let Some(j) = free.pop() {
                return Some(j);
            }
            if self.made.load(Ordering::Relaxed) < self.cap {
                self.made.fetch_add(1, Ordering::Relaxed);
                drop(free);
                return Some((self.make)());
            }
            if self.pool.stop.load(Ordering::Relaxed) {
                return None;
            }
            self.freed.wait_for(&mut free, IDLE);
        }
    }

    /// Gives back a job that was not submitted.
    pub fn give_back(&self, mut job: J) {
        job.reset();
        self.free.lock().push(job);
        self.freed.notify_one();
    }

    /// Whether nothing is in flight: a job run now with [`Self::run_here`]
    /// cannot overtake one.
    pub fn idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
    }

    /// Runs `job` on this thread (crypto and finish). Only while
    /// [`Self::idle`], from the one thread that submits to this lane.
    pub fn run_here(&self, mut job: J) {
        // A finisher may still be between its last send and giving the
        // token back: wait for it (a few instructions).
        let mut spins = 0u32;
        while self.token.swap(true, Ordering::SeqCst) {
            spins += 1;
            if spins > 64 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        job.work();
        job.finish(&mut self.finish.lock());
        self.token.store(false, Ordering::SeqCst);
        self.give_back(job);
    }

    /// Queues `job` for a worker; it is finished after every job submitted
    /// before it. From the one thread that submits to this lane.
    pub fn submit(self: &Arc<Self>, job: J) {
        let slot = Arc::new(Slot {
            done: AtomicBool::new(false),
            job: Mutex::new(Some(job)),
        });
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.fifo.lock().push_back(slot.clone());
        let lane = self.clone();
        self.pool.push(Box::new(move || {
            if let Some(job) = slot.job.lock().as_mut() {
                job.work();
            }
            slot.done.store(true, Ordering::SeqCst);
            lane.finish_ready();
        }));
    }

    /// Finishes the jobs at the front of the FIFO that are done, in order,
    /// unless another thread holds the token (it will see them: it looks
    /// again after giving the token back).
    fn finish_ready(&self) {
        loop {
            if self.token.swap(true, Ordering::SeqCst) {
                return;
            }
            loop {
                let next = {
                    let mut fifo = self.fifo.lock();
                    match fifo.front() {
                        Some(s) if s.done.load(Ordering::SeqCst) => fifo.pop_front(),
                        _ => None,
                    }
                };
                let Some(slot) = next else { break };
                let job = slot.job.lock().take();
                if let Some(mut job) = job {
                    job.finish(&mut self.finish.lock());
                    self.give_back(job);
                }
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
            self.token.store(false, Ordering::SeqCst);
            // A job finished while the token was held went unsent by its
            // worker: look once more.
            let again = self
                .fifo
                .lock()
                .front()
                .is_some_and(|s| s.done.load(Ordering::SeqCst));
            if !again {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job that records its number when finished, after a crypto step
    /// of varying length, so workers finish out of order.
    struct Numbered {
        n: u64,
        spin: u64,
    }

    impl Job for Numbered {
        type Finish = Vec<u64>;
        fn work(&mut self) {
            let mut x = self.n;
            for i in 0..self.spin {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            std::hint::black_box(x);
        }
        fn finish(&mut self, seen: &mut Vec<u64>) {
            seen.push(self.n);
        }
        fn reset(&mut self) {}
    }

    #[test]
    fn jobs_finish_in_submission_order_whatever_the_workers_do() {
        let pool = Pool::start(3).unwrap();
        let lane = Lane::<Numbered>::new(pool.clone(), Vec::new(), || Numbered { n: 0, spin: 0 });
        let mut expected = Vec::new();
        for n in 0..5000u64 {
            let mut job = lane.take().expect("a job");
            job.n = n;
            // Every seventh job is long, so later ones finish first.
            job.spin = if n % 7 == 0 { 20_000 } else { n % 50 };
            expected.push(n);
            if n % 500 == 499 && lane.idle() {
                lane.run_here(job);
            } else {
                lane.submit(job);
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !lane.idle() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(lane.idle(), "jobs still in flight");
        assert_eq!(*lane.finish.lock(), expected);
        assert!(lane.made.load(Ordering::Relaxed) <= lane.cap());
        pool.stop();
    }
}
