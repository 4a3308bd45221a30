//! The conversation store against real databases.
//!
//! Every scenario is one async function over a [`Db`] and runs twice: on
//! SQLite in a temporary directory and on PostgreSQL at
//! `HELPLINE_TEST_POSTGRES_URL`, each PostgreSQL test in a schema of its own
//! so that tests run in parallel without seeing each other's rows. Without
//! that variable the PostgreSQL half is skipped, except under CI where it
//! fails: a green CI must mean both backends were tested.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use sqlx::Connection;
use helpline::store::{
    new_id, now_ms, ConversationFilter, ConversationStatus, Customer, Delivery, DeliveryStatus,
    ExportRecord, Feedback, Handoff, Role, Store, StoreError, StoreOptions, TurnState,
};

const PG_ENV: &str = "HELPLINE_TEST_POSTGRES_URL";

/// A store under test plus what is needed to open it again.
struct Db {
    store: Store,
    target: String,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl Db {
    /// Another handle on the same database, as a restarted or second server
    /// process would open it.
    async fn reopen(&self, opts: StoreOptions) -> Store {
        Store::open(&self.target, opts).await.expect("reopen")
    }

    async fn cleanup(self) {
        self.store.close().await;
        if let Some((base, schema)) = self.pg {
            let mut conn = sqlx::PgConnection::connect(&base).await.unwrap();
            sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                .execute(&mut conn)
                .await
                .unwrap();
        }
    }
}

fn test_opts() -> StoreOptions {
    StoreOptions {
        instance: Some("test-replica".into()),
        ..StoreOptions::default()
    }
}

async fn sqlite_db() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("data").to_str().unwrap().to_owned();
    let store = Store::open(&target, test_opts())
        .await
        .expect("open sqlite");
    assert_eq!(store.backend(), "sqlite");
    Db {
        store,
        target,
        _dir: Some(dir),
        pg: None,
    }
}

async fn postgres_db(test: &str) -> Option<Db> {
    let Ok(base) = std::env::var(PG_ENV) else {
        if std::env::var_os("CI").is_some() {
            panic!(
                "{PG_ENV} is not set, so the PostgreSQL tests cannot run; start a server with \
                 `export {PG_ENV}=$(scripts/postgres.sh | tail -n1)`"
            );
        }
        // Written past libtest's output capture so the skip is visible.
        let _ = writeln!(
            std::io::stderr(),
            "skipped: set {PG_ENV} to run postgres::{test} (scripts/postgres.sh starts one)"
        );
        return None;
    };
    let schema = format!("t_{}_{}", test, &new_id("")[..8]);
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {PG_ENV}: {e}"));
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    let target = format!("{base}{sep}options=-c%20search_path%3D{schema}");
    let store = Store::open(&target, test_opts())
        .await
        .expect("open postgres");
    assert_eq!(store.backend(), "postgres");
    Some(Db {
        store,
        target,
        _dir: None,
        pg: Some((base, schema)),
    })
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let db = super::sqlite_db().await;
                    super::$name(&db).await;
                    db.cleanup().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some(db) = super::postgres_db(stringify!($name)).await else { return };
                    super::$name(&db).await;
                    db.cleanup().await;
                }
            )*
        }
    };
}

scenarios!(
    customer_create_fetch_merge,
    foreign_conversation_id_conflicts,
    concurrent_appenders_get_gapless_seqs,
    pending_answer_completes_once,
    recover_interrupts_only_abandoned_answers,
    pagination_covers_everything_once,
    export_lines_carry_turns,
    purge_by_age,
    delete_customer_leaves_nothing,
    feedback_on_answers_and_conversations,
    handoff_and_status,
    outbox_upsert_pending_dead,
    invalid_input_is_explained,
    open_concurrently_is_safe,
);

fn customer(id: &str) -> Customer {
    Customer {
        id: Some(id.into()),
        ..Customer::default()
    }
}

fn filter(limit: u32) -> ConversationFilter {
    ConversationFilter {
        limit,
        ..ConversationFilter::default()
    }
}

