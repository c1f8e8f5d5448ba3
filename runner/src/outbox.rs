//! A run's outgoing events: numbered with the runner-side sequence, kept until the
//! manager acknowledges them (after commit), resent after a reconnect, and bounded so a
//! provider waits instead of the runner growing without limit.

use std::collections::VecDeque;
use std::sync::Mutex;

use agentrun_shared::proto;
use serde_json::Value;
use tokio::sync::Notify;

/// Events of one run under one lease epoch.
pub struct Outbox {
    state: Mutex<State>,
    /// Called after each push, to get the event sent.
    on_push: Box<dyn Fn() + Send + Sync>,
    /// Signalled when acknowledgements free space.
    space: Notify,
    capacity: usize,
}

struct State {
    /// runner_seq the next pushed event gets.
    next_seq: i64,
    /// Unacknowledged events, oldest first.
    unacked: VecDeque<proto::RunnerEvent>,
    /// Highest runner_seq handed to the connection for sending.
    sent_upto: i64,
}

impl Outbox {
    pub fn new(capacity: usize, on_push: impl Fn() + Send + Sync + 'static) -> Self {
        Self {
            state: Mutex::new(State {
                next_seq: 1,
                unacked: VecDeque::new(),
                sent_upto: 0,
            }),
            on_push: Box::new(on_push),
            space: Notify::new(),
            capacity: capacity.max(1),
        }
    }

    /// Adds an event; waits while `capacity` events are unacknowledged.
    pub async fn push(&self, event_type: &str, payload: Value) {
        loop {
            let space = self.space.notified();
            {
                let mut state = self.state.lock().expect("outbox lock");
                if state.unacked.len() < self.capacity {
                    let runner_seq = state.next_seq;
                    state.next_seq += 1;
                    state.unacked.push_back(proto::RunnerEvent {
                        runner_seq,
                        r#type: event_type.to_owned(),
                        payload_json: payload.to_string(),
                    });
                    drop(state);
                    (self.on_push)();
                    return;
                }
            }
            space.await;
        }
    }

    /// Up to `max` events not yet handed out for sending, marked as sent.
    pub fn take_unsent(&self, max: usize) -> Vec<proto::RunnerEvent> {
        let mut state = self.state.lock().expect("outbox lock");
        let sent_upto = state.sent_upto;
        let batch: Vec<proto::RunnerEvent> = state
            .unacked
            .iter()
            .filter(|e| e.runner_seq > sent_upto)
            .take(max)
            .cloned()
            .collect();
        if let Some(last) = batch.last() {
            state.sent_upto = last.runner_seq;
        }
        batch
    }

    pub fn has_unsent(&self) -> bool {
        let state = self.state.lock().expect("outbox lock");
        state
            .unacked
            .back()
            .is_some_and(|e| e.runner_seq > state.sent_upto)
    }

    /// Everything up to `runner_seq` is stored.
    pub fn ack(&self, runner_seq: i64) {
        let mut state = self.state.lock().expect("outbox lock");
        while state
            .unacked
            .front()
            .is_some_and(|e| e.runner_seq <= runner_seq)
        {
            state.unacked.pop_front();
        }
        state.sent_upto = state.sent_upto.max(runner_seq);
        drop(state);
        self.space.notify_waiters();
    }

    /// After a reconnect: the manager has everything up to `runner_seq`; the rest is sent
    /// again.
    pub fn rewind(&self, runner_seq: i64) {
        self.ack(runner_seq);
        let mut state = self.state.lock().expect("outbox lock");
        state.sent_upto = runner_seq;
    }

    /// The runner_seq of the last event pushed (0: none yet).
    pub fn last_pushed(&self) -> i64 {
        self.state.lock().expect("outbox lock").next_seq - 1
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn numbers_batches_resends_and_acks() {
        let outbox = Outbox::new(10, || {});
        for i in 0..5 {
            outbox.push("content.delta", json!({"i": i})).await;
        }
        let first = outbox.take_unsent(3);
        assert_eq!(
            first.iter().map(|e| e.runner_seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(outbox.take_unsent(10).len(), 2);
        assert!(!outbox.has_unsent());
        outbox.ack(2);
        // Reconnected: the manager had 1..=3; 4 and 5 go again.
        outbox.rewind(3);
        assert_eq!(
            outbox
                .take_unsent(10)
                .iter()
                .map(|e| e.runner_seq)
                .collect::<Vec<_>>(),
            [4, 5]
        );
        assert_eq!(outbox.last_pushed(), 5);
    }

    #[tokio::test]
    async fn a_full_outbox_waits_for_acknowledgements() {
        let outbox = Arc::new(Outbox::new(2, || {}));
        outbox.push("a", json!({})).await;
        outbox.push("b", json!({})).await;
        let pusher = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.push("c", json!({})).await }
        });
        tokio::task::yield_now().await;
        assert!(!pusher.is_finished(), "the third event must wait");
        outbox.take_unsent(10);
        outbox.ack(1);
        tokio::time::timeout(Duration::from_secs(1), pusher)
            .await
            .unwrap()
            .unwrap();
    }
}
