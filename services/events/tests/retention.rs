//! The embedded log's retention as a consumer group and an operator see it: what a pass
//! deletes, what it must keep, where offsets go on, and what a group that lost records is told.

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::time::Duration;

use shopverse_events::bus::{EventBus, OutRecord};
use shopverse_events::dlq::REPLAYER_GROUP;
use shopverse_events::embedded::EmbeddedLog;
use shopverse_events::retention::Retention;
use shopverse_kit::CancellationToken;
use shopverse_kit::clock::{Clock, SystemClock};

const HOUR_MS: i64 = 3_600_000;

async fn log(dir: &std::path::Path) -> EmbeddedLog {
    EmbeddedLog::open(&format!("sqlite://{}/events.db", dir.display()), 1)
        .await
        .unwrap()
}

/// `n` records of about a kilobyte on `topic` (one partition).
async fn publish(log: &EmbeddedLog, topic: &str, n: usize) {
    let records: Vec<OutRecord> = (0..n)
        .map(|i| OutRecord {
            topic: topic.to_owned(),
            key: format!("k{i}"),
            headers: vec![("event-id".into(), format!("e{i}"))],
            payload: vec![b'x'; 1000],
        })
        .collect();
    log.publish(&records).await.unwrap();
}

/// The offsets the partition holds.
async fn offsets(log: &EmbeddedLog, topic: &str) -> Vec<i64> {
    log.fetch(topic, 0, 0, 100_000)
        .await
        .unwrap()
        .iter()
        .map(|r| r.offset)
        .collect()
}

fn range(from: i64, to: i64) -> Vec<i64> {
    (from..to).collect()
}

/// Rules where age decides: anything older than an hour may go, sizes never matter.
fn by_age() -> Retention {
    Retention {
        max_age: Duration::from_secs(3600),
        bytes: u64::MAX / 4,
        max_bytes: u64::MAX / 2,
        batch: 7,
        ..Retention::default()
    }
}

/// Old records go once every group has read them, and not before: a group that committed
/// less holds them back; the last record stays so offsets go on where they were.
#[tokio::test]
async fn records_go_only_once_every_group_has_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path()).await;
    publish(&log, "t", 100).await;
    log.commit_offset("fast", "t", 0, 60).await.unwrap();
    log.commit_offset("slow", "t", 0, 30).await.unwrap();
    let stop = CancellationToken::new();
    let now = SystemClock.now_ms();

    // Nothing is an hour old yet.
    let p = log.prune(&by_age(), now, &stop).await.unwrap();
    assert_eq!(p.total(), 0);
    assert_eq!(offsets(&log, "t").await, range(0, 100));

    // Two hours on: everything is old, but `slow` has read only 30.
    let later = now + 2 * HOUR_MS;
    let p = log.prune(&by_age(), later, &stop).await.unwrap();
    assert_eq!(p.total(), 30, "{p:?}");
    assert!(p.forced.is_empty(), "{p:?}");
    assert_eq!(offsets(&log, "t").await, range(30, 100));

    // Both have read everything: all but the last record go.
    log.commit_offset("slow", "t", 0, 100).await.unwrap();
    log.commit_offset("fast", "t", 0, 100).await.unwrap();
    let p = log.prune(&by_age(), later, &stop).await.unwrap();
    assert_eq!(p.total(), 69);
    assert_eq!(offsets(&log, "t").await, vec![99]);

    // The next append continues the offsets, and a restarted group reads just it.
    publish(&log, "t", 1).await;
    assert_eq!(offsets(&log, "t").await, vec![99, 100]);
    let mut sub = log.subscribe("slow", &["t".to_owned()]).await.unwrap();
    let got = sub.poll(10, Duration::from_millis(50)).await.unwrap();
    assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![100]);
}

