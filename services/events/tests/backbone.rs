//! The event backbone end to end: outbox, relay, embedded log, consumer with inbox, dead letters.
//! Runs with the consumer's database on SQLite and on the local PostgreSQL.

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use shopverse_events::bus::{BusError, EventBus, OutRecord, Record, Subscription};
use shopverse_events::consumer::{Consumer, Handler, HandlerError, Outcome, RetryPolicy, Tried};
use shopverse_events::embedded::EmbeddedLog;
use shopverse_events::envelope::{Envelope, Origin, USER_REGISTERED, new_envelope};
use shopverse_events::kafka::{KafkaBus, KafkaConfig};
use shopverse_events::outbox::{Relay, enqueue};
use shopverse_events::{MIGRATIONS, dlq};
use shopverse_kit::CancellationToken;
use shopverse_kit::testing::PgTestDb;
use shopverse_proto::users::v1::UserRegistered;
use shopverse_storage::Db;

const APP_MIGRATIONS: &[shopverse_storage::MigrationSpec] = &[(
    1,
    "test tables",
    "CREATE TABLE things (id TEXT PRIMARY KEY); CREATE TABLE effects (event_id TEXT NOT NULL, subject TEXT NOT NULL);",
)];

/// Publishes the first `publish_first` records of a batch, then fails: a relay that dies mid-batch.
struct DiesMidBatch {
    inner: Arc<dyn EventBus>,
    publish_first: usize,
}

#[async_trait]
impl EventBus for DiesMidBatch {
    async fn ensure_topics(&self, t: &[&str]) -> Result<(), BusError> {
        self.inner.ensure_topics(t).await
    }
    async fn publish(&self, records: &[OutRecord]) -> Result<(), BusError> {
        let n = self.publish_first.min(records.len());
        self.inner.publish(&records[..n]).await?;
        Err(BusError::Unavailable("connection reset mid-batch".into()))
    }
    async fn subscribe(&self, g: &str, t: &[String]) -> Result<Box<dyn Subscription>, BusError> {
        self.inner.subscribe(g, t).await
    }
    async fn topics(&self) -> Result<Vec<String>, BusError> {
        self.inner.topics().await
    }
    async fn partitions(&self, t: &str) -> Result<i32, BusError> {
        self.inner.partitions(t).await
    }
    async fn fetch(&self, t: &str, p: i32, o: i64, m: usize) -> Result<Vec<Record>, BusError> {
        self.inner.fetch(t, p, o, m).await
    }
    async fn committed(&self, g: &str, t: &str, p: i32) -> Result<i64, BusError> {
        self.inner.committed(g, t, p).await
    }
    async fn commit_offset(&self, g: &str, t: &str, p: i32, o: i64) -> Result<(), BusError> {
        self.inner.commit_offset(g, t, p, o).await
    }
    async fn end_offset(&self, t: &str, p: i32) -> Result<i64, BusError> {
        self.inner.end_offset(t, p).await
    }
}

/// Records each applied event in `effects`; fails as told.
struct Recorder {
    name: String,
    /// Subjects that always fail permanently.
    poison_subject: Option<String>,
    /// Fail (retryably) while this is set.
    broken: Arc<AtomicBool>,
    calls: Arc<AtomicU32>,
    /// Whether it claims a prepare step: a handler without one gets runs of records in one
    /// transaction.
    prepares: bool,
}

impl Recorder {
    fn new(name: &str, poison_subject: Option<&str>, prepares: bool) -> Recorder {
        Recorder {
            name: name.into(),
            poison_subject: poison_subject.map(str::to_owned),
            broken: Arc::new(AtomicBool::new(false)),
            calls: Arc::new(AtomicU32::new(0)),
            prepares,
        }
    }
}

