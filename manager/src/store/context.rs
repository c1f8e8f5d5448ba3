//! Conversation context: what a run hands its provider about the conversation so far.
//!
//! When a run is handed to a runner (claimed, or adopted by a restarted runner) it
//! carries the completed turns of its session's earlier runs and its own completed turns
//! (those an earlier lease finished before the run moved), oldest first, and the
//! provider thread id last reported for the run or its session. All of it is read from
//! the log, for every run of a hand-over in one statement: a turn is a `turn.completed`
//! of state `completed`, its prompt the `turn` command its `turn.started` names, its
//! reply the `item.completed` assistant messages between the two (or, from a provider
//! that streams text without completing an item, the `assistant_text` deltas joined).
//!
//! A run made by RerunRun or ForkRun starts where its source did: its context source's
//! turns completed before the point it was made from (none for a re-run, those before
//! the forked turn for a fork; followed back through at most 8 such sources), and the
//! session's runs before them, never the turns that came after.
//!
//! Turn boundaries and completed messages are read through the `conversation_events`
//! view, whose index holds only the log batches that carry them: a run's deltas are
//! never unpacked (except for the rare reply made of deltas alone).
//!
//! A run leased before also learns how its own last turn ended (the newest
//! `turn.completed` of any state), so a run that moved after that turn ended, with no
//! command left open, ends as the turn left it.
//!
//! The thread id is that of the newest `turn.completed` naming a `provider_thread_id`
//! (1 to 1,024 characters; longer ones are ignored), else the session's; a re-run or
//! fork reads only its own.
//!
//! The context is bounded so an assignment stays small: at most [`MAX_TURNS`] turns and
//! [`MAX_BYTES`] of text, keeping the newest; a prompt or reply longer than
//! [`MAX_TEXT_BYTES`] is cut on a character boundary and ends in "…".

use std::collections::HashMap;

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use crate::error::Result;

/// Most turns in a context.
pub const MAX_TURNS: usize = 32;
/// Most bytes of prompt and reply text in a context.
pub const MAX_BYTES: usize = 64 * 1024;
/// Most bytes of one prompt or one reply.
pub const MAX_TEXT_BYTES: usize = 8 * 1024;
/// Most earlier runs of the session whose turns are read.
const MAX_EARLIER_RUNS: i64 = MAX_TURNS as i64;
/// What marks a cut text.
const ELLIPSIS: &str = "…";

/// One completed turn.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContextTurn {
    pub prompt: String,
    pub reply: String,
}

/// How a turn ended, as its `turn.completed` said.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TurnEnding {
    /// `completed`, `failed`, `blocked`, `interrupted` or `cancelled`.
    pub state: String,
    /// For a failed or blocked turn: its error's kind, message and whether it may be
    /// retried.
    pub error: Option<(String, String, bool)>,
}

/// The conversation a run starts with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Context {
    /// Oldest first, bounded (see the module documentation).
    pub turns: Vec<ContextTurn>,
    /// The provider's thread id last reported for the run or its session.
    pub provider_thread_id: Option<String>,
    /// How the run's own last turn ended, under an earlier lease: a run that moved after
    /// its last turn ended, with nothing left to carry out, ends as that turn left it.
    pub last_turn: Option<TurnEnding>,
}

