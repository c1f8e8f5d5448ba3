//! ScheduleService: each due time creates exactly one run, across replicas and after
//! every manager was down (catch-up one or none); overlap policies; pause, resume,
//! delete and trigger; cron read in a time zone; tenant isolation; bad input refused by
//! field, changing nothing.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentrun_manager::config::AuthMode;
use agentrun_manager::db;
use agentrun_manager::store::api_keys::{self, Role};
use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::schedule_service_client::ScheduleServiceClient;
use agentrun_shared::proto::{self, CatchUpPolicy, OverlapPolicy, RunStatus};
use agentrun_tests::*;
use tonic::transport::Channel;
use tonic::{Code, Request};
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(30);

type Schedules = ScheduleServiceClient<Channel>;

async fn schedules_of(app: &TestApp) -> Schedules {
    ScheduleServiceClient::new(connect(app.addr).await)
}

/// An interval schedule of the scripted profile.
fn every(name: &str, interval_ms: i64, overlap: OverlapPolicy) -> proto::Schedule {
    proto::Schedule {
        name: name.into(),
        interval_ms,
        run_template: Some(run_request(&format!("scheduled {name}"))),
        overlap_policy: overlap as i32,
        ..Default::default()
    }
}

async fn create(client: &mut Schedules, schedule: proto::Schedule) -> proto::Schedule {
    client
        .create_schedule(proto::CreateScheduleRequest {
            schedule: Some(schedule),
        })
        .await
        .expect("create schedule")
        .into_inner()
        .schedule
        .expect("a schedule")
}

async fn get(client: &mut Schedules, id: &str) -> proto::Schedule {
    client
        .get_schedule(proto::GetScheduleRequest {
            schedule_id: id.into(),
        })
        .await
        .expect("get schedule")
        .into_inner()
        .schedule
        .expect("a schedule")
}