#[async_trait]
impl Handler for Recorder {
    fn name(&self) -> &str {
        &self.name
    }
    fn topics(&self) -> Vec<String> {
        vec![USER_REGISTERED.topic.to_owned()]
    }
    fn wants(&self, t: &str) -> bool {
        t == USER_REGISTERED.name
    }
    fn prepares(&self) -> bool {
        self.prepares
    }
    async fn handle(
        &self,
        conn: &mut sqlx::AnyConnection,
        ev: &Envelope,
    ) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.poison_subject.as_deref() == Some(ev.subject.as_str()) {
            return Err(HandlerError::Permanent("this subject is poison".into()));
        }
        if self.broken.load(Ordering::SeqCst) {
            return Err(HandlerError::Retryable("downstream is down".into()));
        }
        sqlx::query("INSERT INTO effects (event_id, subject) VALUES ($1, $2)")
            .bind(&ev.id)
            .bind(&ev.subject)
            .execute(conn)
            .await?;
        Ok(())
    }
}

async fn service_db(url: &str) -> Db {
    let db = Db::connect(url, 5).await.expect("connect");
    db.migrate(&[MIGRATIONS, APP_MIGRATIONS])
        .await
        .expect("migrations");
    db
}

async fn write_things(db: &Db, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("user-{i}");
        let mut tx = db.begin_write().await.expect("begin");
        sqlx::query("INSERT INTO things (id) VALUES ($1)")
            .bind(&id)
            .execute(&mut *tx)
            .await
            .expect("state change");
        let payload = UserRegistered {
            user_id: id.clone(),
            email: format!("{id}@example.com"),
            display_name: id.clone(),
        };
        let env = new_envelope(
            &USER_REGISTERED,
            "users",
            &id,
            1_700_000_000_000,
            Origin::NONE,
            &payload,
        );
        enqueue(&mut tx, &USER_REGISTERED, &env)
            .await
            .expect("enqueue");
        tx.commit().await.expect("commit");
        ids.push(id);
    }
    ids
}

/// Records in `topic`, counted by reading them all.
async fn log_len(log: &dyn EventBus, topic: &str) -> i64 {
    let mut n = 0;
    for p in 0..log.partitions(topic).await.expect("partitions") {
        let mut from = 0;
        loop {
            let got = log.fetch(topic, p, from, 500).await.expect("fetch");
            let Some(last) = got.last() else { break };
            from = last.offset + 1;
            n += got.len() as i64;
        }
    }
    n
}

async fn embedded(dir: &std::path::Path, partitions: i32) -> Arc<dyn EventBus> {
    Arc::new(
        EmbeddedLog::open(&format!("sqlite://{}/events.db", dir.display()), partitions)
            .await
            .expect("log"),
    )
}

/// A Kafka bus on the broker the test run provides, in a namespace of its own.
fn kafka(partitions: i32) -> Arc<dyn EventBus> {
    let brokers = std::env::var("SHOPVERSE_KAFKA_BROKERS").expect(
        "SHOPVERSE_KAFKA_BROKERS must name the Kafka broker for these tests (scripts/test starts one)",
    );
    let cfg = KafkaConfig {
        brokers,
        namespace: format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        session_timeout_ms: 6_000,
        ..Default::default()
    };
    Arc::new(KafkaBus::new(cfg, partitions, &prometheus::Registry::new()).expect("kafka bus"))
}