/// Per target run ($1): the runs whose turns make its context (itself; for a re-run or a
/// fork, its chain of context sources, each up to its seq bound; and its session's newest
/// $2 runs before all of those), their newest $3 completed turns with prompt and reply
/// (each cut to $4 characters; the caller cuts to bytes), and the newest provider thread
/// id reported by those runs, else the session's. A re-run or fork continues no provider
/// thread but its own: the earlier thread holds turns it does not have. One row per turn,
/// or one row with no turn.
const CONTEXT_SQL: &str = "
WITH RECURSIVE target AS (
    SELECT r.id, r.session_id, r.tenant_id, r.context_run_id, r.context_before_seq
    FROM runs r WHERE r.id = ANY($1)
),
chain(target, run_id, before_seq, depth) AS (
    SELECT t.id, t.context_run_id, t.context_before_seq, 1 FROM target t
    WHERE t.context_run_id IS NOT NULL
    UNION ALL
    SELECT c.target, r.context_run_id, r.context_before_seq, c.depth + 1
    FROM chain c JOIN runs r ON r.id = c.run_id
    WHERE r.context_run_id IS NOT NULL AND c.depth < 8
),
source AS (
    SELECT t.id AS target, t.id AS run_id, NULL::bigint AS before_seq FROM target t
    UNION ALL
    SELECT c.target, c.run_id, c.before_seq FROM chain c
    UNION ALL
    SELECT t.id, p.id, NULL FROM target t
    CROSS JOIN LATERAL (
        SELECT r.id FROM runs r
        WHERE r.session_id = t.session_id AND r.tenant_id = t.tenant_id
          AND r.id < coalesce((SELECT c.run_id FROM chain c WHERE c.target = t.id
                               ORDER BY c.run_id LIMIT 1), t.id)
        ORDER BY r.id DESC LIMIT $2::bigint
    ) p
    WHERE t.session_id IS NOT NULL
),
ended AS (
    SELECT t.id AS target, d.run_id, d.seq, d.turn_id FROM target t
    CROSS JOIN LATERAL (
        SELECT e.run_id, e.seq, e.payload->>'turn_id' AS turn_id
        FROM source s JOIN conversation_events e ON e.run_id = s.run_id
        WHERE s.target = t.id AND e.type = 'turn.completed'
          AND e.payload->>'state' = 'completed'
          AND (s.before_seq IS NULL OR e.seq < s.before_seq)
        ORDER BY e.run_id DESC, e.seq DESC
        LIMIT $3::bigint
    ) d
),
turns AS (
    SELECT d.target, d.run_id, d.seq,
           (SELECT left(c.payload->>'prompt', $4::int) FROM run_commands c
            WHERE c.run_id = d.run_id AND c.id::text = st.command_id) AS prompt,
           coalesce(
               (SELECT string_agg(left(i.payload->>'text', $4::int), E'\\n\\n' ORDER BY i.seq)
                FROM conversation_events i
                WHERE i.run_id = d.run_id AND i.seq > st.seq AND i.seq < d.seq
                  AND i.type = 'item.completed' AND i.payload->>'kind' = 'assistant_message'
                  AND i.payload->>'text' IS NOT NULL),
               (SELECT left(string_agg(x.payload->>'delta', '' ORDER BY x.seq), $4::int)
                FROM events x
                WHERE x.run_id = d.run_id AND x.seq > st.seq AND x.seq < d.seq
                  AND x.type = 'content.delta' AND x.payload->>'kind' = 'assistant_text')
           ) AS reply
    FROM ended d
    CROSS JOIN LATERAL (
        SELECT s.seq, s.payload->>'command_id' AS command_id FROM conversation_events s
        WHERE s.run_id = d.run_id AND s.seq < d.seq AND s.type = 'turn.started'
          AND s.payload->>'turn_id' = d.turn_id
        ORDER BY s.seq DESC LIMIT 1
    ) st
),
thread AS (
    SELECT t.id AS target,
           coalesce((SELECT e.payload->>'provider_thread_id'
                     FROM source s JOIN conversation_events e ON e.run_id = s.run_id
                     WHERE s.target = t.id AND e.type = 'turn.completed'
                       AND (t.context_run_id IS NULL OR s.run_id = t.id)
                       AND char_length(e.payload->>'provider_thread_id') BETWEEN 1 AND 1024
                     ORDER BY e.run_id DESC, e.seq DESC LIMIT 1),
                    CASE WHEN t.context_run_id IS NULL THEN ss.provider_thread_id END) AS thread_id
    FROM target t LEFT JOIN sessions ss ON ss.id = t.session_id AND ss.tenant_id = t.tenant_id
),
last_end AS (
    SELECT t.id AS target, e.payload FROM target t
    CROSS JOIN LATERAL (
        SELECT e.payload FROM conversation_events e
        WHERE e.run_id = t.id AND e.type = 'turn.completed'
        ORDER BY e.seq DESC LIMIT 1
    ) e
)
SELECT th.target, th.thread_id, tu.run_id, tu.seq, tu.prompt, tu.reply,
       le.payload->>'state', le.payload->'error'->>'kind', le.payload->'error'->>'message',
       (le.payload->'error'->>'retryable')::boolean
FROM thread th LEFT JOIN last_end le ON le.target = th.target
LEFT JOIN turns tu ON tu.target = th.target
ORDER BY th.target, tu.run_id, tu.seq";

/// The context of each run in `run_ids`, in one statement. Runs without any context
/// are absent from the map.
pub async fn load(tx: &impl GenericClient, run_ids: &[Uuid]) -> Result<HashMap<Uuid, Context>> {
    if run_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let stmt = tx.prepare_cached(CONTEXT_SQL).await?;
    // One character more than fits tells the cut below that the text was longer.
    let chars = (MAX_TEXT_BYTES + 1) as i32;
    let rows = tx
        .query(
            &stmt,
            &[&run_ids, &MAX_EARLIER_RUNS, &(MAX_TURNS as i64), &chars],
        )
        .await?;
    let mut found: HashMap<Uuid, Context> = HashMap::new();
    for row in &rows {
        let context = found.entry(row.get(0)).or_default();
        context.provider_thread_id = row.get(1);
        context.last_turn = row.get::<_, Option<String>>(6).map(|state| TurnEnding {
            state,
            error: row.get::<_, Option<String>>(7).map(|kind| {
                (
                    kind,
                    row.get::<_, Option<String>>(8).unwrap_or_default(),
                    row.get::<_, Option<bool>>(9).unwrap_or(false),
                )
            }),
        });
        if row.get::<_, Option<Uuid>>(2).is_some() {
            context.turns.push(ContextTurn {
                prompt: row.get::<_, Option<String>>(4).unwrap_or_default(),
                reply: row.get::<_, Option<String>>(5).unwrap_or_default(),
            });
        }
    }
    Ok(found
        .into_iter()
        .map(|(run_id, mut context)| {
            context.turns = bound(context.turns);
            (run_id, context)
        })
        .filter(|(_, context)| *context != Context::default())
        .collect())
}

