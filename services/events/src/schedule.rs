//! How a [`Consumer`] runs: records scheduled by key, retries that park instead of blocking,
//! offsets committed up to the lowest unfinished record.
//!
//! Two tasks. The *poller* owns the subscription: it polls, hands records over on a bounded
//! channel, and commits the offsets it is sent between polls (so no poll is ever cancelled
//! half-way, and commits never wait behind a slow handler). The *scheduler* (this module's
//! [`run`]) owns the state:
//!
//! - each key has a line: at most one of its records is in progress (ready, running or parked)
//!   and the later ones wait behind it in offset order;
//! - ready records run concurrently up to the consumer's concurrency, a batching handler's
//!   first tries in runs of up to [`RUN`] records in one transaction;
//! - a record whose try fails retryably is parked with a due time; when it is due it is tried
//!   again ahead of new work; its key's line waits, every other key goes on;
//! - each partition's committed offset stops below its lowest unfinished record, so a crash
//!   redelivers exactly what was not finished, and the inbox skips what was.
//!
//! Reading pauses while `max_outstanding` records are unfinished, which bounds memory when a
//! key stays parked for long.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bus::{Record, Subscription};
use crate::consumer::{Consumer, Handler, Outcome, Tried, keep_last};

/// Records asked of the bus per poll.
const POLL_MAX: usize = 64;
/// The most first tries applied in one transaction.
const RUN: usize = 64;
/// How long one poll may wait for records: also how soon the poller sees commits and a stop.
const POLL_WAIT: Duration = Duration::from_millis(100);
/// How long a finished record's offset may wait to be committed with others. A crash in that
/// window redelivers the records, and the inbox skips them.
const COMMIT_EVERY: Duration = Duration::from_millis(200);
/// How often the poller measures the lag.
const LAG_EVERY: Duration = Duration::from_secs(5);
/// How long a stopping consumer lets the tries in progress finish.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Offsets of one partition.
#[derive(Default)]
struct Flight {
    /// Offsets read and not finished.
    open: BTreeSet<i64>,
    /// The highest offset read.
    read_to: Option<i64>,
    /// The offset of the last record committed as done.
    committed_to: Option<i64>,
}

impl Flight {
    /// The offset every record up to which is finished, when it moved past the last commit.
    fn commit_point(&self) -> Option<i64> {
        let read_to = self.read_to?;
        let done_to = match self.open.first() {
            Some(lowest) => lowest - 1,
            None => read_to,
        };
        (done_to >= 0 && self.committed_to.is_none_or(|c| done_to > c)).then_some(done_to)
    }
}

/// A record that failed retryably and waits for its next try.
struct Parked {
    record: Record,
    /// Tries so far.
    tries: u32,
    since: Instant,
}

type Batch = Vec<(Record, u32, Tried)>;
type Running<'a> = FuturesUnordered<Pin<Box<dyn Future<Output = Batch> + Send + 'a>>>;

struct State {
    flights: HashMap<(String, i32), Flight>,
    /// Keys with a record in progress, and the records waiting behind it.
    lines: HashMap<String, VecDeque<Record>>,
    /// Records whose key's turn it is, with their tries so far.
    ready: VecDeque<(Record, u32)>,
    /// By due time (and a sequence number, for equal times).
    parked: BTreeMap<(Instant, u64), Parked>,
    parked_seq: u64,
    outstanding: usize,
}

impl State {
    fn new() -> Self {
        State {
            flights: HashMap::new(),
            lines: HashMap::new(),
            ready: VecDeque::new(),
            parked: BTreeMap::new(),
            parked_seq: 0,
            outstanding: 0,
        }
    }