/// A conversation with one customer message and one completed bot answer.
async fn conversation_with_answer(store: &Store, customer_id: &str) -> (String, String) {
    let c = store
        .ensure_conversation(None, &customer(customer_id))
        .await
        .unwrap();
    store
        .append_turn(
            &c.id,
            Role::Customer,
            "where is my order?",
            TurnState::Complete,
        )
        .await
        .unwrap();
    let answer = store
        .append_turn(&c.id, Role::Bot, "", TurnState::Pending)
        .await
        .unwrap();
    store
        .complete_turn(
            &answer.id,
            "It ships tomorrow.",
            TurnState::Complete,
            Some("stop"),
            Some(json!({"citations": [1]})),
            Some(json!({"model_sha256": "abc"})),
        )
        .await
        .unwrap();
    (c.id, answer.id)
}

async fn customer_create_fetch_merge(db: &Db) {
    let s = &db.store;
    let mut first = customer("cust-1");
    first.plan = Some("free".into());
    first.attributes.insert("tier".into(), json!(1));
    let created = s.ensure_conversation(Some("conv-a"), &first).await.unwrap();
    assert_eq!(created.id, "conv-a");
    assert_eq!(created.status, ConversationStatus::Open);
    assert_eq!(created.turns, 0);

    // Fetch with nothing new: same conversation, unchanged.
    let again = s
        .ensure_conversation(Some("conv-a"), &Customer::default())
        .await
        .unwrap();
    assert_eq!(again.customer, first);
    assert_eq!(again.created_ms, created.created_ms);

    // New fields and attributes are merged in, old ones kept.
    let mut more = customer("cust-1");
    more.locale = Some("de-DE".into());
    more.attributes.insert("seats".into(), json!(5));
    let merged = s.ensure_conversation(Some("conv-a"), &more).await.unwrap();
    assert_eq!(merged.customer.plan.as_deref(), Some("free"));
    assert_eq!(merged.customer.locale.as_deref(), Some("de-DE"));
    assert_eq!(merged.customer.attributes.len(), 2);
    let (stored, turns) = s.get_conversation("conv-a").await.unwrap();
    assert_eq!(stored, merged);
    assert!(turns.is_empty());

    // An anonymous conversation can be claimed later.
    let anon = s
        .ensure_conversation(None, &Customer::default())
        .await
        .unwrap();
    assert!(
        anon.id.starts_with("conv_") && anon.id.len() == 29,
        "{}",
        anon.id
    );
    let claimed = s
        .ensure_conversation(Some(&anon.id), &customer("cust-2"))
        .await
        .unwrap();
    assert_eq!(claimed.customer.id.as_deref(), Some("cust-2"));
}