/// Past the size limit the oldest records go, still only what every group has read; past the
/// hard cap they go anyway, the group that loses them is counted, and its subscription goes on
/// from the oldest record left and says how many it missed.
#[tokio::test]
async fn size_limits_soft_then_hard() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path()).await;
    let registry = prometheus::Registry::new();
    log.register(&registry);
    publish(&log, "t", 200).await;
    log.commit_offset("reader", "t", 0, 100).await.unwrap();
    let stop = CancellationToken::new();
    let now = SystemClock.now_ms();
    // A record is a little over a kilobyte: 50 fit in the soft limit, 120 in the hard one.
    let size = Retention {
        max_age: Duration::from_secs(3600),
        bytes: 50 * 1070,
        max_bytes: 120 * 1070,
        batch: 16,
        ..Retention::default()
    };
    // The soft limit would keep 50, the hard cap 120; the reader has read 100: 100 stay.
    let p = log.prune(&size, now, &stop).await.unwrap();
    assert_eq!(offsets(&log, "t").await, range(100, 200), "{p:?}");
    assert!(p.forced.is_empty(), "the reader had read what went: {p:?}");

    // The reader now reads everything; the soft limit takes the rest down to about 50.
    log.commit_offset("reader", "t", 0, 200).await.unwrap();
    log.prune(&size, now, &stop).await.unwrap();
    let left = offsets(&log, "t").await;
    assert!((45..=55).contains(&left.len()), "{} left", left.len());

    // A group that stopped at 160 while 300 more come: the hard cap takes records it has not
    // read, and says so.
    log.commit_offset("stuck", "t", 0, 160).await.unwrap();
    publish(&log, "t", 300).await;
    let p = log.prune(&size, now, &stop).await.unwrap();
    let lost = p.forced.get(&("t".to_owned(), "stuck".to_owned())).copied();
    assert!(lost.is_some_and(|n| n > 100), "{p:?}");
    let left = offsets(&log, "t").await;
    assert!(left[0] > 160, "{:?}", &left[..3]);
    let mut sub = log.subscribe("stuck", &["t".to_owned()]).await.unwrap();
    let got = sub.poll(1, Duration::from_millis(50)).await.unwrap();
    assert_eq!(
        got[0].offset, left[0],
        "it goes on from the oldest record left"
    );
    let text = {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    };
    assert!(
        text.lines().any(|l| l
            .starts_with("shopverse_events_records_skipped_total{group=\"stuck\",topic=\"t\"}")
            && !l.ends_with(" 0")),
        "{text}"
    );
    assert!(
        text.contains("shopverse_events_records_forced_out_total{group=\"stuck\",topic=\"t\"}"),
        "{text}"
    );
    assert!(
        text.contains("shopverse_events_records_pruned_total{topic=\"t\"}"),
        "{text}"
    );
}

/// A dead letter waits for its replay whatever its age; a topic nobody consumes goes by age.
#[tokio::test]
async fn dead_letters_wait_for_their_replay() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path()).await;
    publish(&log, "orders.dlq", 10).await;
    publish(&log, "audit", 10).await;
    let stop = CancellationToken::new();
    let later = SystemClock.now_ms() + 2 * HOUR_MS;
    log.prune(&by_age(), later, &stop).await.unwrap();
    assert_eq!(offsets(&log, "orders.dlq").await, range(0, 10));
    assert_eq!(offsets(&log, "audit").await, vec![9]);
    log.commit_offset(REPLAYER_GROUP, "orders.dlq", 0, 4)
        .await
        .unwrap();
    log.prune(&by_age(), later, &stop).await.unwrap();
    assert_eq!(offsets(&log, "orders.dlq").await, range(4, 10));
}

/// The oldest record a group could still be handed: what its inbox must remember back to.
#[tokio::test]
async fn the_redelivery_horizon_follows_the_committed_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path()).await;
    let topics = ["t".to_owned()];
    let before = SystemClock.now_ms();
    publish(&log, "t", 10).await;
    let h = log.redelivery_horizon("g", &topics).await.unwrap().unwrap();
    assert!(h >= before && h <= SystemClock.now_ms(), "{h}");
    log.commit_offset("g", "t", 0, 10).await.unwrap();
    assert_eq!(
        log.redelivery_horizon("g", &topics).await.unwrap(),
        Some(i64::MAX),
        "nothing waits"
    );
}

/// A group that has committed nothing for the expiry time and runs nowhere here is forgotten,
/// and stops holding records back; a group with a member in this process is kept however long
/// it has been quiet.
#[tokio::test]
async fn a_group_gone_for_good_stops_holding_records_back() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path()).await;
    publish(&log, "t", 20).await;
    log.commit_offset("gone", "t", 0, 5).await.unwrap();
    log.commit_offset("quiet", "t", 0, 10).await.unwrap();
    let _member = log.subscribe("quiet", &["t".to_owned()]).await.unwrap();
    let stop = CancellationToken::new();
    let rules = by_age();
    let soon = SystemClock.now_ms() + 2 * HOUR_MS;
    let p = log.prune(&rules, soon, &stop).await.unwrap();
    assert!(p.expired.is_empty(), "{p:?}");
    assert_eq!(
        offsets(&log, "t").await,
        range(5, 20),
        "`gone` holds from 5"
    );
    let week_later = SystemClock.now_ms() + 8 * 24 * HOUR_MS;
    let p = log.prune(&rules, week_later, &stop).await.unwrap();
    assert_eq!(p.expired, vec!["gone".to_owned()]);
    assert_eq!(
        offsets(&log, "t").await,
        range(10, 20),
        "`quiet` (a member here) still holds from 10"
    );
    assert_eq!(log.committed("gone", "t", 0).await.unwrap(), 0);
    assert_eq!(log.committed("quiet", "t", 0).await.unwrap(), 10);
}