    /// Takes a polled record: tracked for its offset, then ready or waiting behind its key.
    fn receive<H: Handler>(&mut self, consumer: &Consumer<H>, record: Record) {
        let flight = self
            .flights
            .entry((record.topic.clone(), record.partition))
            .or_default();
        flight.read_to = Some(
            flight
                .read_to
                .map_or(record.offset, |r| r.max(record.offset)),
        );
        // Of no interest to this handler (the type travels in a header): finished at once,
        // whatever its key is doing, since it has no effect to order.
        if record
            .header("event-type")
            .is_some_and(|t| !consumer.handler.wants(t))
        {
            return;
        }
        if !flight.open.insert(record.offset) {
            // Read again (a rebalance handed the partition back): the copy in progress finishes it.
            return;
        }
        self.outstanding += 1;
        match self.lines.get_mut(&record.key) {
            Some(waiting) => waiting.push_back(record),
            None => {
                self.lines.insert(record.key.clone(), VecDeque::new());
                self.ready.push_back((record, 0));
            }
        }
    }

    /// `record` is finished: its offset may be committed, and its key's next record is ready.
    fn finish(&mut self, record: &Record) {
        if let Some(f) = self
            .flights
            .get_mut(&(record.topic.clone(), record.partition))
            && f.open.remove(&record.offset)
        {
            self.outstanding -= 1;
        }
        if let Some(waiting) = self.lines.get_mut(&record.key) {
            match waiting.pop_front() {
                Some(next) => self.ready.push_back((next, 0)),
                None => {
                    self.lines.remove(&record.key);
                }
            }
        }
    }

    fn park(&mut self, record: Record, tries: u32, due: Instant) {
        self.parked_seq += 1;
        self.parked.insert(
            (due, self.parked_seq),
            Parked {
                record,
                tries,
                since: Instant::now(),
            },
        );
    }

    /// Moves the parked records that are due to the front of the ready queue.
    fn unpark_due(&mut self, now: Instant) {
        let mut due = Vec::new();
        while let Some(entry) = self.parked.first_entry() {
            if entry.key().0 > now {
                break;
            }
            due.push(entry.remove());
        }
        for p in due.into_iter().rev() {
            self.ready.push_front((p.record, p.tries));
        }
    }

    /// One record per partition whose committed offset can move, each at its new commit point.
    fn commits(&mut self) -> Vec<Record> {
        let mut out = Vec::new();
        for ((topic, partition), f) in &mut self.flights {
            if let Some(offset) = f.commit_point() {
                f.committed_to = Some(offset);
                out.push(Record {
                    topic: topic.clone(),
                    partition: *partition,
                    offset,
                    key: String::new(),
                    headers: Vec::new(),
                    payload: Vec::new(),
                    timestamp_ms: 0,
                });
            }
        }
        out
    }
}

/// Starts the tries that fit: retries one at a time, first tries of a batching handler in runs.
fn dispatch<'a, H: Handler>(
    consumer: &'a Consumer<H>,
    state: &mut State,
    running: &mut Running<'a>,
    shutdown: &'a CancellationToken,
) {
    while running.len() < consumer.concurrency {
        let Some((record, tries)) = state.ready.pop_front() else {
            return;
        };
        if tries == 0 && consumer.batches() {
            let mut run = vec![record];
            while run.len() < RUN && state.ready.front().is_some_and(|(_, t)| *t == 0) {
                if let Some((r, _)) = state.ready.pop_front() {
                    run.push(r);
                }
            }
            running.push(Box::pin(async move {
                let tried = consumer.try_run(&run, shutdown).await;
                run.into_iter().zip(tried).map(|(r, t)| (r, 1, t)).collect()
            }));
        } else {
            running.push(Box::pin(async move {
                let t = consumer.try_record(&record, tries + 1, shutdown).await;
                vec![(record, tries + 1, t)]
            }));
        }
    }
}

/// Takes the tries that came back.
fn settle<H: Handler>(consumer: &Consumer<H>, state: &mut State, batch: Batch) {
    let retries = &consumer.metrics.retries;
    for (record, tries, tried) in batch {
        match tried {
            Tried::Done(Outcome::Interrupted) => {}
            Tried::Done(outcome) => {
                if tries > 1 {
                    let label = match outcome {
                        Outcome::DeadLettered(_) => "dead_lettered",
                        _ => "applied",
                    };
                    retries.with_label_values(&[label]).inc();
                }
                state.finish(&record);
            }
            Tried::Retry(_) => {
                retries.with_label_values(&["parked"]).inc();
                let due = Instant::now() + consumer.retry.backoff(tries);
                state.park(record, tries, due);
            }
            // The try is not counted: an outage of our own storage spends none of the record's.
            Tried::Wait(_) => {
                retries.with_label_values(&["parked"]).inc();
                state.park(
                    record,
                    tries - 1,
                    Instant::now() + super::consumer::OUTAGE_WAIT,
                );
            }
        }
    }
}