async fn foreign_conversation_id_conflicts(db: &Db) {
    let s = &db.store;
    s.ensure_conversation(Some("mine"), &customer("alice"))
        .await
        .unwrap();
    let err = s
        .ensure_conversation(Some("mine"), &customer("mallory"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(err.http_status(), 409);
    assert!(err.to_string().contains("another customer"), "{err}");
    // Nothing of the intruder was written.
    let (c, _) = s.get_conversation("mine").await.unwrap();
    assert_eq!(c.customer.id.as_deref(), Some("alice"));
}

async fn concurrent_appenders_get_gapless_seqs(db: &Db) {
    // Two handles = two connection pools, like two server processes.
    let a = db.store.clone();
    let b = db.reopen(test_opts()).await;
    let c = a
        .ensure_conversation(Some("busy"), &customer("u"))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..32 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let id = c.id.clone();
        tasks.push(tokio::spawn(async move {
            store
                .append_turn(
                    &id,
                    Role::Customer,
                    &format!("message {i}"),
                    TurnState::Complete,
                )
                .await
                .unwrap()
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap().seq);
    }
    seqs.sort();
    assert_eq!(seqs, (1..=32).collect::<Vec<i64>>());
    let (conv, turns) = a.get_conversation("busy").await.unwrap();
    assert_eq!(conv.turns, 32);
    assert_eq!(
        turns.iter().map(|t| t.seq).collect::<Vec<_>>(),
        (1..=32).collect::<Vec<i64>>()
    );
    b.close().await;
}

async fn pending_answer_completes_once(db: &Db) {
    let s = &db.store;
    let c = s.ensure_conversation(None, &customer("u")).await.unwrap();
    let q = s
        .append_turn(&c.id, Role::Customer, "hi", TurnState::Complete)
        .await
        .unwrap();
    assert_eq!(q.seq, 1);
    assert!(q.completed_ms.is_some());
    let pending = s
        .append_turn(&c.id, Role::Bot, "", TurnState::Pending)
        .await
        .unwrap();
    assert_eq!((pending.seq, pending.state), (2, TurnState::Pending));
    assert!(pending.id.starts_with("turn_"));
    assert_eq!(
        s.get_turn(&pending.id).await.unwrap().state,
        TurnState::Pending
    );

    let detail = json!({"guard": "pass", "usage": {"tokens": 12}});
    let audit = json!({"model_sha256": "00ff", "seed": 7});
    let done = s
        .complete_turn(
            &pending.id,
            "Hello!",
            TurnState::Complete,
            Some("stop"),
            Some(detail.clone()),
            Some(audit.clone()),
        )
        .await
        .unwrap();
    assert_eq!(done.content, "Hello!");
    assert_eq!(done.state, TurnState::Complete);
    assert_eq!(done.detail, Some(detail));
    assert_eq!(done.audit, Some(audit));
    assert_eq!(s.get_turn(&pending.id).await.unwrap(), done);

    let err = s
        .complete_turn(&pending.id, "again", TurnState::Failed, None, None, None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(s.get_turn(&pending.id).await.unwrap().content, "Hello!");

    let err = s
        .complete_turn("turn_nope", "x", TurnState::Complete, None, None, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { what: "turn", .. }),
        "{err:?}"
    );
    let err = s
        .append_turn("no-such-conversation", Role::Bot, "", TurnState::Pending)
        .await
        .unwrap_err();
    assert_eq!(err.http_status(), 404);

    // A client that went away still gets its partial answer recorded.
    let p2 = s
        .append_turn(&c.id, Role::Bot, "", TurnState::Pending)
        .await
        .unwrap();
    let d = s
        .complete_turn(&p2.id, "Hel", TurnState::Disconnected, None, None, None)
        .await
        .unwrap();
    assert_eq!(d.state, TurnState::Disconnected);
    let (conv, turns) = s.get_conversation(&c.id).await.unwrap();
    assert_eq!(conv.turns, 3);
    assert_eq!(turns.len(), 3);
}

async fn recover_interrupts_only_abandoned_answers(db: &Db) {
    let s = &db.store;
    let c = s.ensure_conversation(None, &customer("u")).await.unwrap();
    let mine = s
        .append_turn(&c.id, Role::Bot, "partial", TurnState::Pending)
        .await
        .unwrap();
    // A live replica's fresh answer must survive our restart.
    let other = db
        .reopen(StoreOptions {
            instance: Some("other-replica".into()),
            ..StoreOptions::default()
        })
        .await;
    let theirs = other
        .append_turn(&c.id, Role::Bot, "", TurnState::Pending)
        .await
        .unwrap();

    // "Crash" and restart this instance.
    s.close().await;
    let restarted = db.reopen(test_opts()).await;
    let t = restarted.get_turn(&mine.id).await.unwrap();
    assert_eq!(t.state, TurnState::Interrupted);
    assert_eq!(t.content, "partial");
    assert!(t.completed_ms.is_some());
    assert_eq!(
        restarted.get_turn(&theirs.id).await.unwrap().state,
        TurnState::Pending
    );
    assert_eq!(restarted.recover().await.unwrap(), 0);

    // Interrupted answers cannot be completed any more.
    let err = restarted
        .complete_turn(&mine.id, "late", TurnState::Complete, None, None, None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    // Once old enough, anybody's pending answer counts as abandoned.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let sweeper = db
        .reopen(StoreOptions {
            instance: Some("sweeper".into()),
            pending_timeout: Duration::from_millis(10),
            recover_on_open: false,
            ..StoreOptions::default()
        })
        .await;
    assert_eq!(sweeper.recover().await.unwrap(), 1);
    assert_eq!(
        other.get_turn(&theirs.id).await.unwrap().state,
        TurnState::Interrupted
    );
    other.close().await;
    sweeper.close().await;
    restarted.close().await;
}

async fn pagination_covers_everything_once(db: &Db) {
    let s = &db.store;
    let mut all = HashSet::new();
    for i in 0..23 {
        let who = if i % 3 == 0 { "pager-a" } else { "pager-b" };
        let c = s.ensure_conversation(None, &customer(who)).await.unwrap();
        if i % 4 == 0 {
            s.set_status(&c.id, ConversationStatus::Resolved)
                .await
                .unwrap();
        }
        all.insert(c.id);
    }
    let mut seen = Vec::new();
    let mut f = filter(5);
    let mut last_key = (i64::MAX, String::from("\u{10ffff}"));
    let mut pages = 0;
    loop {
        let page = s.list_conversations(&f).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 5);
        for c in &page.items {
            let key = (c.updated_ms, c.id.clone());
            assert!(key < last_key, "not newest-updated first");
            last_key = key;
            seen.push(c.id.clone());
        }
        match page.next_cursor {
            Some(cursor) => f.cursor = Some(cursor),
            None => break,
        }
    }
    assert_eq!(pages, 5);
    assert_eq!(seen.len(), 23);
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), all);

    let resolved = s
        .list_conversations(&ConversationFilter {
            status: Some(ConversationStatus::Resolved),
            ..filter(100)
        })
        .await
        .unwrap();
    assert_eq!(resolved.items.len(), 6);
    assert!(resolved.next_cursor.is_none());
    let of_a = s
        .list_conversations(&ConversationFilter {
            customer_id: Some("pager-a".into()),
            ..filter(100)
        })
        .await
        .unwrap();
    assert_eq!(of_a.items.len(), 8);

    // A time window [after, before) selects by updated_ms.
    let newest = s.list_conversations(&filter(1)).await.unwrap().items[0].clone();
    let window = s
        .list_conversations(&ConversationFilter {
            updated_after_ms: Some(newest.updated_ms),
            updated_before_ms: Some(newest.updated_ms + 1),
            ..filter(100)
        })
        .await
        .unwrap();
    assert!(window.items.iter().any(|c| c.id == newest.id));
    assert!(window
        .items
        .iter()
        .all(|c| c.updated_ms == newest.updated_ms));
}

async fn export_lines_carry_turns(db: &Db) {
    let s = &db.store;
    let mut expected = HashSet::new();
    for i in 0..7 {
        let (id, _) = conversation_with_answer(s, &format!("exp-{i}")).await;
        expected.insert(id);
    }
    // Page size 3 forces the stream across three pages.
    let lines: Vec<String> = s.export(filter(3)).map(|l| l.unwrap()).collect().await;
    assert_eq!(lines.len(), 7);
    let mut got = HashSet::new();
    for line in &lines {
        assert!(!line.contains('\n'));
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(value["conversation"].is_object() && value["turns"].is_array());
        let record: ExportRecord = serde_json::from_value(value).unwrap();
        assert_eq!(record.turns.len(), 2);
        assert_eq!(record.conversation.turns, 2);
        assert_eq!(record.turns[0].role, Role::Customer);
        assert_eq!(record.turns[1].content, "It ships tomorrow.");
        assert_eq!(record.turns[1].audit, Some(json!({"model_sha256": "abc"})));
        assert!(record
            .turns
            .iter()
            .all(|t| t.conversation_id == record.conversation.id));
        got.insert(record.conversation.id);
    }
    assert_eq!(got, expected);

    let one: Vec<_> = s
        .export(ConversationFilter {
            customer_id: Some("exp-3".into()),
            ..filter(50)
        })
        .collect()
        .await;
    assert_eq!(one.len(), 1);
}

async fn purge_by_age(db: &Db) {
    let s = &db.store;
    let (old_a, _) = conversation_with_answer(s, "old").await;
    let (old_b, _) = conversation_with_answer(s, "old").await;
    let (kept, _) = conversation_with_answer(s, "kept").await;
    let old_delivery = Delivery {
        status: DeliveryStatus::Delivered,
        ..Delivery::new("conversation.resolved", json!({"conversation_id": old_a}))
    };
    s.save_delivery(&old_delivery).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let cutoff = now_ms();
    tokio::time::sleep(Duration::from_millis(5)).await;
    // Activity moves a conversation past the cutoff.
    s.append_turn(&kept, Role::Customer, "still here", TurnState::Complete)
        .await
        .unwrap();
    let (fresh, _) = conversation_with_answer(s, "fresh").await;

    let report = s.purge_older_than(cutoff).await.unwrap();
    assert_eq!((report.conversations, report.turns), (2, 4));
    for id in [&old_a, &old_b] {
        assert!(matches!(
            s.get_conversation(id).await,
            Err(StoreError::NotFound { .. })
        ));
    }
    assert_eq!(s.get_conversation(&kept).await.unwrap().1.len(), 3);
    assert!(s.get_conversation(&fresh).await.is_ok());
    assert!(s.deliveries(None, 10).await.unwrap().is_empty());
    assert_eq!(s.purge_older_than(cutoff).await.unwrap().conversations, 0);
}

async fn delete_customer_leaves_nothing(db: &Db) {
    let s = &db.store;
    let mut gone = Vec::new();
    for _ in 0..3 {
        gone.push(conversation_with_answer(s, "leaving").await);
    }
    let (stay, stay_turn) = conversation_with_answer(s, "staying").await;
    s.record_feedback(
        Some(&gone[0].1),
        &gone[0].0,
        Feedback {
            helpful: Some(true),
            resolved: None,
            comment: Some("my address is ...".into()),
            at_ms: now_ms(),
        },
    )
    .await
    .unwrap();
    s.set_handoff(
        &gone[1].0,
        Handoff {
            reason: "angry".into(),
            summary: json!({"customer": "leaving"}),
            by: "customer".into(),
            at_ms: now_ms(),
        },
    )
    .await
    .unwrap();
    s.save_delivery(&Delivery::new(
        "conversation.handed_off",
        json!({"conversation_id": gone[1].0}),
    ))
    .await
    .unwrap();
    s.save_delivery(&Delivery::new(
        "customer.updated",
        json!({"customer": {"id": "leaving"}}),
    ))
    .await
    .unwrap();
    let keep = Delivery::new("conversation.created", json!({"conversation_id": stay}));
    s.save_delivery(&keep).await.unwrap();

    let report = s.delete_customer("leaving").await.unwrap();
    assert_eq!((report.conversations, report.turns), (3, 6));

    for (c, t) in &gone {
        assert!(matches!(
            s.get_conversation(c).await,
            Err(StoreError::NotFound { .. })
        ));
        assert!(matches!(
            s.get_turn(t).await,
            Err(StoreError::NotFound { .. })
        ));
    }
    let listed = s.list_conversations(&filter(500)).await.unwrap();
    assert_eq!(
        listed
            .items
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>(),
        [stay.as_str()]
    );
    let by_customer = s
        .list_conversations(&ConversationFilter {
            customer_id: Some("leaving".into()),
            ..filter(500)
        })
        .await
        .unwrap();
    assert!(by_customer.items.is_empty());
    let exported: Vec<String> = s.export(filter(500)).map(|l| l.unwrap()).collect().await;
    assert_eq!(exported.len(), 1);
    assert!(!exported[0].contains("leaving"));
    let counts = s.counts().await.unwrap();
    assert_eq!(counts.conversations.total, 1);
    assert_eq!(counts.conversations.handed_off, 0);
    assert_eq!(counts.turns.iter().map(|t| t.count).sum::<i64>(), 2);
    assert_eq!(counts.answer_feedback.total, 0);
    let deliveries = s.deliveries(None, 500).await.unwrap();
    assert_eq!(
        deliveries.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        [keep.id.as_str()]
    );
    assert_eq!(s.get_turn(&stay_turn).await.unwrap().role, Role::Bot);
    assert_eq!(s.delete_customer("leaving").await.unwrap().conversations, 0);
}

async fn feedback_on_answers_and_conversations(db: &Db) {
    let s = &db.store;
    let (c, answer) = conversation_with_answer(s, "fb").await;
    let (other_c, _) = conversation_with_answer(s, "fb").await;
    let at = now_ms();
    let good = Feedback {
        helpful: Some(true),
        resolved: Some(false),
        comment: Some("clear".into()),
        at_ms: at,
    };
    s.record_feedback(Some(&answer), &c, good.clone())
        .await
        .unwrap();
    assert_eq!(s.get_turn(&answer).await.unwrap().feedback, Some(good));

    let overall = Feedback {
        helpful: Some(false),
        resolved: Some(true),
        comment: None,
        at_ms: at,
    };
    s.record_feedback(None, &c, overall.clone()).await.unwrap();
    let (conv, turns) = s.get_conversation(&c).await.unwrap();
    assert_eq!(conv.feedback, Some(overall));
    assert!(turns[0].feedback.is_none());

    // The customer's own message cannot be rated.
    let err = s
        .record_feedback(
            Some(&turns[0].id),
            &c,
            Feedback {
                helpful: Some(true),
                resolved: None,
                comment: None,
                at_ms: at,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Invalid {
                field: "turn_id",
                ..
            }
        ),
        "{err:?}"
    );
    // A turn of another conversation is not found in this one.
    let err = s
        .record_feedback(
            Some(&answer),
            &other_c,
            Feedback {
                helpful: Some(false),
                resolved: None,
                comment: None,
                at_ms: at,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { what: "turn", .. }),
        "{err:?}"
    );
    let err = s
        .record_feedback(
            None,
            "missing",
            Feedback {
                helpful: None,
                resolved: None,
                comment: None,
                at_ms: at,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NotFound {
                what: "conversation",
                ..
            }
        ),
        "{err:?}"
    );
    let err = s
        .record_feedback(
            None,
            &c,
            Feedback {
                helpful: None,
                resolved: None,
                comment: Some("x".repeat(5000)),
                at_ms: at,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Invalid {
                field: "comment",
                ..
            }
        ),
        "{err:?}"
    );

    let counts = s.counts().await.unwrap();
    assert_eq!(counts.answer_feedback.total, 1);
    assert_eq!(counts.answer_feedback.helpful, 1);
    assert_eq!(counts.answer_feedback.unresolved, 1);
    assert_eq!(counts.conversation_feedback.not_helpful, 1);
    assert_eq!(counts.conversation_feedback.resolved, 1);
    assert_eq!(counts.answers(), 2);
    assert_eq!(counts.turns_by_role(Role::Customer), 2);
    assert_eq!(counts.turns_in(Role::Bot, TurnState::Complete), 2);
    assert_eq!(counts.answers_finished_by("stop"), 2);
}

async fn handoff_and_status(db: &Db) {
    let s = &db.store;
    let (c, _) = conversation_with_answer(s, "h").await;
    let handoff = Handoff {
        reason: "asked for a human".into(),
        summary: json!({"topic": "refund", "turns": 2}),
        by: "customer".into(),
        at_ms: now_ms(),
    };
    let conv = s.set_handoff(&c, handoff.clone()).await.unwrap();
    assert_eq!(conv.status, ConversationStatus::HandedOff);
    assert_eq!(conv.handoff, Some(handoff.clone()));
    let counts = s.counts().await.unwrap();
    assert_eq!(counts.conversations.handed_off, 1);

    let resolved = s
        .set_status(&c, ConversationStatus::Resolved)
        .await
        .unwrap();
    assert_eq!(resolved.status, ConversationStatus::Resolved);
    assert_eq!(resolved.handoff, Some(handoff), "handoff kept as history");
    assert!(resolved.updated_ms >= conv.updated_ms);
    let counts = s.counts().await.unwrap();
    assert_eq!(
        (
            counts.conversations.total,
            counts.conversations.resolved,
            counts.conversations.handed_off
        ),
        (1, 1, 0)
    );
    let err = s
        .set_status("missing", ConversationStatus::Open)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }));
}

