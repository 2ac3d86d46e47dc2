//! Email reaches a real SMTP server (aiosmtpd, a separate process on loopback) and SMS a real
//! HTTP listener; each event goes out once per channel, a failing channel retries, parks, and
//! after a replay sends only what did not go out.

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use prost::Message;
use shopverse_events::bus::OutRecord;
use shopverse_events::embedded::EmbeddedLog;
use shopverse_events::envelope::{ORDER_PLACED, Origin, USER_REGISTERED, new_envelope};
use shopverse_events::outbox::envelope_headers;
use shopverse_events::{EventBus, dlq};
use shopverse_kit::testing::spawn;
use shopverse_kit::{Clock, SystemClock};
use shopverse_notifications::NotificationsConfig;
use shopverse_proto::common::v1::{Address, Money};
use shopverse_proto::orders::v1::{Order, OrderEvent};
use shopverse_proto::users::v1::UserRegistered;

/// aiosmtpd writing every message it accepts into a Maildir.
struct Smtp {
    child: Child,
    port: u16,
    maildir: PathBuf,
}

impl Smtp {
    fn start(dir: &Path) -> Smtp {
        let python = std::env::var("SHOPVERSE_TEST_PYTHON").expect(
            "SHOPVERSE_TEST_PYTHON: a python with aiosmtpd; scripts/test sets it up (see README)",
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let maildir = dir.join("maildir");
        #[allow(clippy::zombie_processes)] // `Drop for Smtp` kills and reaps it
        let child = Command::new(python)
            .args([
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{port}"),
                "-c",
                "aiosmtpd.handlers.Mailbox",
            ])
            .arg(&maildir)
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Smtp {
                    child,
                    port,
                    maildir,
                };
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("aiosmtpd did not start on port {port}");
    }

    /// Every message received so far, as raw text.
    fn messages(&self) -> Vec<String> {
        let new = self.maildir.join("new");
        let mut out: Vec<String> = std::fs::read_dir(&new)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP listener playing the SMS provider; answers 500 while `failing` is set.
async fn webhook(
    received: Arc<Mutex<Vec<serde_json::Value>>>,
    failing: Arc<AtomicBool>,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (received, failing) = (received.clone(), failing.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let (received, failing) = (received.clone(), failing.clone());
                    async move {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let mut resp = hyper::Response::new(Full::new(Bytes::new()));
                        if failing.load(Ordering::SeqCst) {
                            *resp.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
                        } else {
                            received
                                .lock()
                                .unwrap()
                                .push(serde_json::from_slice(&body).unwrap());
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn order(id: &str, user: &str) -> Order {
    Order {
        id: id.into(),
        user_id: user.into(),
        total: Some(Money {
            amount_minor: 4_990,
            currency: "EUR".into(),
        }),
        shipping_address: Some(Address {
            phone: "+49 30 1234567".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn publish(log: &EmbeddedLog, env: &shopverse_proto::events::v1::Envelope, topic: &str) {
    log.publish(&[OutRecord {
        topic: topic.into(),
        key: env.subject.clone(),
        headers: envelope_headers(env),
        payload: env.encode_to_vec(),
    }])
    .await
    .unwrap();
}

/// A positive barrier: waits until the notifications consumer has finished every record on
/// `topic` published so far (its committed offset reached each partition's end; a record still
/// running, waiting or parked holds the commit below it). Whatever those records were going to
/// send has been sent by then, so a count taken after it is final.
async fn drained(log: &EmbeddedLog, topic: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut behind = 0;
        for p in 0..log.partitions(topic).await.unwrap() {
            let end = log.end_offset(topic, p).await.unwrap();
            let done = log.committed("notifications", topic, p).await.unwrap();
            behind += (end - done).max(0);
        }
        if behind == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{behind} records of {topic} never finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_and_sms_once_per_event_and_channel_with_retry_and_replay() {
    once_per_event_and_channel(String::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_and_sms_once_per_event_and_channel_on_postgres() {
    let pg = shopverse_kit::testing::PgTestDb::create()
        .await
        .expect("PostgreSQL at 127.0.0.1:5432 (see README)");
    once_per_event_and_channel(pg.url.clone()).await;
    pg.drop_db().await.expect("drop");
}

/// The notifications service with `config`, on an embedded log in `dir`; its metrics are in
/// the returned registry.
async fn serve(
    dir: &Path,
    config: NotificationsConfig,
) -> (
    shopverse_kit::testing::Spawned<shopverse_runtime::RunError>,
    EmbeddedLog,
    prometheus::Registry,
) {
    let (platform, log) = shopverse_runtime::testing::platform(dir, Arc::new(SystemClock))
        .await
        .unwrap();
    let registry = platform.registry.clone();
    let data = dir.to_owned();
    let server = spawn(|l, stop| async move {
        shopverse_runtime::serve::<shopverse_notifications::NotificationsService>(
            l, config, &data, platform, stop,
        )
        .await
    })
    .await
    .unwrap();
    (server, log, registry)
}

/// `order.placed` for `id`, placed by u1.
fn placed(id: &str) -> shopverse_proto::events::v1::Envelope {
    let event = OrderEvent {
        order: Some(order(id, "u1")),
    };
    new_envelope(
        &ORDER_PLACED,
        "orders",
        id,
        SystemClock.now_ms(),
        Origin::NONE,
        &event,
    )
}

/// `user.registered` for Ada (u1).
fn welcome() -> shopverse_proto::events::v1::Envelope {
    let event = UserRegistered {
        user_id: "u1".into(),
        email: "ada@example.com".into(),
        display_name: "Ada".into(),
    };
    new_envelope(
        &USER_REGISTERED,
        "users",
        "u1",
        SystemClock.now_ms(),
        Origin::NONE,
        &event,
    )
}

/// What went out for Ada's welcome and her first order: the mails' subjects, recipient and
/// Message-ID, the amount, the SMS's number and text.
fn first_messages_are_right(mails: &[String], sms: &serde_json::Value, placed_id: &str) {
    let welcome = |m: &&String| {
        m.contains("Subject: Welcome to ShopVerse") && m.contains("To: ada@example.com")
    };
    assert!(mails.iter().any(|m| welcome(&m)), "{mails:#?}");
    let order_mail = mails
        .iter()
        .find(|m| m.contains("Subject: Order order-0001 received"))
        .expect("order mail");
    let names_event = order_mail.contains(&format!("{placed_id}.email@shopverse"));
    assert!(names_event, "Message-ID names the event: {order_mail}");
    assert!(order_mail.contains("EUR 49.90"), "{order_mail}");
    assert_eq!(sms["to"], "+49 30 1234567");
    let text = sms["text"].as_str().unwrap();
    assert!(text.contains("order-0001 received"), "{sms}");
}

/// Until the first parked event, which must be `event_id`, parked for the SMS webhook.
async fn until_parked(bus: &EmbeddedLog, event_id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let parked = dlq::list(bus, None).await.unwrap();
        if let Some(d) = parked.first() {
            assert_eq!(d.event_id, event_id);
            assert!(d.reason.contains("SMS webhook"), "{}", d.reason);
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "never parked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn once_per_event_and_channel(database: String) {
    let dir = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(dir.path());
    let sms = Arc::new(Mutex::new(Vec::new()));
    let failing = Arc::new(AtomicBool::new(false));
    let hook = webhook(sms.clone(), failing.clone()).await;
    let config = NotificationsConfig {
        database,
        smtp_host: "127.0.0.1".into(),
        smtp_port: smtp.port,
        sms_webhook_url: format!("http://{hook}/sms"),
        ..Default::default()
    };
    let (server, log, _) = serve(dir.path(), config).await;
    let sent_sms = || sms.lock().unwrap().len();

    publish(&log, &welcome(), "shopverse.users").await;
    until("the welcome email", || smtp.messages().len() == 1).await;
    let first = placed("order-0001");
    publish(&log, &first, "shopverse.orders").await;
    until("the order email", || smtp.messages().len() == 2).await;
    until("the order SMS", || sent_sms() == 1).await;
    first_messages_are_right(&smtp.messages(), &sms.lock().unwrap()[0], &first.id);

    // The same event delivered again (at-least-once): nothing new goes out.
    publish(&log, &first, "shopverse.orders").await;
    drained(&log, "shopverse.orders").await;
    assert_eq!((smtp.messages().len(), sent_sms()), (2, 1));

    // The SMS provider fails: the email goes out, the event retries, then parks.
    failing.store(true, Ordering::SeqCst);
    let second = placed("order-0002");
    publish(&log, &second, "shopverse.orders").await;
    until_parked(&log, &second.id).await;
    let mails = smtp.messages().len();
    assert_eq!(mails, 3, "the email went out once despite the retries");
    assert_eq!(sent_sms(), 1);

    // Provider back; replay: the SMS goes out, the email is not sent again.
    failing.store(false, Ordering::SeqCst);
    assert_eq!(dlq::replay(&log, None, None).await.unwrap().len(), 1);
    until("the replayed SMS", || sent_sms() == 2).await;
    drained(&log, "shopverse.orders").await;
    assert_eq!(smtp.messages().len(), 3);
    let topics = log.topics().await.unwrap();
    assert_eq!(topics.iter().filter(|t| t.ends_with(".dlq")).count(), 1);
    server.stop().await;
}

/// Events of different keys run concurrently, so an order event may be handled before the
/// `user.registered` that gives its customer's address: it waits for it (parked, tried again),
/// and the email goes out once the address is known, instead of being dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_event_before_its_users_registration_still_gets_its_email() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(dir.path());
    let config = NotificationsConfig {
        smtp_host: "127.0.0.1".into(),
        smtp_port: smtp.port,
        ..Default::default()
    };
    let (server, log, registry) = serve(dir.path(), config).await;
    let now = SystemClock.now_ms();
    let placed = new_envelope(
        &ORDER_PLACED,
        "orders",
        "order-0009",
        now,
        Origin::NONE,
        &OrderEvent {
            order: Some(order("order-0009", "u9")),
        },
    );
    publish(&log, &placed, "shopverse.orders").await;
    // Its first try finds no address: parked, not sent and not given up.
    let registry_text = || {
        smtp.messages()
            .iter()
            .filter(|m| m.contains("Subject: Order order-0009 received"))
            .count()
    };
    // A positive barrier: the consumer says it parked the record.
    until("the order event parked", || {
        registry.gather().iter().any(|f| {
            f.name() == "shopverse_events_retries_total"
                && f.get_metric().iter().any(|m| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == "outcome" && l.value() == "parked")
                        && m.get_counter().get_value() >= 1.0
                })
        })
    })
    .await;
    assert_eq!(registry_text(), 0);
    let welcome = new_envelope(
        &USER_REGISTERED,
        "users",
        "u9",
        now,
        Origin::NONE,
        &UserRegistered {
            user_id: "u9".into(),
            email: "grace@example.com".into(),
            display_name: "Grace".into(),
        },
    );
    publish(&log, &welcome, "shopverse.users").await;
    until("the order email after the registration", || {
        registry_text() == 1
    })
    .await;
    let mail = smtp
        .messages()
        .into_iter()
        .find(|m| m.contains("Subject: Order order-0009 received"))
        .unwrap();
    assert!(mail.contains("To: grace@example.com"), "{mail}");
    assert!(dlq::list(&log, None).await.unwrap().is_empty());
    server.stop().await;
}

/// With no channel configured nothing is sent before the transaction, so events are applied
/// in runs: each still lands in the customer's in-app inbox exactly once, a redelivered one
/// included.
#[tokio::test]
async fn without_channels_each_event_lands_in_the_inbox_once() {
    use shopverse_kit::Role;
    use shopverse_kit::testing::{as_user, channel};
    use shopverse_proto::notifications::v1::ListMyNotificationsRequest;
    use shopverse_proto::notifications::v1::notifications_service_client::NotificationsServiceClient;

    let dir = tempfile::tempdir().unwrap();
    // No SMTP host, no SMS webhook: the in-app inbox only.
    let (server, log, _) = serve(dir.path(), NotificationsConfig::default()).await;
    let now = SystemClock.now_ms();
    let placed: Vec<_> = (1..=5)
        .map(|i| {
            new_envelope(
                &ORDER_PLACED,
                "orders",
                &format!("order-{i}"),
                now,
                Origin::NONE,
                &OrderEvent {
                    order: Some(order(&format!("order-{i}"), "u1")),
                },
            )
        })
        .collect();
    for env in placed.iter().chain(&placed[1..3]) {
        publish(&log, env, "shopverse.orders").await;
    }
    let client = NotificationsServiceClient::new(channel(server.addr).await.unwrap());
    let list = |mut c: NotificationsServiceClient<tonic::transport::Channel>| async move {
        c.list_my_notifications(as_user(
            ListMyNotificationsRequest {
                page_size: 100,
                ..Default::default()
            },
            "u1",
            &[Role::Customer],
        ))
        .await
        .unwrap()
        .into_inner()
        .notifications
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut got = list(client.clone()).await;
    while got.len() < 5 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        got = list(client.clone()).await;
    }
    // The redelivered ones have been handled too once the consumer has finished the topic.
    drained(&log, "shopverse.orders").await;
    got = list(client.clone()).await;
    let mut subjects: Vec<String> = got.iter().map(|n| n.subject.clone()).collect();
    subjects.sort();
    let want: Vec<String> = (1..=5)
        .map(|i| format!("Order order-{i} received"))
        .collect();
    assert_eq!(subjects, want, "each order once");
    server.stop().await;
}