fn gauges<H: Handler>(consumer: &Consumer<H>, state: &State) {
    let m = &consumer.metrics;
    m.parked
        .set(i64::try_from(state.parked.len()).unwrap_or(i64::MAX));
    m.outstanding
        .set(i64::try_from(state.outstanding).unwrap_or(i64::MAX));
    let oldest = state.parked.values().map(|p| p.since).min();
    m.parked_oldest.set(oldest.map_or(0, |s| {
        i64::try_from(s.elapsed().as_secs()).unwrap_or(i64::MAX)
    }));
}

/// Runs `consumer` on `sub` until `shutdown`; then lets the tries in progress finish (for a
/// short while) and commits what is finished.
pub(crate) async fn run<H: Handler>(
    consumer: &Consumer<H>,
    sub: Box<dyn Subscription>,
    shutdown: CancellationToken,
) {
    let name = consumer.handler.name().to_owned();
    let (records_tx, mut records_rx) = mpsc::channel::<Vec<Record>>(2);
    let (commit_tx, commit_rx) = mpsc::unbounded_channel::<Vec<Record>>();
    let poller = tokio::spawn(poll_loop(
        sub,
        name.clone(),
        records_tx,
        commit_rx,
        shutdown.clone(),
        consumer.metrics.lag.clone(),
    ));

    let mut state = State::new();
    let mut running: Running<'_> = FuturesUnordered::new();
    let mut next_commit: Option<Instant> = None;
    loop {
        dispatch(consumer, &mut state, &mut running, &shutdown);
        gauges(consumer, &state);
        let next_due = state.parked.keys().next().map(|(due, _)| *due);
        let room = state.outstanding < consumer.max_outstanding;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(batch) = running.next(), if !running.is_empty() => {
                settle(consumer, &mut state, batch);
                if next_commit.is_none() {
                    next_commit = Some(Instant::now() + COMMIT_EVERY);
                }
            }
            _ = sleep_until(next_due), if next_due.is_some() => {
                state.unpark_due(Instant::now());
            }
            _ = sleep_until(next_commit), if next_commit.is_some() => {
                next_commit = None;
                let commits = state.commits();
                if !commits.is_empty() && commit_tx.send(commits).is_err() {
                    break;
                }
            }
            recs = records_rx.recv(), if room => match recs {
                Some(recs) => {
                    for r in recs {
                        state.receive(consumer, r);
                    }
                    if next_commit.is_none() {
                        next_commit = Some(Instant::now() + COMMIT_EVERY);
                    }
                }
                // The poller stopped: only at shutdown.
                None => break,
            },
        }
    }
    drop(records_rx);
    // What is running finishes its try (a dead-letter publish gives up at the stop); what is
    // parked or waiting stays unfinished, and is read again after the restart.
    let _ = tokio::time::timeout(STOP_GRACE, async {
        while let Some(batch) = running.next().await {
            settle(consumer, &mut state, batch);
        }
    })
    .await;
    drop(running);
    let commits = state.commits();
    if !commits.is_empty() {
        let _ = commit_tx.send(commits);
    }
    drop(commit_tx);
    if let Err(e) = poller.await {
        tracing::warn!(consumer = %name, error = %e, "the poller task failed");
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Commits `pending`; what fails stays for the next call (the offsets are only ever ahead of
/// what is committed, so a later commit covers an earlier one).
async fn commit(name: &str, sub: &mut dyn Subscription, pending: &mut Vec<Record>) {
    if pending.is_empty() {
        return;
    }
    match sub.commit_all(pending).await {
        Ok(()) => pending.clear(),
        Err(e) => {
            tracing::warn!(consumer = %name, error = %e, "committing the offsets failed; retrying")
        }
    }
}

/// The poller: polls `sub` and sends what it reads on `records`; commits what arrives on
/// `commits` between polls. Stops polling at `shutdown` or when the scheduler stops taking
/// records, then commits what the scheduler still sends until it closes `commits`.
async fn poll_loop(
    mut sub: Box<dyn Subscription>,
    name: String,
    records: mpsc::Sender<Vec<Record>>,
    mut commits: mpsc::UnboundedReceiver<Vec<Record>>,
    shutdown: CancellationToken,
    lag: prometheus::IntGauge,
) {
    let mut pending: Vec<Record> = Vec::new();
    let mut lag_measured = Instant::now() - LAG_EVERY;
    'polling: while !shutdown.is_cancelled() {
        while let Ok(c) = commits.try_recv() {
            c.into_iter().for_each(|r| keep_last(&mut pending, r));
        }
        commit(&name, &mut *sub, &mut pending).await;
        if lag_measured.elapsed() >= LAG_EVERY {
            lag_measured = Instant::now();
            if let Some(l) = sub.lag().await {
                lag.set(l);
            }
        }
        let recs = match sub.poll(POLL_MAX, POLL_WAIT).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(consumer = %name, error = %e, "polling the event bus failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
        };
        if recs.is_empty() {
            continue;
        }
        // Wait for room, committing meanwhile: the scheduler may be at its bound for a while.
        loop {
            tokio::select! {
                permit = records.reserve() => match permit {
                    Ok(p) => {
                        p.send(recs);
                        continue 'polling;
                    }
                    Err(_) => break 'polling,
                },
                c = commits.recv() => match c {
                    Some(c) => {
                        c.into_iter().for_each(|r| keep_last(&mut pending, r));
                        commit(&name, &mut *sub, &mut pending).await;
                    }
                    None => break 'polling,
                },
            }
        }
    }
    drop(records);
    while let Some(c) = commits.recv().await {
        c.into_iter().for_each(|r| keep_last(&mut pending, r));
    }
    commit(&name, &mut *sub, &mut pending).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(partition: i32, offset: i64) -> Record {
        Record {
            topic: "t".into(),
            partition,
            offset,
            key: String::new(),
            headers: Vec::new(),
            payload: Vec::new(),
            timestamp_ms: 0,
        }
    }

    #[test]
    fn commit_point_stops_below_the_lowest_unfinished() {
        let mut f = Flight::default();
        assert_eq!(f.commit_point(), None);
        f.read_to = Some(9);
        f.open.extend([3, 7]);
        assert_eq!(f.commit_point(), Some(2));
        f.committed_to = Some(2);
        assert_eq!(f.commit_point(), None, "nothing new to commit");
        f.open.remove(&3);
        assert_eq!(f.commit_point(), Some(6));
        f.open.remove(&7);
        assert_eq!(f.commit_point(), Some(9));
        // Offset 0 unfinished: nothing can be committed.
        let f = Flight {
            open: [0].into(),
            read_to: Some(5),
            committed_to: None,
        };
        assert_eq!(f.commit_point(), None);
    }

    #[test]
    fn parked_records_come_back_in_due_order_ahead_of_new_work() {
        let mut s = State::new();
        let now = Instant::now();
        s.ready.push_back((rec(0, 9), 0));
        s.park(rec(0, 1), 1, now + Duration::from_millis(20));
        s.park(rec(0, 2), 2, now + Duration::from_millis(10));
        s.park(rec(0, 3), 1, now + Duration::from_secs(60));
        s.unpark_due(now + Duration::from_millis(30));
        let order: Vec<(i64, u32)> = s.ready.iter().map(|(r, t)| (r.offset, *t)).collect();
        assert_eq!(order, [(2, 2), (1, 1), (9, 0)]);
        assert_eq!(s.parked.len(), 1);
    }
}