async fn outbox_upsert_pending_dead(db: &Db) {
    let s = &db.store;
    let mut first = Delivery::new("conversation.handed_off", json!({"n": 1}));
    first.next_attempt_ms = 2_000;
    let mut second = Delivery::new("conversation.resolved", json!({"n": 2}));
    second.next_attempt_ms = 1_000;
    assert!(first.id.starts_with("dlv_"));
    s.save_delivery(&first).await.unwrap();
    s.save_delivery(&second).await.unwrap();
    let pending = s.pending_deliveries(10).await.unwrap();
    assert_eq!(
        pending.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        [second.id.as_str(), first.id.as_str()]
    );
    assert_eq!(pending[1], first);

    // A failed attempt, then giving up: the same row is updated.
    let mut retry = first.clone();
    retry.attempts = 1;
    retry.last_error = Some("HTTP 502".into());
    retry.next_attempt_ms = 5_000;
    retry.updated_ms += 1;
    s.save_delivery(&retry).await.unwrap();
    let mut dead = retry.clone();
    dead.status = DeliveryStatus::Dead;
    dead.attempts = 8;
    s.save_delivery(&dead).await.unwrap();
    let mut delivered = second.clone();
    delivered.status = DeliveryStatus::Delivered;
    delivered.attempts = 1;
    s.save_delivery(&delivered).await.unwrap();

    assert!(s.pending_deliveries(10).await.unwrap().is_empty());
    assert_eq!(
        s.deliveries(Some(DeliveryStatus::Dead), 10).await.unwrap(),
        [dead]
    );
    assert_eq!(s.deliveries(None, 10).await.unwrap().len(), 2);
    let counts = s.counts().await.unwrap();
    assert_eq!(
        (
            counts.deliveries.pending,
            counts.deliveries.delivered,
            counts.deliveries.dead
        ),
        (0, 1, 1)
    );
    let err = s.pending_deliveries(0).await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid { field: "limit", .. }));
}