async fn relay_crash_then_exactly_once(bus: Arc<dyn EventBus>, db_url: &str, prepares: bool) {
    let log = bus.as_ref();
    let db = service_db(db_url).await;
    let registry = prometheus::Registry::new();
    write_things(&db, 50).await;

    // The relay dies after 30 of a 50-row batch reached the log, before marking any row sent.
    let dying: Arc<dyn EventBus> = Arc::new(DiesMidBatch {
        inner: bus.clone(),
        publish_first: 30,
    });
    let relay = Relay::new(db.clone(), dying, "test", &registry).with_batch_size(50);
    assert!(relay.publish_batch().await.is_err());
    assert_eq!(
        relay.backlog().await.expect("backlog"),
        50,
        "nothing marked sent"
    );
    assert_eq!(log_len(log, USER_REGISTERED.topic).await, 30);

    // Restarted, it publishes every row (the first 30 a second time).
    let relay = Relay::new(db.clone(), bus.clone(), "test", &registry).with_batch_size(20);
    let mut total = 0;
    loop {
        let n = relay.publish_batch().await.expect("publish");
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, 50);
    assert_eq!(relay.backlog().await.expect("backlog"), 0);
    assert_eq!(log_len(log, USER_REGISTERED.topic).await, 80);

    // The consumer sees 80 records and applies 50 effects, one per event (with no prepare
    // step, a poll's records in one transaction, a record's second copy often in the same
    // run as its first).
    let handler = Arc::new(Recorder::new("recorder", None, prepares));
    let consumer = Consumer::new(handler.clone(), db.clone(), bus.clone(), &registry);
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone()));
    wait_until_caught_up(log, "recorder", USER_REGISTERED.topic).await;
    stop.cancel();
    task.await.expect("join").expect("consumer");

    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT event_id) FROM effects")
            .fetch_one(db.pool())
            .await
            .expect("count");
    assert_eq!((rows, distinct), (50, 50));
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        50,
        "duplicates never reach the handler"
    );
    db.close().await;
}

async fn wait_until_caught_up(log: &dyn EventBus, group: &str, topic: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut behind = 0;
        for p in 0..log.partitions(topic).await.expect("partitions") {
            let end = log.end_offset(topic, p).await.expect("end offset");
            behind += end - log.committed(group, topic, p).await.expect("committed");
        }
        if behind == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "consumer still {behind} behind"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn relay_stopped_mid_batch_then_each_event_applied_once_sqlite() {
    for prepares in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        relay_crash_then_exactly_once(
            embedded(dir.path(), 3).await,
            &format!("sqlite://{}/svc.db", dir.path().display()),
            prepares,
        )
        .await;
    }
}

#[tokio::test]
async fn relay_stopped_mid_batch_then_each_event_applied_once_postgres() {
    for prepares in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let pg = PgTestDb::create()
            .await
            .expect("PostgreSQL at 127.0.0.1:5432 (see README)");
        relay_crash_then_exactly_once(embedded(dir.path(), 3).await, &pg.url, prepares).await;
        pg.drop_db().await.expect("drop test database");
    }
}

#[tokio::test]
async fn relay_stopped_mid_batch_then_each_event_applied_once_kafka_postgres() {
    let pg = PgTestDb::create()
        .await
        .expect("PostgreSQL at 127.0.0.1:5432 (see README)");
    relay_crash_then_exactly_once(kafka(3), &pg.url, false).await;
    pg.drop_db().await.expect("drop test database");
}

#[tokio::test]
async fn failures_retry_then_dead_letter_and_replay_embedded() {
    let dir = tempfile::tempdir().expect("tempdir");
    dead_letters_and_replay(embedded(dir.path(), 2).await, dir.path()).await;
}

#[tokio::test]
async fn failures_retry_then_dead_letter_and_replay_kafka() {
    let dir = tempfile::tempdir().expect("tempdir");
    dead_letters_and_replay(kafka(2), dir.path()).await;
}

/// An envelope of a type, or a schema version, this build does not know.
fn unknown_event(kind: &str, version: u32) -> OutRecord {
    let mut env = new_envelope(
        &USER_REGISTERED,
        "users",
        "user-x",
        1_700_000_000_000,
        Origin::NONE,
        &UserRegistered::default(),
    );
    env.r#type = kind.into();
    env.schema_version = version;
    OutRecord {
        topic: USER_REGISTERED.topic.into(),
        key: format!("{kind}-{version}"),
        headers: vec![],
        payload: prost::Message::encode_to_vec(&env),
    }
}