/// A turn of a run as ForkRun starts from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkPoint {
    /// The prompt its `turn` command carried.
    pub prompt: Option<String>,
    /// The seq of its `turn.started`; `None` while it has not started.
    pub started_seq: Option<i64>,
}

/// The `turn` command `turn_id` of the run, and where in the log it started; `None` when
/// the run has no such turn command.
pub async fn fork_point(
    client: &impl GenericClient,
    run_id: Uuid,
    turn_id: Uuid,
) -> Result<Option<ForkPoint>> {
    let stmt = client
        .prepare_cached(
            "SELECT c.payload->>'prompt',
                    (SELECT e.seq FROM conversation_events e
                     WHERE e.run_id = c.run_id AND e.type = 'turn.started'
                       AND e.payload->>'turn_id' = c.id::text
                     ORDER BY e.seq LIMIT 1)
             FROM run_commands c WHERE c.run_id = $1 AND c.id = $2 AND c.kind = 'turn'",
        )
        .await?;
    Ok(client
        .query_opt(&stmt, &[&run_id, &turn_id])
        .await?
        .map(|row| ForkPoint {
            prompt: row.get(0),
            started_seq: row.get(1),
        }))
}

/// Cuts each text to [`MAX_TEXT_BYTES`], then keeps the newest turns (oldest first)
/// within [`MAX_TURNS`] and [`MAX_BYTES`].
pub fn bound(turns: Vec<ContextTurn>) -> Vec<ContextTurn> {
    let mut kept = Vec::new();
    let mut bytes = 0;
    for turn in turns.into_iter().rev() {
        let turn = ContextTurn {
            prompt: cut(turn.prompt, MAX_TEXT_BYTES),
            reply: cut(turn.reply, MAX_TEXT_BYTES),
        };
        let size = turn.prompt.len() + turn.reply.len();
        if kept.len() == MAX_TURNS || bytes + size > MAX_BYTES {
            break;
        }
        bytes += size;
        kept.push(turn);
    }
    kept.reverse();
    kept
}

/// `text` if it fits in `max` bytes, else its longest prefix on a character boundary
/// that fits with "…" after it.
pub fn cut(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max - ELLIPSIS.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut cut = text;
    cut.truncate(end);
    cut.push_str(ELLIPSIS);
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(prompt: &str, reply: &str) -> ContextTurn {
        ContextTurn {
            prompt: prompt.into(),
            reply: reply.into(),
        }
    }

    #[test]
    fn cut_keeps_short_texts_and_cuts_long_ones_on_a_char_boundary() {
        assert_eq!(cut("hello".into(), 5), "hello");
        assert_eq!(cut("hello world".into(), 8), "hello…");
        // "é" is two bytes: the cut never splits it.
        let cut_text = cut("ééééé".into(), 8);
        assert_eq!(cut_text, "éé…");
        assert!(cut_text.len() <= 8);
    }

    #[test]
    fn bound_keeps_the_newest_turns_within_count_and_bytes() {
        let many: Vec<ContextTurn> = (0..MAX_TURNS + 5)
            .map(|i| turn(&format!("p{i}"), &format!("r{i}")))
            .collect();
        let kept = bound(many);
        assert_eq!(kept.len(), MAX_TURNS);
        assert_eq!(kept[0].prompt, "p5", "the oldest are dropped");
        assert_eq!(kept.last().unwrap().prompt, format!("p{}", MAX_TURNS + 4));

        let big = "x".repeat(MAX_TEXT_BYTES * 2);
        let kept = bound(vec![
            turn("old", "small"),
            turn(&big, &big),
            turn(&big, &big),
            turn(&big, &big),
            turn(&big, &big),
            turn("new", "small"),
        ]);
        let bytes: usize = kept.iter().map(|t| t.prompt.len() + t.reply.len()).sum();
        assert!(bytes <= MAX_BYTES, "{bytes}");
        assert_eq!(kept.last().unwrap().prompt, "new");
        assert_ne!(
            kept[0].prompt, "old",
            "what does not fit is dropped, oldest first"
        );
        assert!(kept[1].reply.ends_with(ELLIPSIS));
        assert!(kept[1].reply.len() <= MAX_TEXT_BYTES);
    }
}