fn time(ts: &Option<prost_types::Timestamp>) -> SystemTime {
    SystemTime::try_from(ts.expect("a timestamp")).expect("a valid timestamp")
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A run a schedule created: its id, status and due time (ms since the epoch; `None`
/// for a triggered run), as stored.
#[derive(Debug)]
struct ScheduledRun {
    id: Uuid,
    status: String,
    due_ms: Option<i64>,
}

async fn runs_of(db: &tokio_postgres::Client, schedule_id: &str) -> Vec<ScheduledRun> {
    let id = Uuid::parse_str(schedule_id).unwrap();
    db.query(
        "SELECT id, status, (extract(epoch FROM schedule_due_at) * 1000)::bigint
         FROM runs WHERE schedule_id = $1 ORDER BY created_at, id",
        &[&id],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| ScheduledRun {
        id: row.get(0),
        status: row.get(1),
        due_ms: row.get(2),
    })
    .collect()
}

/// Waits until the database's clock is past `at`.
async fn until_db_time(db: &tokio_postgres::Client, at: SystemTime) {
    wait_for("the database clock", LONG, || async {
        let past: bool = db
            .query_one("SELECT now() > $1", &[&at])
            .await
            .unwrap()
            .get(0);
        past.then_some(())
    })
    .await
}

fn assert_invalid<T: std::fmt::Debug>(result: Result<T, tonic::Status>, field: &str) {
    let err = result.expect_err(field);
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "{field}: {}",
        err.message()
    );
    assert!(
        err.message().contains(field),
        "message {:?} does not name {field}",
        err.message()
    );
}

/// Two manager processes fire one interval schedule: over many due times, every run
/// stands for a distinct due time of the schedule (none has two), each on the interval's
/// grid, and Run.schedule_id names the schedule.
#[tokio::test]
async fn two_replicas_create_one_run_per_due_time() {
    let url = fresh_database().await;
    let (a, b) = tokio::join!(
        ManagerProcess::start(&url, &[]),
        ManagerProcess::start(&url, &[])
    );
    let mut schedules = ScheduleServiceClient::new(a.channel().await);
    let mut runs = RunServiceClient::new(b.channel().await);
    let db = db_client(&url).await;
    let schedule = create(
        &mut schedules,
        every("every-second", 1000, OverlapPolicy::Queue),
    )
    .await;
    let created_ms = millis(time(&schedule.created_at));
    assert_eq!(
        millis(time(&schedule.next_run_at)),
        created_ms + 1000,
        "first due one interval after creation"
    );

    let fired = wait_for("six due times fired", LONG, || async {
        let fired = runs_of(&db, &schedule.schedule_id).await;
        (fired.len() >= 6).then_some(fired)
    })
    .await;
    let mut due_times = HashSet::new();
    for run in &fired {
        let due = run.due_ms.expect("a fired run has its due time");
        assert!(
            due_times.insert(due),
            "two runs for due time {due}: {fired:?}"
        );
        assert_eq!((due - created_ms) % 1000, 0, "{due} is not a due time");
        assert!(due > created_ms);
    }
    // The database refuses a second run for a due time, whoever would create it.
    let dup = db
        .execute(
            "UPDATE runs SET schedule_due_at = (SELECT schedule_due_at FROM runs WHERE id = $1)
             WHERE id = $2",
            &[&fired[0].id, &fired[1].id],
        )
        .await;
    assert!(dup.is_err(), "a second run for one due time was accepted");

    let run = runs
        .get_run(proto::GetRunRequest {
            run_id: fired[0].id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(run.schedule_id, schedule.schedule_id);
    assert_eq!(status_of(&run), RunStatus::Pending);
    let latest = get(&mut schedules, &schedule.schedule_id).await;
    assert!(!latest.last_run_id.is_empty());
    assert!(latest.last_run_at.is_some());
}

/// The done-when test of issue 16: a schedule due while every manager was stopped fires
/// once when one starts again (catch-up one), and not at all with catch-up none; both
/// are then due at their next due time after the restart.
#[tokio::test]
async fn a_schedule_due_while_every_manager_was_stopped_fires_once_on_restart() {
    let url = fresh_database().await;
    // A due time fired more than 2 s late was missed.
    let env = [("AGENTRUN_SCHEDULE_CATCH_UP_GRACE_MS", "2000")];
    let mut manager = ManagerProcess::start(&url, &env).await;
    let mut schedules = ScheduleServiceClient::new(manager.channel().await);
    let db = db_client(&url).await;
    let one = create(&mut schedules, {
        let mut s = every("catch-up-one", 15_000, OverlapPolicy::Queue);
        s.catch_up_policy = CatchUpPolicy::One as i32;
        s
    })
    .await;
    let none = create(&mut schedules, {
        let mut s = every("catch-up-none", 15_000, OverlapPolicy::Queue);
        s.catch_up_policy = CatchUpPolicy::None as i32;
        s
    })
    .await;
    manager.kill();

    // Down past the first due time (created + 15 s) by more than the grace.
    let first_due = time(&one.next_run_at);
    until_db_time(&db, first_due + Duration::from_millis(3_500)).await;
    assert!(runs_of(&db, &one.schedule_id).await.is_empty());
    let restarted = ManagerProcess::start(&url, &env).await;

    let fired = wait_for("the missed due time fired", LONG, || async {
        let fired = runs_of(&db, &one.schedule_id).await;
        (!fired.is_empty()).then_some(fired)
    })
    .await;
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(fired[0].due_ms, Some(millis(first_due)));
    // The catch-up-none schedule was looked at too: moved on to its next due time.
    let none_due = time(&none.next_run_at);
    wait_for("catch-up none moved on", LONG, || async {
        let next: SystemTime = db
            .query_one(
                "SELECT next_run_at FROM schedules WHERE id = $1",
                &[&Uuid::parse_str(&none.schedule_id).unwrap()],
            )
            .await
            .unwrap()
            .get(0);
        (next > none_due).then_some(())
    })
    .await;
    assert!(
        runs_of(&db, &none.schedule_id).await.is_empty(),
        "catch-up none created a run for a missed due time"
    );
    let mut schedules = ScheduleServiceClient::new(restarted.channel().await);
    for (id, created) in [(&one.schedule_id, &one), (&none.schedule_id, &none)] {
        let now = get(&mut schedules, id).await;
        assert_eq!(
            millis(time(&now.next_run_at)),
            millis(time(&created.created_at)) + 30_000,
            "the next due time after the restart"
        );
    }
    // Still one run: the restart fired nothing twice.
    assert_eq!(runs_of(&db, &one.schedule_id).await.len(), 1);
}

/// With no runner connected every run stays pending, so each due time meets the
/// previous run unfinished.
#[tokio::test]
async fn overlap_policies_skip_queue_and_cancel_previous() {
    let app = TestApp::spawn().await;
    let mut schedules = schedules_of(&app).await;
    let db = app.db().await;
    let skip = create(&mut schedules, every("skip", 1000, OverlapPolicy::Skip)).await;
    let queue = create(&mut schedules, every("queue", 1000, OverlapPolicy::Queue)).await;
    let cancel = create(
        &mut schedules,
        every("cancel", 1000, OverlapPolicy::CancelPrevious),
    )
    .await;

    // Three due times each.
    wait_for("three due times", LONG, || async {
        let queued = runs_of(&db, &queue.schedule_id).await;
        let cancelled = runs_of(&db, &cancel.schedule_id).await;
        (queued.len() >= 3 && cancelled.len() >= 3).then_some(())
    })
    .await;
    let skip_next = get(&mut schedules, &skip.schedule_id).await;
    assert!(
        millis(time(&skip_next.next_run_at)) >= millis(time(&skip.created_at)) + 3000,
        "skip went past its due times"
    );
    let skipped = runs_of(&db, &skip.schedule_id).await;
    assert_eq!(
        skipped.len(),
        1,
        "skip: one run while it is pending: {skipped:?}"
    );
    assert_eq!(skipped[0].status, "pending");

    let queued = runs_of(&db, &queue.schedule_id).await;
    assert!(queued.iter().all(|r| r.status == "pending"), "{queued:?}");

    let cancelled = runs_of(&db, &cancel.schedule_id).await;
    let (last, earlier) = cancelled.split_last().unwrap();
    assert!(
        earlier.iter().all(|r| r.status == "cancelled"),
        "{cancelled:?}"
    );
    // The newest may be cancelled by a due time fired since the read; never two pending.
    assert!(cancelled.iter().filter(|r| r.status == "pending").count() <= 1);
    assert!(["pending", "cancelled"].contains(&last.status.as_str()));

    // Trigger follows the policy too: skipped while the previous run is pending.
    let triggered = schedules
        .trigger_schedule(proto::TriggerScheduleRequest {
            schedule_id: skip.schedule_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        triggered.run_id, "",
        "skip: no run while the previous is pending"
    );
}

#[tokio::test]
async fn pause_resume_trigger_and_delete() {
    let app = TestApp::spawn().await;
    let mut schedules = schedules_of(&app).await;
    let db = app.db().await;
    let schedule = create(&mut schedules, every("paused", 1000, OverlapPolicy::Queue)).await;
    let paused = schedules
        .pause_schedule(proto::PauseScheduleRequest {
            schedule_id: schedule.schedule_id.clone(),
            paused: true,
        })
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    assert!(paused.paused);
    assert!(paused.next_run_at.is_none(), "no due time while paused");
    let paused_at = SystemTime::now();

    // Triggered while paused: a run now, outside the due times.
    let triggered = schedules
        .trigger_schedule(proto::TriggerScheduleRequest {
            schedule_id: schedule.schedule_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    assert!(!triggered.is_empty());
    let mut runs = app.runs.clone();
    let run = runs
        .get_run(proto::GetRunRequest {
            run_id: triggered.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(run.schedule_id, schedule.schedule_id);
    let after_trigger = get(&mut schedules, &schedule.schedule_id).await;
    assert_eq!(after_trigger.last_run_id, triggered);
    assert!(after_trigger.paused);

    // Two and a half intervals paused: nothing fires.
    until_db_time(&db, paused_at + Duration::from_millis(2500)).await;
    let fired = runs_of(&db, &schedule.schedule_id).await;
    assert_eq!(fired.len(), 1, "only the triggered run: {fired:?}");
    assert_eq!(fired[0].due_ms, None, "a triggered run has no due time");

    let resumed = schedules
        .pause_schedule(proto::PauseScheduleRequest {
            schedule_id: schedule.schedule_id.clone(),
            paused: false,
        })
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    assert!(!resumed.paused);
    let next = time(&resumed.next_run_at);
    assert!(
        next > SystemTime::now() - Duration::from_millis(500),
        "nothing missed while paused is caught up"
    );
    assert_eq!(
        (millis(next) - millis(time(&schedule.created_at))) % 1000,
        0
    );
    let fired = wait_for("a due time after the resume", LONG, || async {
        let fired = runs_of(&db, &schedule.schedule_id).await;
        (fired.len() >= 2).then_some(fired)
    })
    .await;
    assert!(
        fired[1..].iter().all(|r| r.due_ms >= Some(millis(next))),
        "{fired:?}"
    );

    schedules
        .delete_schedule(proto::DeleteScheduleRequest {
            schedule_id: schedule.schedule_id.clone(),
        })
        .await
        .unwrap();
    for result in [
        schedules
            .get_schedule(proto::GetScheduleRequest {
                schedule_id: schedule.schedule_id.clone(),
            })
            .await
            .map(|_| ()),
        schedules
            .delete_schedule(proto::DeleteScheduleRequest {
                schedule_id: schedule.schedule_id.clone(),
            })
            .await
            .map(|_| ()),
    ] {
        assert_eq!(result.unwrap_err().code(), Code::NotFound);
    }
    // Its runs are kept, and it fires no more.
    let kept = runs_of(&db, &schedule.schedule_id).await.len();
    assert!(kept >= 2);
    let deleted_at = SystemTime::now();
    until_db_time(&db, deleted_at + Duration::from_millis(1500)).await;
    assert_eq!(runs_of(&db, &schedule.schedule_id).await.len(), kept);
}

/// A cron expression is read in its time zone: 09:00 in New York is 13:00 or 14:00 UTC
/// depending on daylight saving, 06:30 in Berlin 04:30 or 05:30.
#[tokio::test]
async fn cron_is_read_in_its_time_zone() {
    let app = TestApp::spawn().await;
    let mut schedules = schedules_of(&app).await;
    for (name, cron, zone, utc_hours, minute) in [
        ("ny", "0 9 * * *", "America/New_York", [13, 14], 0),
        ("berlin", "30 6 * * *", "Europe/Berlin", [4, 5], 30),
    ] {
        let schedule = create(
            &mut schedules,
            proto::Schedule {
                name: name.into(),
                cron: cron.into(),
                time_zone: zone.into(),
                run_template: Some(run_request("morning")),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(schedule.cron, cron);
        assert_eq!(schedule.time_zone, zone);
        assert_eq!(
            schedule.catch_up_policy,
            CatchUpPolicy::One as i32,
            "default"
        );
        assert_eq!(
            schedule.overlap_policy,
            OverlapPolicy::Skip as i32,
            "default"
        );
        let next = time(&schedule.next_run_at);
        let now = SystemTime::now();
        assert!(next > now && next < now + Duration::from_secs(25 * 3600));
        let secs_of_day = next.duration_since(UNIX_EPOCH).unwrap().as_secs() % 86_400;
        assert!(
            utc_hours.contains(&(secs_of_day / 3600)) && secs_of_day % 3600 == minute * 60,
            "{name}: due at {secs_of_day} s into the UTC day"
        );
    }
    // Six fields: seconds first.
    let every_ten = create(
        &mut schedules,
        proto::Schedule {
            name: "seconds".into(),
            cron: "*/10 * * * * *".into(),
            run_template: Some(run_request("tick")),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(every_ten.time_zone, "UTC");
    assert_eq!(millis(time(&every_ten.next_run_at)) % 10_000, 0);
}

#[tokio::test]
async fn create_is_idempotent_by_name_and_lists_page() {
    let app = TestApp::spawn().await;
    let mut schedules = schedules_of(&app).await;
    let first = create(
        &mut schedules,
        every("nightly", 60_000, OverlapPolicy::Skip),
    )
    .await;
    let again = create(
        &mut schedules,
        every("nightly", 60_000, OverlapPolicy::Skip),
    )
    .await;
    assert_eq!(
        again.schedule_id, first.schedule_id,
        "a retry finds the schedule"
    );
    let clash = schedules
        .create_schedule(proto::CreateScheduleRequest {
            schedule: Some(every("nightly", 120_000, OverlapPolicy::Skip)),
        })
        .await
        .unwrap_err();
    assert_eq!(clash.code(), Code::AlreadyExists);

    for i in 0..4 {
        create(
            &mut schedules,
            every(&format!("s{i}"), 60_000, OverlapPolicy::Skip),
        )
        .await;
    }
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = schedules
            .list_schedules(proto::ListSchedulesRequest {
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        names.extend(page.schedules.into_iter().map(|s| s.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(names, ["nightly", "s0", "s1", "s2", "s3"], "oldest first");
}

#[tokio::test]
async fn bad_input_is_refused_by_field_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let mut schedules = schedules_of(&app).await;
    let good = || every("good", 1000, OverlapPolicy::Queue);
    let template = |edit: fn(&mut proto::CreateRunRequest)| {
        let mut s = good();
        edit(s.run_template.as_mut().unwrap());
        s
    };
    let cases: Vec<(Option<proto::Schedule>, &str)> = vec![
        (None, "schedule"),
        (
            Some(proto::Schedule {
                name: String::new(),
                ..good()
            }),
            "schedule.name",
        ),
        (
            Some(proto::Schedule {
                name: "a b".into(),
                ..good()
            }),
            "schedule.name",
        ),
        (
            Some(proto::Schedule {
                interval_ms: 0,
                ..good()
            }),
            "schedule.cron",
        ),
        (
            Some(proto::Schedule {
                cron: "* * * * *".into(),
                ..good()
            }),
            "schedule.interval_ms",
        ),
        (
            Some(proto::Schedule {
                interval_ms: 999,
                ..good()
            }),
            "schedule.interval_ms",
        ),
        (
            Some(proto::Schedule {
                interval_ms: -5,
                ..good()
            }),
            "schedule.interval_ms",
        ),
        (
            Some(proto::Schedule {
                interval_ms: 0,
                cron: "99 * * * *".into(),
                ..good()
            }),
            "schedule.cron",
        ),
        (
            Some(proto::Schedule {
                interval_ms: 0,
                cron: "every day".into(),
                ..good()
            }),
            "schedule.cron",
        ),
        (
            Some(proto::Schedule {
                interval_ms: 0,
                cron: "0 9 * * *".into(),
                time_zone: "Mars/Olympus".into(),
                ..good()
            }),
            "schedule.time_zone",
        ),
        (
            Some(proto::Schedule {
                time_zone: "Europe/Berlin".into(),
                ..good()
            }),
            "schedule.time_zone",
        ),
        (
            Some(proto::Schedule {
                run_template: None,
                ..good()
            }),
            "schedule.run_template",
        ),
        (
            Some(proto::Schedule {
                overlap_policy: 99,
                ..good()
            }),
            "schedule.overlap_policy",
        ),
        (
            Some(proto::Schedule {
                catch_up_policy: 99,
                ..good()
            }),
            "schedule.catch_up_policy",
        ),
        (
            Some(template(|t| t.backend_profile = String::new())),
            "schedule.run_template.backend_profile",
        ),
        (
            Some(template(|t| t.input_json = "[1]".into())),
            "schedule.run_template.input_json",
        ),
        (
            Some(template(|t| t.idempotency_key = "k".into())),
            "schedule.run_template.idempotency_key",
        ),
        (
            Some(template(|t| {
                t.scheduled_at = Some(prost_types::Timestamp::from(SystemTime::now()))
            })),
            "schedule.run_template.scheduled_at",
        ),
        (
            Some(template(|t| t.priority = 5000)),
            "schedule.run_template.priority",
        ),
        (
            Some(proto::Schedule {
                project_id: "alpha".into(),
                run_template: Some(proto::CreateRunRequest {
                    project_id: "beta".into(),
                    ..run_request("x")
                }),
                ..good()
            }),
            "schedule.run_template.project_id",
        ),
    ];
    for (schedule, field) in cases {
        assert_invalid(
            schedules
                .create_schedule(proto::CreateScheduleRequest { schedule })
                .await,
            field,
        );
    }
    for id in ["", "nope"] {
        assert_invalid(
            schedules
                .get_schedule(proto::GetScheduleRequest {
                    schedule_id: id.into(),
                })
                .await,
            "schedule_id",
        );
        assert_invalid(
            schedules
                .trigger_schedule(proto::TriggerScheduleRequest {
                    schedule_id: id.into(),
                })
                .await,
            "schedule_id",
        );
    }
    assert_invalid(
        schedules
            .list_schedules(proto::ListSchedulesRequest {
                page_size: 501,
                page_token: String::new(),
            })
            .await,
        "page_size",
    );
    assert_invalid(
        schedules
            .list_schedules(proto::ListSchedulesRequest {
                page_size: 0,
                page_token: "nope".into(),
            })
            .await,
        "page_token",
    );
    let listed = schedules
        .list_schedules(proto::ListSchedulesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.schedules.is_empty(), "bad input created {listed:?}");
    let unknown = Uuid::now_v7().to_string();
    let err = schedules
        .pause_schedule(proto::PauseScheduleRequest {
            schedule_id: unknown,
            paused: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// Another tenant's schedule is NOT_FOUND exactly as an unknown one, for every call, and
/// its runs are the owner's.
#[tokio::test]
async fn tenants_see_only_their_own_schedules() {
    let app = TestApp::spawn_with(|s| s.auth = AuthMode::Required).await;
    let key = |tenant: &'static str| {
        let url = app.database_url.clone();
        async move {
            let pool = db::pool(&url, 1).expect("pool");
            let client = pool.get().await.expect("connection");
            api_keys::create(&client, tenant, Role::Client, &[], "test", None)
                .await
                .expect("create key")
                .key
        }
    };
    let (acme, globex) = (key("acme").await, key("globex").await);
    fn with_key<T>(key: &str, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {key}").parse().expect("ASCII key"),
        );
        request
    }
    let mut schedules = schedules_of(&app).await;
    let theirs = schedules
        .create_schedule(with_key(
            &acme,
            proto::CreateScheduleRequest {
                schedule: Some(every("shared-name", 60_000, OverlapPolicy::Skip)),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    let unauthenticated = schedules
        .list_schedules(proto::ListSchedulesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);

    let unknown = Uuid::now_v7().to_string();
    for id in [theirs.schedule_id.clone(), unknown] {
        let calls: Vec<tonic::Status> = vec![
            schedules
                .get_schedule(with_key(
                    &globex,
                    proto::GetScheduleRequest {
                        schedule_id: id.clone(),
                    },
                ))
                .await
                .unwrap_err(),
            schedules
                .pause_schedule(with_key(
                    &globex,
                    proto::PauseScheduleRequest {
                        schedule_id: id.clone(),
                        paused: true,
                    },
                ))
                .await
                .unwrap_err(),
            schedules
                .trigger_schedule(with_key(
                    &globex,
                    proto::TriggerScheduleRequest {
                        schedule_id: id.clone(),
                    },
                ))
                .await
                .unwrap_err(),
            schedules
                .delete_schedule(with_key(
                    &globex,
                    proto::DeleteScheduleRequest {
                        schedule_id: id.clone(),
                    },
                ))
                .await
                .unwrap_err(),
        ];
        for status in calls {
            assert_eq!(status.code(), Code::NotFound);
            assert_eq!(status.message(), "schedule not found");
        }
    }
    let listed = schedules
        .list_schedules(with_key(&globex, proto::ListSchedulesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.schedules.is_empty());
    // Names are per tenant.
    schedules
        .create_schedule(with_key(
            &globex,
            proto::CreateScheduleRequest {
                schedule: Some(every("shared-name", 60_000, OverlapPolicy::Skip)),
            },
        ))
        .await
        .expect("another tenant may use the name");
    // The owner's schedule is untouched and its trigger makes the owner's run.
    let mine = schedules
        .get_schedule(with_key(
            &acme,
            proto::GetScheduleRequest {
                schedule_id: theirs.schedule_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    assert!(!mine.paused);
    let run_id = schedules
        .trigger_schedule(with_key(
            &acme,
            proto::TriggerScheduleRequest {
                schedule_id: theirs.schedule_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let mut runs = app.runs.clone();
    let err = runs
        .get_run(with_key(
            &globex,
            proto::GetRunRequest {
                run_id: run_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let run = runs
        .get_run(with_key(&acme, proto::GetRunRequest { run_id }))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(run.schedule_id, theirs.schedule_id);
}

/// `agentrun schedules` as people use it: text output, and errors reported with the
/// manager's message and a failing exit code.
#[tokio::test]
async fn the_schedules_command_line() {
    use agentrun_tests::cli::agentrun;
    let app = TestApp::spawn().await;
    let created = agentrun(
        &app,
        &[
            "schedules",
            "create",
            "tick",
            "say hi",
            "--every",
            "10m",
            "--overlap",
            "skip",
        ],
    )
    .await;
    assert_eq!(created.code(), Some(0), "{}", created.stderr);
    let id = created
        .stdout
        .lines()
        .find_map(|line| line.strip_prefix("schedule"))
        .map(|rest| rest.trim().to_owned())
        .expect("the schedule's id");
    assert!(created.stdout.contains("every 10m"), "{}", created.stdout);
    assert!(created.stdout.contains("skip"), "{}", created.stdout);

    let listed = agentrun(&app, &["schedules"]).await;
    assert_eq!(listed.code(), Some(0), "{}", listed.stderr);
    assert!(listed.stdout.starts_with("ID"), "{}", listed.stdout);
    assert!(listed.stdout.contains(&id) && listed.stdout.contains("tick"));

    let triggered = agentrun(&app, &["schedules", "trigger", &id]).await;
    assert_eq!(triggered.code(), Some(0), "{}", triggered.stderr);
    let run_id = triggered.stdout.trim().to_owned();
    Uuid::parse_str(&run_id).expect("the run id");
    // The first run is pending: skip.
    let skipped = agentrun(&app, &["schedules", "trigger", &id]).await;
    assert!(skipped.stdout.starts_with("skipped"), "{}", skipped.stdout);

    let paused = agentrun(&app, &["schedules", "pause", &id]).await;
    assert!(
        paused.stdout.contains("paused      true"),
        "{}",
        paused.stdout
    );

    let bad = agentrun(
        &app,
        &[
            "schedules",
            "create",
            "bad",
            "x",
            "--cron",
            "0 9 * * *",
            "--time-zone",
            "Nowhere",
        ],
    )
    .await;
    assert_ne!(bad.code(), Some(0));
    assert!(bad.stderr.contains("schedule.time_zone"), "{}", bad.stderr);
    let neither = agentrun(&app, &["schedules", "create", "bad", "x"]).await;
    assert_eq!(neither.code(), Some(2), "a usage error: {}", neither.stderr);

    let deleted = agentrun(&app, &["schedules", "delete", &id]).await;
    assert_eq!(deleted.code(), Some(0), "{}", deleted.stderr);
    let gone = agentrun(&app, &["schedules", "get", &id]).await;
    assert_ne!(gone.code(), Some(0));
    assert!(gone.stderr.contains("not found"), "{}", gone.stderr);
}

/// Cost follows work: while no schedule is due the firing loop sleeps until the next due
/// time (or its poll interval), a handful of statements in all — not a busy poll.
#[tokio::test]
async fn the_firing_loop_sleeps_while_nothing_is_due() {
    use crate::hellos::{commits, disconnected, quiet_app_on};
    let url = fresh_database().await;
    let name: String = db_client(&url)
        .await
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    let cluster = cluster_client().await;
    // A first manager migrates the schema and creates a schedule an hour away.
    {
        let app = quiet_app_on(&url).await;
        let mut schedules = schedules_of(&app).await;
        create(
            &mut schedules,
            every("hourly", 3_600_000, OverlapPolicy::Skip),
        )
        .await;
    }
    disconnected(&cluster, &name).await;
    let before = commits(&cluster, &name).await;
    let app = quiet_app_on(&url).await;
    // The clock is read outside the test database, so the reads are not counted.
    until_db_time(&cluster, SystemTime::now() + Duration::from_secs(4)).await;
    drop(app);
    disconnected(&cluster, &name).await;
    let used = commits(&cluster, &name).await - before;
    println!("{used} transactions in four idle seconds");
    // The manager's start and stop (about 20, more on a loaded machine), its health
    // probe once a second and a look or two at the schedules: well under 80. A loop
    // polling every few milliseconds would be two hundred or more.
    assert!(used < 80, "{used} transactions in four idle seconds");
}

#[tokio::test]
async fn a_tenant_holds_at_most_a_thousand_schedules() {
    let app = TestApp::spawn().await;
    let mut schedules = schedules_of(&app).await;
    let mut first = None;
    for i in 0..1000 {
        let made = create(
            &mut schedules,
            every(&format!("s{i}"), 3_600_000, OverlapPolicy::Skip),
        )
        .await;
        first.get_or_insert(made);
    }
    let refused = schedules
        .create_schedule(proto::CreateScheduleRequest {
            schedule: Some(every("one-too-many", 3_600_000, OverlapPolicy::Skip)),
        })
        .await
        .expect_err("a schedule past the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("tenant_schedules"),
        "{refused:?}"
    );
    // A retry of one it has is still answered; another tenant is not held back.
    let again = create(&mut schedules, every("s0", 3_600_000, OverlapPolicy::Skip)).await;
    assert_eq!(again.schedule_id, first.expect("made").schedule_id);
    schedules
        .create_schedule(as_tenant(
            "other",
            proto::CreateScheduleRequest {
                schedule: Some(every("one-too-many", 3_600_000, OverlapPolicy::Skip)),
            },
        ))
        .await
        .expect("another tenant's first schedule");
    // Deleting one makes room.
    schedules
        .delete_schedule(proto::DeleteScheduleRequest {
            schedule_id: again.schedule_id,
        })
        .await
        .expect("delete");
    create(
        &mut schedules,
        every("one-too-many", 3_600_000, OverlapPolicy::Skip),
    )
    .await;
}