/// Runs `handler` as a consumer (fast retries, 3 attempts) until it has caught up with the
/// users topic.
async fn consume_until_caught_up(handler: Arc<Recorder>, db: &Db, bus: &Arc<dyn EventBus>) {
    let retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
    };
    let registry = prometheus::Registry::new();
    let consumer = Consumer::new(handler, db.clone(), bus.clone(), &registry).with_retry(retry);
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone()));
    wait_until_caught_up(bus.as_ref(), "flaky", USER_REGISTERED.topic).await;
    stop.cancel();
    task.await.expect("join").expect("consumer");
}

/// Each reason a record is parked, said in the DLQ: unknown type, future schema, undecodable,
/// poison (once), retries given up (twice); all on the users DLQ, none replayed yet.
fn parked_for_each_reason(parked: &[dlq::DeadLetter]) {
    assert_eq!(parked.len(), 6, "{parked:?}");
    let any = |f: &dyn Fn(&dlq::DeadLetter) -> bool| parked.iter().any(f);
    assert!(any(
        &|d| d.event_type == "user.teleported" && d.reason.contains("not one we know")
    ));
    assert!(
        any(&|d| d.reason.contains("schema version 99")),
        "{parked:?}"
    );
    let undecodable = |d: &dlq::DeadLetter| {
        d.event_type == "(undecodable)" && d.reason.contains("undecodable envelope")
    };
    assert!(any(&undecodable), "{parked:?}");
    assert!(
        any(&|d| d.reason.contains("poison") && d.attempts == 1),
        "{parked:?}"
    );
    let gave_up = parked
        .iter()
        .filter(|d| d.reason.contains("gave up after 3 attempts"));
    assert_eq!(gave_up.count(), 2, "{parked:?}");
    let unreplayed = |d: &dlq::DeadLetter| d.dlq_topic == "shopverse.users.dlq" && !d.replayed;
    assert!(parked.iter().all(unreplayed), "{parked:?}");
}

async fn dead_letters_and_replay(bus: Arc<dyn EventBus>, dir: &std::path::Path) {
    let log = bus.as_ref();
    let db = service_db(&format!("sqlite://{}/svc.db", dir.display())).await;
    write_things(&db, 3).await;
    let relay = Relay::new(db.clone(), bus.clone(), "t", &prometheus::Registry::new());
    relay.publish_batch().await.expect("publish");
    // And one record nobody can decode, one of an unknown type, one of a future schema.
    let junk = OutRecord {
        topic: USER_REGISTERED.topic.into(),
        key: "junk".into(),
        headers: vec![],
        payload: vec![0xff, 0xff, 0xff],
    };
    let teleported = unknown_event("user.teleported", 1);
    let future = unknown_event(USER_REGISTERED.name, 99);
    log.publish(&[junk, teleported, future])
        .await
        .expect("publish junk");

    let broken = Arc::new(AtomicBool::new(true));
    let handler = Arc::new(Recorder {
        broken: broken.clone(),
        ..Recorder::new("flaky", Some("user-1"), true)
    });
    consume_until_caught_up(handler.clone(), &db, &bus).await;
    // user-0 and user-2: 3 attempts each; user-1: once (permanent); the junk and the unknown
    // never reach the handler.
    assert_eq!(handler.calls.load(Ordering::SeqCst), 7);
    parked_for_each_reason(&dlq::list(log, None).await.expect("list"));

    // Fixed downstream; replay everything parked: the two retryable ones now apply.
    broken.store(false, Ordering::SeqCst);
    let replayed = dlq::replay(log, Some("shopverse.users"), None).await;
    assert_eq!(replayed.expect("replay").len(), 6);
    let listed = dlq::list(log, None).await.expect("list");
    assert!(listed.iter().all(|d| d.replayed));
    let again = dlq::replay(log, None, None).await.expect("replay again");
    assert!(again.is_empty(), "replays once");

    consume_until_caught_up(handler, &db, &bus).await;
    assert_eq!(effects(&db).await, ["user-0", "user-2"]);
    // The poison, the junk and the two unknown ones are parked again, each once more.
    assert_eq!(dlq::list(log, None).await.expect("list").len(), 10);
}