async fn invalid_input_is_explained(db: &Db) {
    let s = &db.store;
    for bad in ["", "has space", "slash/y", &"x".repeat(65), "ünïcode"] {
        let err = s
            .ensure_conversation(Some(bad), &Customer::default())
            .await
            .unwrap_err();
        match &err {
            StoreError::Invalid { field, message } => {
                assert_eq!(*field, "conversation_id");
                assert!(message.contains("1 to 64"), "{message}");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        assert_eq!(err.http_status(), 400);
    }
    let ok = s
        .ensure_conversation(Some("Ok_id-1.2:3"), &Customer::default())
        .await
        .unwrap();
    assert_eq!(ok.id, "Ok_id-1.2:3");
    let err = s
        .list_conversations(&ConversationFilter {
            cursor: Some("not-a-cursor".into()),
            ..filter(10)
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Invalid {
                field: "cursor",
                ..
            }
        ),
        "{err:?}"
    );
    let err = s.list_conversations(&filter(501)).await.unwrap_err();
    assert!(err.to_string().contains("between 1 and 500"), "{err}");
    let err = s
        .complete_turn("turn_x", "", TurnState::Pending, None, None, None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid { field: "state", .. }));

    let err = Store::open("mysql://localhost/helpline", StoreOptions::default())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(
        err,
        StoreError::Invalid {
            field: "target",
            ..
        }
    ));
    for accepted in ["sqlite://", "postgres://", "postgresql://", "directory"] {
        assert!(msg.contains(accepted), "{msg} should name {accepted}");
    }
    let err = Store::open("", StoreOptions::default()).await.unwrap_err();
    assert!(matches!(
        err,
        StoreError::Invalid {
            field: "target",
            ..
        }
    ));
    let err = "fast".parse::<helpline::store::Synchronous>().unwrap_err();
    assert!(err.to_string().contains("normal"), "{err}");
}

