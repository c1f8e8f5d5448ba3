//! Commands: order, idempotency, delivery, the reject policy, cancellation.

use agentrun_shared::proto::{self, CommandKind, CommandStatus, RunStatus, TurnDeliveryPolicy};
use agentrun_tests::*;
use tonic::Code;

fn steer(run_id: &str, text: &str) -> proto::SendCommandRequest {
    proto::SendCommandRequest {
        run_id: run_id.into(),
        kind: CommandKind::Steer as i32,
        payload_json: serde_json::json!({ "text": text }).to_string(),
        ..Default::default()
    }
}

async fn list_commands(app: &mut TestApp, run_id: &str) -> Vec<proto::Command> {
    app.runs
        .list_commands(proto::ListCommandsRequest {
            run_id: run_id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .commands
}

#[tokio::test]
async fn commands_get_ordered_seqs_and_idempotent_retries() {
    let mut app = TestApp::spawn().await;
    let run = app
        .runs
        .create_run(run_request("go"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let mut request = steer(&run.run_id, "left");
    request.idempotency_key = "steer-1".into();
    let first = app
        .runs
        .send_command(request.clone())
        .await
        .unwrap()
        .into_inner();
    let retry = app
        .runs
        .send_command(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(first.created && !retry.created);
    let command = first.command.unwrap();
    assert_eq!(command.seq, 2, "the first turn is seq 1");
    assert_eq!(retry.command.unwrap().command_id, command.command_id);

    request.payload_json = r#"{"text": "right"}"#.into();
    let err = app.runs.send_command(request).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    let second = app
        .runs
        .send_command(steer(&run.run_id, "up"))
        .await
        .unwrap()
        .into_inner()
        .command
        .unwrap();
    assert_eq!(second.seq, 3);
    let seqs: Vec<i64> = app
        .runs
        .list_commands(proto::ListCommandsRequest {
            run_id: run.run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .commands
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
}

#[tokio::test]
async fn commands_are_delivered_with_the_claim_and_by_heartbeat() {
    let mut app = TestApp::spawn().await;
    let run = app
        .runs
        .create_run(run_request("go"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let runner = runner("r1");
    let a = claim(&mut app, &runner, 1).await.remove(0);
    assert_eq!(a.commands.len(), 1);
    assert_eq!(a.commands[0].status, CommandStatus::Delivered as i32);

    app.runs
        .send_command(steer(&run.run_id, "faster"))
        .await
        .unwrap();
    let beat = app
        .runners
        .heartbeat(proto::HeartbeatRequest {
            runner_id: runner.runner_id.clone(),
            leases: vec![proto::LeaseRef {
                run_id: run.run_id.clone(),
                epoch: a.epoch,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let lease = &beat.leases[0];
    assert!(lease.held);
    assert_eq!(lease.commands.len(), 1);
    let steer_id = lease.commands[0].command_id.clone();

    // The runner acknowledges and completes it alongside its events.
    let mut request = append(&runner, &a, deltas(1, 2));
    request.command_updates = vec![proto::CommandUpdate {
        command_id: steer_id.clone(),
        status: CommandStatus::Completed as i32,
        error: String::new(),
    }];
    app.runners.append_events(request.clone()).await.unwrap();
    // Resending the same batch is harmless.
    let resent = app
        .runners
        .append_events(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resent.duplicates, 2);

    let commands = list_commands(&mut app, &run.run_id).await;
    assert_eq!(commands[1].status, CommandStatus::Completed as i32);
    let types = event_types(&mut app, &run.run_id).await;
    assert_eq!(
        types,
        [
            "run.created",
            "command.created",
            "run.claimed",
            "command.delivered",
            "command.created",
            "command.delivered",
            "run.started",
            "content.delta",
            "content.delta",
            "command.completed"
        ]
    );
}

/// A run's first turn is carried by the run's own row, not a row of `commands` (one
/// insert and two row versions fewer per run), and is a command like any other to every
/// reader: ListCommands shows it pending, delivered with the claim, then completed by
/// the runner's report.
#[tokio::test]
async fn the_first_turn_is_carried_by_the_run_row_and_listed_as_a_command() {
    let mut app = TestApp::spawn().await;
    let run_id = create(&mut app, "go").await;
    let rows: i64 = app
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM commands WHERE run_id = $1",
            &[&uuid::Uuid::parse_str(&run_id).unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "the first turn has a row of its own");
    let listed = list_commands(&mut app, &run_id).await;
    assert_eq!(listed.len(), 1);
    let first = &listed[0];
    assert_eq!((first.seq, first.kind), (1, CommandKind::Turn as i32));
    assert_eq!(first.status, CommandStatus::Pending as i32);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&first.payload_json).unwrap(),
        serde_json::json!({ "prompt": "go" })
    );

    let runner = runner("r1");
    let a = claim(&mut app, &runner, 1).await.remove(0);
    assert_eq!(a.commands.len(), 1);
    assert_eq!(a.commands[0].command_id, first.command_id);
    assert_eq!(a.commands[0].payload_json, first.payload_json);
    let listed = list_commands(&mut app, &run_id).await;
    assert_eq!(listed[0].status, CommandStatus::Delivered as i32);

    let mut request = append(&runner, &a, deltas(1, 1));
    request.command_updates = vec![proto::CommandUpdate {
        command_id: first.command_id.clone(),
        status: CommandStatus::Completed as i32,
        error: String::new(),
    }];
    app.runners.append_events(request).await.unwrap();
    let listed = list_commands(&mut app, &run_id).await;
    assert_eq!(listed[0].status, CommandStatus::Completed as i32);
    let types = event_types(&mut app, &run_id).await;
    assert_eq!(
        types,
        [
            "run.created",
            "command.created",
            "run.claimed",
            "command.delivered",
            "run.started",
            "content.delta",
            "command.completed"
        ]
    );
}

/// A run's first turn reported in the batch of lease writes that ends the run (the usual
/// run: its reply, the turn's report, its finish) is written by the row update that ends
/// it: one update of the run's row, not one for the report and one for the end. Reported
/// done, it is listed completed and nothing is cancelled; reported still open
/// (acknowledged), it is cancelled with the run as any open command is. Either way the
/// log's counter and events agree (the invariant check).
#[tokio::test]
async fn a_first_turn_reported_with_the_runs_end_is_written_by_the_update_that_ends_it() {
    use agentrun_manager::db;
    use agentrun_manager::store::commands::CommandUpdate;
    use agentrun_manager::store::leases::{self, LeaseWrite, RunnerEvent};
    use agentrun_manager::store::runs::Finish;
    use agentrun_shared::events::EventType;
    use agentrun_shared::ids::{CommandId, RunId, RunnerId};
    use agentrun_shared::state;
    use agentrun_tests::invariants::{Settled, assert_invariants};

    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 120_000).await;
    let db = app.db().await;
    db.batch_execute(
        "CREATE TABLE run_row_updates (run_id uuid);
         CREATE FUNCTION count_run_row_update() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO run_row_updates VALUES (NEW.id); RETURN NEW; END $$;
         CREATE TRIGGER count_run_row_updates BEFORE UPDATE ON runs
             FOR EACH ROW EXECUTE FUNCTION count_run_row_update();",
    )
    .await
    .unwrap();
    let pool = db::pool(&app.database_url, 1).expect("pool");
    for (reported, listed, updates) in [
        (state::CommandStatus::Completed, CommandStatus::Completed, 1),
        (
            state::CommandStatus::Acknowledged,
            CommandStatus::Cancelled,
            2,
        ),
    ] {
        let run_id = create(&mut app, "go").await;
        let me = runner(reported.as_str());
        let lease = claim(&mut app, &me, 1).await.remove(0);
        let run = RunId::parse("run_id", &run_id).unwrap();
        let delta = |seq: i64| {
            let text = format!(r#"{{"kind":"assistant_text","delta":"token {seq} "}}"#);
            RunnerEvent::as_sent(seq, EventType::ContentDelta, text)
        };
        let writes = vec![
            LeaseWrite::Append {
                run_id: run,
                epoch: lease.epoch,
                events: vec![delta(1), delta(2)],
                updates: vec![CommandUpdate {
                    command_id: CommandId::parse("command_id", &lease.commands[0].command_id)
                        .unwrap(),
                    status: reported,
                    error: None,
                }],
            },
            LeaseWrite::Finish {
                epoch: lease.epoch,
                outcome: Finish {
                    run_id: run,
                    status: state::RunStatus::Completed,
                    failure_kind: None,
                    message: None,
                },
                last_runner_seq: 2,
            },
        ];
        db.execute("DELETE FROM run_row_updates", &[])
            .await
            .unwrap();
        let written = leases::write(
            &pool,
            RunnerId::parse("runner_id", &me.runner_id).unwrap(),
            None,
            writes,
            &test_settings(&app.database_url).quotas(),
        )
        .await
        .expect("the batch is stored");
        assert!(written.iter().all(Result::is_ok), "{written:?}");
        let row_updates: i64 = db
            .query_one(
                "SELECT count(*) FROM run_row_updates WHERE run_id = $1",
                &[&run.0],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            row_updates, updates,
            "updates of the run's row, {reported:?}"
        );
        let commands = list_commands(&mut app, &run_id).await;
        assert_eq!(commands.len(), 1);
        assert_eq!(commands[0].status, listed as i32, "{reported:?}");
        let run = get_run(&mut app, &run_id).await;
        assert_eq!(run.status, RunStatus::Completed as i32);
    }
    assert_invariants(&db, Settled::AllTerminal, &[]).await;
}

#[tokio::test]
async fn reject_policy_refuses_a_turn_while_one_is_open() {
    let mut app = TestApp::spawn().await;
    let run = app
        .runs
        .create_run(run_request("go"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let turn = |policy: TurnDeliveryPolicy| proto::SendCommandRequest {
        run_id: run.run_id.clone(),
        kind: CommandKind::Turn as i32,
        payload_json: r#"{"prompt": "again"}"#.into(),
        delivery_policy: policy as i32,
        ..Default::default()
    };
    let err = app
        .runs
        .send_command(turn(TurnDeliveryPolicy::Reject))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let queued = app
        .runs
        .send_command(turn(TurnDeliveryPolicy::Queue))
        .await
        .unwrap()
        .into_inner()
        .command
        .unwrap();
    assert_eq!(queued.seq, 2);
}

#[tokio::test]
async fn cancelling_a_pending_run_ends_it_at_once_and_is_idempotent() {
    let mut app = TestApp::spawn().await;
    let run = app
        .runs
        .create_run(run_request("never"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let cancel = proto::CancelRunRequest {
        run_id: run.run_id.clone(),
        reason: "changed my mind".into(),
    };
    let cancelled = app
        .runs
        .cancel_run(cancel.clone())
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(status_of(&cancelled), RunStatus::Cancelled);
    assert_eq!(cancelled.failure_message, "changed my mind");
    let again = app
        .runs
        .cancel_run(cancel)
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(status_of(&again), RunStatus::Cancelled);

    let types = event_types(&mut app, &run.run_id).await;
    assert_eq!(types.iter().filter(|t| *t == "run.terminal").count(), 1);
    // The open turn was cancelled with the run; new commands are refused.
    let commands = app
        .runs
        .list_commands(proto::ListCommandsRequest {
            run_id: run.run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .commands;
    assert_eq!(commands[0].status, CommandStatus::Cancelled as i32);
    let err = app
        .runs
        .send_command(steer(&run.run_id, "hello?"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // Nothing can claim it.
    let claimed = app
        .runners
        .claim_runs(proto::ClaimRunsRequest {
            runner: Some(runner("r")),
            max_runs: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(claimed.assignments.is_empty());
}

#[tokio::test]
async fn cancelling_an_active_run_reaches_its_runner_and_wins_over_completed() {
    let mut app = TestApp::spawn().await;
    let run = app
        .runs
        .create_run(run_request("long"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let runner = runner("r1");
    let a = claim(&mut app, &runner, 1).await.remove(0);
    app.runners
        .append_events(append(&runner, &a, deltas(1, 3)))
        .await
        .unwrap();

    let cancel = proto::CancelRunRequest {
        run_id: run.run_id.clone(),
        ..Default::default()
    };
    let flagged = app
        .runs
        .cancel_run(cancel.clone())
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert!(flagged.cancel_requested);
    assert_eq!(status_of(&flagged), RunStatus::Running);
    app.runs.cancel_run(cancel).await.unwrap();

    let beat = app
        .runners
        .heartbeat(proto::HeartbeatRequest {
            runner_id: runner.runner_id.clone(),
            leases: vec![proto::LeaseRef {
                run_id: run.run_id.clone(),
                epoch: a.epoch,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(beat.leases[0].cancel_requested);
    let kinds: Vec<i32> = beat.leases[0].commands.iter().map(|c| c.kind).collect();
    assert_eq!(
        kinds,
        [CommandKind::Cancel as i32],
        "exactly one cancel command, even after two CancelRun calls"
    );

    // A runner that reports completed anyway is recorded as cancelled.
    let ended = app
        .runners
        .finish_run(finish(&runner, &a, RunStatus::Completed))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(status_of(&ended), RunStatus::Cancelled);

    // Cancelling a completed run is refused.
    let other = app
        .runs
        .create_run(run_request("quick"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let b = claim(&mut app, &runner, 1).await.remove(0);
    app.runners
        .finish_run(finish(&runner, &b, RunStatus::Completed))
        .await
        .unwrap();
    let err = app
        .runs
        .cancel_run(proto::CancelRunRequest {
            run_id: other.run_id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}