#[tokio::test]
async fn a_second_delivery_is_a_duplicate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (db, log, mut recs) = published_run(
        dir.path(),
        &format!("sqlite://{}/svc.db", dir.path().display()),
        1,
    )
    .await;
    let rec = recs.remove(0);
    let bus: Arc<dyn EventBus> = Arc::new(log);
    let handler = Arc::new(Recorder::new("once", None, true));
    let c = Consumer::new(handler, db.clone(), bus, &prometheus::Registry::new());
    let stop = CancellationToken::new();
    assert_eq!(
        c.try_record(&rec, 1, &stop).await,
        Tried::Done(Outcome::Applied)
    );
    assert_eq!(
        c.try_record(&rec, 1, &stop).await,
        Tried::Done(Outcome::Duplicate)
    );
}

/// `n` events in the log of a new service database (one partition), read back as records.
async fn published_run(
    dir: &std::path::Path,
    db_url: &str,
    n: usize,
) -> (Db, EmbeddedLog, Vec<Record>) {
    let log = EmbeddedLog::open(&format!("sqlite://{}/events.db", dir.display()), 1)
        .await
        .expect("log");
    let db = service_db(db_url).await;
    write_things(&db, n).await;
    let bus: Arc<dyn EventBus> = Arc::new(log.clone());
    Relay::new(db.clone(), bus, "t", &prometheus::Registry::new())
        .publish_batch()
        .await
        .expect("publish");
    let recs = log
        .fetch(USER_REGISTERED.topic, 0, 0, 100)
        .await
        .expect("fetch");
    assert_eq!(recs.len(), n);
    (db, log, recs)
}

async fn effects(db: &Db) -> Vec<String> {
    sqlx::query_scalar("SELECT subject FROM effects ORDER BY subject")
        .fetch_all(db.pool())
        .await
        .expect("effects")
}

/// A run of records through a handler with no prepare step: applied in one transaction, each
/// event once though two are delivered twice; and a poison event in the middle of a run undoes
/// the run, which is then handled record by record (the poison parked, the rest applied).
async fn runs_of_records(db_url_of: impl Fn(&std::path::Path) -> String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (db, log, mut recs) = published_run(dir.path(), &db_url_of(dir.path()), 5).await;
    recs.extend_from_within(..2);
    let handler = Arc::new(Recorder::new("runs", None, false));
    let c = Consumer::new(
        handler.clone(),
        db.clone(),
        Arc::new(log),
        &prometheus::Registry::new(),
    );
    let stop = CancellationToken::new();
    let tried = c.try_run(&recs, &stop).await;
    let applied = |o: &Tried| *o == Tried::Done(Outcome::Applied);
    assert_eq!(tried.len(), 7);
    assert_eq!(tried.iter().filter(|o| applied(o)).count(), 5, "{tried:?}");
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        5,
        "each event reaches the handler once"
    );
    assert_eq!(
        effects(&db).await,
        ["user-0", "user-1", "user-2", "user-3", "user-4"]
    );
    // Delivered again, the whole run is duplicates.
    let tried = c.try_run(&recs, &stop).await;
    assert!(
        tried.iter().all(|o| *o == Tried::Done(Outcome::Duplicate)),
        "{tried:?}"
    );
    assert_eq!(tried.len(), 7);
    assert_eq!(handler.calls.load(Ordering::SeqCst), 5);
    assert_eq!(effects(&db).await.len(), 5);
    db.close().await;

    let dir = tempfile::tempdir().expect("tempdir");
    let (db, log, recs) = published_run(dir.path(), &db_url_of(dir.path()), 5).await;
    let handler = Arc::new(Recorder::new("runs", Some("user-2"), false));
    let c = Consumer::new(
        handler.clone(),
        db.clone(),
        Arc::new(log.clone()),
        &prometheus::Registry::new(),
    );
    let tried = c.try_run(&recs, &stop).await;
    assert_eq!(tried.len(), 5);
    assert!(
        tried.iter().all(|o| matches!(o, Tried::Done(_))),
        "a poison event is finished (dead-lettered), not retried: {tried:?}"
    );
    // The run reached the poison (3 calls) and rolled back; then the two before it went as a
    // run, the poison alone, and the two after it as a run.
    assert_eq!(handler.calls.load(Ordering::SeqCst), 3 + 2 + 1 + 2);
    assert_eq!(effects(&db).await, ["user-0", "user-1", "user-3", "user-4"]);
    let parked = dlq::list(&log, None).await.expect("list");
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert!(parked[0].reason.contains("poison"), "{parked:?}");
    db.close().await;
}