async fn open_concurrently_is_safe(db: &Db) {
    let opts = StoreOptions {
        recover_on_open: false,
        ..test_opts()
    };
    let (a, b) = tokio::join!(
        Store::open(&db.target, opts.clone()),
        Store::open(&db.target, opts)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let c = a
        .ensure_conversation(Some("shared"), &customer("u"))
        .await
        .unwrap();
    b.append_turn(&c.id, Role::Customer, "x", TurnState::Complete)
        .await
        .unwrap();
    assert_eq!(a.get_conversation("shared").await.unwrap().1.len(), 1);
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn unreachable_postgres_is_unavailable() {
    let opts = StoreOptions {
        acquire_timeout: Duration::from_secs(2),
        ..StoreOptions::default()
    };
    // Port 1 on loopback: nothing listens there.
    let err = Store::open("postgres://helpline:secret@127.0.0.1:1/db", opts)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(!err.to_string().contains("secret"), "{err}");
}

/// Child half of [`sqlite_acknowledged_turns_survive_sigkill`]: writes turns
/// until killed, printing each id once the store acknowledged it. A no-op in
/// a normal test run.
#[tokio::test]
async fn crash_writer_child() {
    let Ok(dir) = std::env::var("HELPLINE_CRASH_WRITER_DIR") else {
        return;
    };
    let store = Store::open(&dir, StoreOptions::default()).await.unwrap();
    let c = store
        .ensure_conversation(Some("crash"), &customer("u"))
        .await
        .unwrap();
    println!("READY");
    // Never outlive a parent that failed to kill us.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for i in 0.. {
        if std::time::Instant::now() > deadline {
            break;
        }
        let q = store
            .append_turn(
                &c.id,
                Role::Customer,
                &format!("question {i}"),
                TurnState::Complete,
            )
            .await
            .unwrap();
        println!("ACK {}", q.id);
        let a = store
            .append_turn(&c.id, Role::Bot, "", TurnState::Pending)
            .await
            .unwrap();
        let a = store
            .complete_turn(
                &a.id,
                &format!("answer {i}"),
                TurnState::Complete,
                Some("stop"),
                None,
                None,
            )
            .await
            .unwrap();
        println!("ACK {}", a.id);
    }
}

#[test]
fn sqlite_acknowledged_turns_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "store::crash_writer_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("HELPLINE_CRASH_WRITER_DIR", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // libtest prints the test name without a newline, so READY ends a line.
    let start = Instant::now();
    let deadline = start + Duration::from_secs(60);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.ends_with("READY") => break,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                panic!("writer child never became ready: {e}");
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap(); // SIGKILL: no destructors, no clean shutdown.
    child.wait().unwrap();
    reader.join().unwrap();
    let acked: Vec<String> = rx
        .try_iter()
        .filter_map(|l| l.strip_prefix("ACK ").map(str::to_owned))
        // A line cut short by the kill was never fully acknowledged.
        .filter(|id| id.len() == "turn_".len() + 24)
        .collect();
    assert!(
        !acked.is_empty(),
        "child acknowledged nothing in {:?}",
        start.elapsed()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let target = dir.path().to_str().unwrap();
        let store = Store::open(target, StoreOptions::default()).await.unwrap();
        for id in &acked {
            let turn = store.get_turn(id).await.unwrap();
            assert_eq!(turn.state, TurnState::Complete, "{id}");
        }
        let (conv, turns) = store.get_conversation("crash").await.unwrap();
        assert_eq!(conv.turns as usize, turns.len());
        assert!(turns.len() >= acked.len());
        assert!(turns.iter().enumerate().all(|(i, t)| t.seq == i as i64 + 1));
        assert!(turns.iter().all(|t| t.state != TurnState::Pending));
        store.close().await;

        let file = dir.path().join("helpline.db");
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", file.display()))
            .await
            .unwrap();
        let row: (String,) = sqlx::query_as("PRAGMA integrity_check")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(row.0, "ok");
    });
    println!("{} acknowledged turns survived SIGKILL", acked.len());
}

#[test]
fn store_handle_is_shareable() {
    fn assert_shareable<T: Clone + Send + Sync + 'static>() {}
    assert_shareable::<Store>();
}