#[tokio::test]
async fn a_run_of_records_is_applied_together_sqlite() {
    runs_of_records(|dir| format!("sqlite://{}/svc.db", dir.display())).await;
}

#[tokio::test]
async fn a_run_of_records_is_applied_together_postgres() {
    let mut dbs = Vec::new();
    for _ in 0..2 {
        dbs.push(
            PgTestDb::create()
                .await
                .expect("PostgreSQL at 127.0.0.1:5432 (see README)"),
        );
    }
    let urls = std::sync::Mutex::new(dbs.iter().map(|d| d.url.clone()).collect::<Vec<_>>());
    runs_of_records(|_| urls.lock().unwrap().remove(0)).await;
    for d in dbs {
        d.drop_db().await.expect("drop test database");
    }
}

/// Applies events in the order it is given them, failing the ones it is told to a number of
/// times first; each applied event is a row `subject/seq` in `effects`, in the order of the
/// commits (SQLite's rowid).
struct Sequencer {
    /// `subject/seq` -> retryable failures still to give; `u32::MAX`: always.
    failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    prepares: bool,
}

/// The events a [`Sequencer`] applied, in commit order: (subject, sequence number).
async fn applied(db: &Db) -> Vec<(String, u32)> {
    let rows: Vec<String> = sqlx::query_scalar("SELECT subject FROM effects ORDER BY rowid")
        .fetch_all(db.pool())
        .await
        .expect("effects");
    rows.iter()
        .map(|r| {
            let (k, s) = r.split_once('/').expect("subject/seq");
            (k.to_owned(), s.parse().expect("seq"))
        })
        .collect()
}

#[async_trait]
impl Handler for Sequencer {
    fn name(&self) -> &str {
        "sequencer"
    }
    fn topics(&self) -> Vec<String> {
        vec![USER_REGISTERED.topic.to_owned()]
    }
    fn wants(&self, t: &str) -> bool {
        t == USER_REGISTERED.name
    }
    fn prepares(&self) -> bool {
        self.prepares
    }
    async fn handle(
        &self,
        conn: &mut sqlx::AnyConnection,
        ev: &Envelope,
    ) -> Result<(), HandlerError> {
        let p: UserRegistered = shopverse_events::envelope::decode_payload(ev)
            .map_err(|e| HandlerError::Permanent(e.to_string()))?;
        let seq: u32 = p.display_name.parse().expect("sequence number");
        let tag = format!("{}/{seq}", ev.subject);
        if let Some(left) = self.failures.lock().unwrap().get_mut(&tag)
            && *left > 0
        {
            *left = left.saturating_sub(u32::from(*left != u32::MAX));
            return Err(HandlerError::Retryable(
                format!("{tag} is not ready").into(),
            ));
        }
        sqlx::query("INSERT INTO effects (event_id, subject) VALUES ($1, $2)")
            .bind(&ev.id)
            .bind(&tag)
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// Publishes `per_key` events for each of `keys`, interleaved (k0/0, k1/0, ..., k0/1, ...).
async fn publish_sequences(bus: &dyn EventBus, keys: &[&str], per_key: u32) {
    let mut out = Vec::new();
    for seq in 0..per_key {
        for key in keys {
            let payload = UserRegistered {
                user_id: (*key).into(),
                email: format!("{key}@example.com"),
                display_name: seq.to_string(),
            };
            let env = new_envelope(
                &USER_REGISTERED,
                "users",
                key,
                1_700_000_000_000,
                Origin::NONE,
                &payload,
            );
            out.push(OutRecord {
                topic: USER_REGISTERED.topic.into(),
                key: (*key).into(),
                headers: shopverse_events::outbox::envelope_headers(&env),
                payload: prost::Message::encode_to_vec(&env),
            });
        }
    }
    bus.publish(&out).await.expect("publish");
}

/// A key whose first event fails twice, and a poison key whose first event always fails, on one
/// partition with eight healthy keys: every other key's events are all applied before the
/// flaky key's first retry is even due; each key's events are applied in order, the flaky and
/// the poison key's later events after their first (the poison one dead-lettered).
async fn parking_keeps_key_order(bus: Arc<dyn EventBus>, db_url: &str, prepares: bool) {
    let db = service_db(db_url).await;
    let keys = [
        "flaky", "k1", "k2", "poison", "k4", "k5", "k6", "k7", "k8", "k9",
    ];
    let per_key = 4;
    publish_sequences(bus.as_ref(), &keys, per_key).await;
    let handler = Arc::new(Sequencer {
        failures: std::sync::Mutex::new(
            [("flaky/0".to_owned(), 2), ("poison/0".to_owned(), u32::MAX)].into(),
        ),
        prepares,
    });
    // The first retry is due two seconds after the failure: far longer than the other 38
    // events take, however slow the machine.
    let retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_secs(2),
        max_backoff: Duration::from_secs(2),
    };
    let consumer = Consumer::new(
        handler.clone(),
        db.clone(),
        bus.clone(),
        &prometheus::Registry::new(),
    )
    .with_retry(retry);
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone()));
    wait_until_caught_up(bus.as_ref(), "sequencer", USER_REGISTERED.topic).await;
    stop.cancel();
    task.await.expect("join").expect("consumer");

    let applied = applied(&db).await;
    for key in keys {
        let seqs: Vec<u32> = applied
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, s)| *s)
            .collect();
        let want: Vec<u32> = if key == "poison" {
            (1..per_key).collect()
        } else {
            (0..per_key).collect()
        };
        assert_eq!(seqs, want, "{key}'s events out of order or missing");
    }
    let first_flaky = applied
        .iter()
        .position(|(k, _)| k == "flaky")
        .expect("flaky applied");
    let healthy = applied
        .iter()
        .filter(|(k, _)| k != "flaky" && k != "poison")
        .count();
    assert_eq!(healthy, 8 * per_key as usize);
    assert!(
        applied[..first_flaky]
            .iter()
            .filter(|(k, _)| k != "flaky" && k != "poison")
            .count()
            == healthy,
        "healthy keys waited for the parked one: {applied:?}"
    );
    let parked = dlq::list(bus.as_ref(), None).await.expect("list");
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert!(
        parked[0].reason.contains("gave up after 3 attempts"),
        "{parked:?}"
    );
    db.close().await;
}

#[tokio::test]
async fn parking_keeps_key_order_and_lets_other_keys_through_embedded() {
    for prepares in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        parking_keeps_key_order(
            embedded(dir.path(), 1).await,
            &format!("sqlite://{}/svc.db", dir.path().display()),
            prepares,
        )
        .await;
    }
}

#[tokio::test]
async fn parking_keeps_key_order_and_lets_other_keys_through_kafka() {
    let dir = tempfile::tempdir().expect("tempdir");
    parking_keeps_key_order(
        kafka(1),
        &format!("sqlite://{}/svc.db", dir.path().display()),
        false,
    )
    .await;
}

/// A consumer stopped while a record is parked has not committed past it: the restarted one
/// reads it again and applies it, and what was applied before the stop is not applied again.
#[tokio::test]
async fn a_parked_record_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = embedded(dir.path(), 1).await;
    let db = service_db(&format!("sqlite://{}/svc.db", dir.path().display())).await;
    publish_sequences(bus.as_ref(), &["a", "b"], 2).await;
    let handler = Arc::new(Sequencer {
        failures: std::sync::Mutex::new([("a/0".to_owned(), u32::MAX)].into()),
        prepares: true,
    });
    let retry = RetryPolicy {
        max_attempts: 5,
        initial_backoff: Duration::from_secs(60),
        max_backoff: Duration::from_secs(60),
    };
    let registry = prometheus::Registry::new();
    let consumer = Consumer::new(handler.clone(), db.clone(), bus.clone(), &registry)
        .with_retry(retry.clone());
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone()));
    // b's two events pass the parked a/0; a/1 waits behind it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while applied(&db).await.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "b never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        applied(&db).await,
        [("b".to_owned(), 0), ("b".to_owned(), 1)]
    );
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("metrics");
    assert!(
        text.contains("events_parked{consumer=\"sequencer\"} 1"),
        "{text}"
    );
    stop.cancel();
    task.await.expect("join").expect("consumer");
    assert_eq!(
        bus.committed("sequencer", USER_REGISTERED.topic, 0)
            .await
            .expect("committed"),
        0,
        "nothing committed past the parked record"
    );

    // Restarted with the downstream fixed: a's events in order, b's not again.
    handler.failures.lock().unwrap().clear();
    let consumer =
        Consumer::new(handler.clone(), db.clone(), bus.clone(), &registry).with_retry(retry);
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone()));
    wait_until_caught_up(bus.as_ref(), "sequencer", USER_REGISTERED.topic).await;
    stop.cancel();
    task.await.expect("join").expect("consumer");
    assert_eq!(
        applied(&db).await,
        [
            ("b".to_owned(), 0),
            ("b".to_owned(), 1),
            ("a".to_owned(), 0),
            ("a".to_owned(), 1)
        ],
        "a's events once each and in order, b's not again"
    );
    db.close().await;
}

/// The inbox forgets an event only once the log can no longer hand it over again: while the
/// group's committed offset is behind (it crashed before committing), every entry stays and
/// the redelivery changes nothing; once the group has read everything and the keep time has
/// passed, the entries go.
#[tokio::test]
async fn the_inbox_forgets_only_what_the_log_cannot_redeliver() {
    use shopverse_kit::clock::{Clock, SystemClock};
    let dir = tempfile::tempdir().expect("tempdir");
    let (db, log, _) = published_run(
        dir.path(),
        &format!("sqlite://{}/svc.db", dir.path().display()),
        20,
    )
    .await;
    let bus: Arc<dyn EventBus> = Arc::new(log.clone());
    let handler = Arc::new(Recorder::new("flaky", None, true));
    consume_until_caught_up(handler.clone(), &db, &bus).await;
    assert_eq!(effects(&db).await.len(), 20);
    let inbox = || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM inbox WHERE consumer = 'flaky'")
            .fetch_one(db.pool())
            .await
            .expect("inbox")
    };
    let keeper = Consumer::new(
        handler.clone(),
        db.clone(),
        bus.clone(),
        &prometheus::Registry::new(),
    )
    .keeping_inbox(Duration::from_secs(3600));
    let now = SystemClock.now_ms();
    assert_eq!(
        keeper.prune_inbox_once(now).await.expect("prune"),
        0,
        "younger than the keep time"
    );

    // The group's offset back at the start: the log would hand every event over again.
    log.commit_offset("flaky", USER_REGISTERED.topic, 0, 0)
        .await
        .expect("rewind");
    let far = now + 10 * 3_600_000;
    assert_eq!(keeper.prune_inbox_once(far).await.expect("prune"), 0);
    assert_eq!(inbox().await, 20);
    consume_until_caught_up(handler, &db, &bus).await;
    assert_eq!(effects(&db).await.len(), 20, "each event applied once");

    // Read to the end: nothing can come again.
    assert_eq!(keeper.prune_inbox_once(far).await.expect("prune"), 20);
    assert_eq!(inbox().await, 0);
}
