//! Sessions: conversations that span runs.
//!
//! This module owns the session row and its rules: the boundary (a session never crosses
//! tenant, project or backend profile), the `version` bumped on every user-visible change,
//! the last and active run, per-reader read cursors and the attention state derived from
//! them, and the reads behind SessionService (one view, pages in attention order, the
//! event log of all the session's runs).
//!
//! `active_run_id` is recomputed from the runs table whenever a run of the session is
//! created or ends ([`touch_runs`], the only two moments a run changes between
//! non-terminal and terminal), under the session's row lock, so it never names an ended
//! run and is never empty while a run of the session is still open. The same statement
//! gives a session without a title its first run's (metadata `"title"`, else the first
//! prompt, bounded to [`TITLE_CHARS`]) and keeps the provider thread id an ending run's
//! turns reported last (`turn.completed` `provider_thread_id`, at most 1,024
//! characters); clients set titles with [`set_title`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentrun_shared::error::FieldError;
use agentrun_shared::ids::{RunId, SessionId};
use agentrun_shared::state::RunStatus;
use deadpool_postgres::GenericClient;
use serde_json::Value;
use tokio_postgres::Row;
use uuid::Uuid;

use super::events::{self, EventRecord};
use super::{Tenant, parse_state};
use crate::error::{Error, Result};

/// Creates the session if it does not exist, or checks that the existing one belongs to
/// the same tenant, project and backend profile.
///
/// The row is locked for update (not share): the caller's transaction goes on to bump the
/// session in [`touch_runs`], and two creators holding share locks would deadlock on that
/// upgrade.
pub(crate) async fn ensure(
    tx: &impl GenericClient,
    tenant: &Tenant,
    session_id: SessionId,
    project_id: &str,
    backend_profile: &str,
) -> Result<()> {
    let upsert = tx
        .prepare_cached(
            "INSERT INTO sessions (id, tenant_id, project_id, backend_profile)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant_id, id) DO NOTHING",
        )
        .await?;
    tx.execute(
        &upsert,
        &[
            &session_id.0,
            &tenant.as_str(),
            &project_id,
            &backend_profile,
        ],
    )
    .await?;
    let stmt = tx
        .prepare_cached(
            "SELECT project_id, backend_profile FROM sessions WHERE tenant_id = $1 AND id = $2
             FOR NO KEY UPDATE",
        )
        .await?;
    // Session ids are per tenant: another tenant's session of the same id is not this one.
    let row = tx
        .query_one(&stmt, &[&tenant.as_str(), &session_id.0])
        .await?;
    if row.get::<_, &str>(0) != project_id {
        return Err(Error::invalid("session_id", "belongs to another project"));
    }
    if row.get::<_, &str>(1) != backend_profile {
        return Err(Error::invalid(
            "session_id",
            "belongs to another backend_profile",
        ));
    }
    Ok(())
}

/// Records that these runs were created or ended: bumps their sessions' version (once per
/// session), remembers the newest run as the last one, and recomputes the active run.
///
/// Called in the transaction that inserted the runs or made them terminal. The sessions
/// are locked first, in id order, and the active run is recomputed in a later statement:
/// under READ COMMITTED that statement sees every transaction that held the lock before,
/// so of two runs of one session ending at once, the second to commit clears the field.
pub(crate) async fn touch_runs(tx: &impl GenericClient, run_ids: &[Uuid]) -> Result<()> {
    if run_ids.is_empty() {
        return Ok(());
    }
    let lock = tx
        .prepare_cached(
            "SELECT id FROM sessions
             WHERE (tenant_id, id) IN (SELECT tenant_id, session_id FROM runs WHERE id = ANY($1))
             ORDER BY tenant_id, id FOR NO KEY UPDATE",
        )
        .await?;
    tx.execute(&lock, &[&run_ids]).await?;
    // Run ids are time-ordered (UUIDv7), so the greatest is the newest run. The title
    // candidate of a run is its metadata "title", else the prompt of its first turn
    // (whitespace collapsed, trimmed, at most TITLE_CHARS characters ending in "…" when
    // cut); a session without a title takes its oldest run's candidate. The thread id is
    // the newest one these runs' turns reported (see `context`).
    let stmt = tx
        .prepare_cached(
            "UPDATE sessions s SET version = s.version + 1,
                    last_run_id = GREATEST(s.last_run_id, t.newest_run_id),
                    active_run_id = (SELECT r.id FROM runs r
                                     WHERE r.session_id = s.id AND r.tenant_id = s.tenant_id
                                       AND r.status = ANY($2)
                                     ORDER BY r.id DESC LIMIT 1),
                    title = CASE WHEN s.title = '' THEN coalesce(t.title, '') ELSE s.title END,
                    provider_thread_id = coalesce(t.thread_id, s.provider_thread_id),
                    updated_at = now()
             FROM (SELECT r.tenant_id, r.session_id,
                          (array_agg(r.id ORDER BY r.id DESC))[1] AS newest_run_id,
                          (array_agg(CASE WHEN char_length(d.raw) > $3::int
                                          THEN left(d.raw, $3::int - 1) || '…'
                                          ELSE d.raw END ORDER BY r.id)
                               FILTER (WHERE d.raw <> ''))[1] AS title,
                          (array_agg(th.thread_id ORDER BY r.id DESC)
                               FILTER (WHERE th.thread_id IS NOT NULL))[1] AS thread_id
                   FROM runs r
                   CROSS JOIN LATERAL (
                       SELECT coalesce(
                           nullif(btrim(regexp_replace(left(CASE WHEN jsonb_typeof(r.metadata->'title') = 'string'
                                                                 THEN r.metadata->>'title' END, 1000),
                                                       '[[:space:]]+', ' ', 'g')), ''),
                           btrim(regexp_replace(left((SELECT c.payload->>'prompt' FROM run_commands c
                                                      WHERE c.run_id = r.id AND c.kind = 'turn'
                                                      ORDER BY c.seq LIMIT 1), 1000),
                                                '[[:space:]]+', ' ', 'g')),
                           '') AS raw
                   ) d
                   LEFT JOIN LATERAL (
                       SELECT e.payload->>'provider_thread_id' AS thread_id FROM conversation_events e
                       WHERE e.run_id = r.id AND e.type = 'turn.completed'
                         AND char_length(e.payload->>'provider_thread_id') BETWEEN 1 AND 1024
                       ORDER BY e.seq DESC LIMIT 1
                   ) th ON true
                   WHERE r.id = ANY($1) AND r.session_id IS NOT NULL
                   GROUP BY r.tenant_id, r.session_id) t
             WHERE s.id = t.session_id AND s.tenant_id = t.tenant_id",
        )
        .await?;
    tx.execute(&stmt, &[&run_ids, &open_statuses(), &(TITLE_CHARS as i32)])
        .await?;
    Ok(())
}

/// Longest title taken from a run (metadata or prompt), in characters.
pub const TITLE_CHARS: usize = 80;
/// Longest title a client may set, in characters.
pub const MAX_TITLE_CHARS: usize = 200;

/// Sets the title of a session of the tenant and returns the session as `reader` sees
/// it. A new title bumps the version (a user-visible change); the same title changes
/// nothing. `title` was validated by the caller.
pub async fn set_title(
    client: &impl GenericClient,
    tenant: &Tenant,
    session_id: SessionId,
    title: &str,
    reader: &str,
) -> Result<SessionView> {
    let stmt = client
        .prepare_cached(
            "UPDATE sessions SET title = $3, version = version + 1, updated_at = now()
             WHERE id = $1 AND tenant_id = $2 AND title <> $3",
        )
        .await?;
    client
        .execute(&stmt, &[&session_id.0, &tenant.as_str(), &title])
        .await?;
    // NOT_FOUND here when the session is not the tenant's.
    get(client, tenant, session_id, reader).await
}

/// Spellings of the run statuses that are not terminal.
fn open_statuses() -> Vec<&'static str> {
    RunStatus::ALL
        .iter()
        .filter(|s| !s.is_terminal())
        .map(|s| s.as_str())
        .collect()
}

fn terminal_statuses() -> Vec<&'static str> {
    RunStatus::ALL
        .iter()
        .filter(|s| s.is_terminal())
        .map(|s| s.as_str())
        .collect()
}

/// A session as stored.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    pub id: SessionId,
    pub project_id: String,
    pub backend_profile: String,
    pub title: String,
    pub provider_thread_id: Option<String>,
    /// The newest run of the session.
    pub last_run_id: Option<RunId>,
    /// The newest run of the session that has not ended.
    pub active_run_id: Option<RunId>,
    pub version: i64,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

/// What a session asks of one reader. The order is the list order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Attention {
    /// A run of the session has not ended.
    Active,
    /// Nothing active, and the session changed since the reader's cursor (or the reader
    /// never marked it read).
    Unread,
    /// Nothing active, and the reader has seen the current version.
    Read,
}

impl Attention {
    /// The rank the SQL computes (see `view_sql!`).
    fn rank(self) -> i32 {
        match self {
            Attention::Active => 0,
            Attention::Unread => 1,
            Attention::Read => 2,
        }
    }

    fn from_rank(rank: i32) -> Option<Self> {
        match rank {
            0 => Some(Attention::Active),
            1 => Some(Attention::Unread),
            2 => Some(Attention::Read),
            _ => None,
        }
    }
}

/// A session as one reader sees it.
#[derive(Debug, Clone)]
pub struct SessionView {
    pub session: SessionRecord,
    pub attention: Attention,
    /// Status of the last run (none only if the session has no run).
    pub last_run_status: Option<RunStatus>,
}

impl SessionView {
    /// Reads a row selected by `view_sql!`.
    fn from_row(row: &Row) -> Result<Self> {
        let rank: i32 = row.get("attention");
        let attention = Attention::from_rank(rank)
            .ok_or_else(|| Error::Internal(format!("unknown attention rank {rank}")))?;
        let last_run_status = row
            .get::<_, Option<&str>>("last_run_status")
            .map(|s| parse_state("run status", s, RunStatus::from_db))
            .transpose()?;
        Ok(Self {
            session: SessionRecord {
                id: SessionId(row.get("id")),
                project_id: row.get("project_id"),
                backend_profile: row.get("backend_profile"),
                title: row.get("title"),
                provider_thread_id: row.get("provider_thread_id"),
                last_run_id: row.get::<_, Option<Uuid>>("last_run_id").map(RunId),
                active_run_id: row.get::<_, Option<Uuid>>("active_run_id").map(RunId),
                version: row.get("version"),
                created_at: row.get("created_at"),
                updated_at: row.get("updated_at"),
            },
            attention,
            last_run_status,
        })
    }

    /// Where this view sits in list order.
    pub fn page_key(&self) -> PageKey {
        PageKey {
            attention: self.attention,
            updated_at: self.session.updated_at,
            id: self.session.id,
        }
    }
}

/// The session view: the session, its last run's status and end, and the attention rank
/// for the reader `$2` (0 active, 1 unread, 2 read; see [`Attention`]). A reader without
/// a cursor row has read nothing, so any session without an open run is unread to them.
/// Callers add the WHERE clause, with the tenant as `$1`.
macro_rules! view_sql {
    () => {
        "SELECT s.id, s.project_id, s.backend_profile, s.title, s.provider_thread_id,
                s.last_run_id, s.active_run_id, s.version, s.created_at, s.updated_at,
                r.status AS last_run_status, r.finished_at AS last_run_finished_at,
                CASE WHEN s.active_run_id IS NOT NULL THEN 0
                     WHEN s.version > coalesce(c.read_version, 0) THEN 1
                     ELSE 2 END AS attention
         FROM sessions s
         LEFT JOIN runs r ON r.id = s.last_run_id
         LEFT JOIN session_read_cursors c
                ON c.tenant_id = s.tenant_id AND c.session_id = s.id AND c.reader = $2 "
    };
}

/// A session of the tenant, as `reader` sees it.
/// For each session, a mark of its runs' logs that moves whenever any of them grows:
/// the sum of their `last_event_seq`. Sessions without runs are left out.
pub async fn log_marks(
    client: &impl GenericClient,
    sessions: &[(Tenant, SessionId)],
) -> Result<Vec<((Tenant, SessionId), i64)>> {
    let tenants: Vec<&str> = sessions.iter().map(|(t, _)| t.as_str()).collect();
    let ids: Vec<Uuid> = sessions.iter().map(|(_, s)| s.0).collect();
    let stmt = client
        .prepare_cached(
            "SELECT w.tenant, w.session, sum(r.last_event_seq)::bigint
             FROM unnest($1::text[], $2::uuid[]) AS w(tenant, session)
             JOIN runs r ON r.tenant_id = w.tenant AND r.session_id = w.session
             GROUP BY w.tenant, w.session",
        )
        .await?;
    let rows = client.query(&stmt, &[&tenants, &ids]).await?;
    Ok(rows
        .iter()
        .map(|row| {
            let key = (Tenant(row.get(0)), SessionId(row.get(1)));
            (key, row.get(2))
        })
        .collect())
}

pub async fn get(
    client: &impl GenericClient,
    tenant: &Tenant,
    session_id: SessionId,
    reader: &str,
) -> Result<SessionView> {
    let stmt = client
        .prepare_cached(concat!(view_sql!(), "WHERE s.tenant_id = $1 AND s.id = $3"))
        .await?;
    let row = client
        .query_opt(&stmt, &[&tenant.as_str(), &reader, &session_id.0])
        .await?
        .ok_or(Error::NotFound { what: "session" })?;
    SessionView::from_row(&row)
}

/// Moves `reader`'s cursor of a session of the tenant up to `version` (`None`: the current
/// version) and returns the session as the reader now sees it. A cursor never moves back;
/// a version the session has not reached is refused and changes nothing.
pub async fn mark_read(
    client: &impl GenericClient,
    tenant: &Tenant,
    session_id: SessionId,
    reader: &str,
    version: Option<i64>,
) -> Result<SessionView> {
    // One statement: the check against the current version and the upsert cannot be
    // separated by a concurrent change (versions only rise, so a version that passed the
    // check stays valid).
    let stmt = client
        .prepare_cached(
            "WITH s AS (SELECT tenant_id, id, version FROM sessions WHERE id = $1 AND tenant_id = $2),
                  moved AS (
                      INSERT INTO session_read_cursors (tenant_id, session_id, reader, read_version)
                      SELECT tenant_id, id, $3, coalesce($4::bigint, version) FROM s
                      WHERE coalesce($4::bigint, version) <= version
                      ON CONFLICT (tenant_id, session_id, reader) DO UPDATE
                          SET read_version = GREATEST(session_read_cursors.read_version,
                                                      EXCLUDED.read_version),
                              updated_at = now()
                      RETURNING read_version)
             SELECT version FROM s",
        )
        .await?;
    let row = client
        .query_opt(&stmt, &[&session_id.0, &tenant.as_str(), &reader, &version])
        .await?
        .ok_or(Error::NotFound { what: "session" })?;
    let current: i64 = row.get(0);
    if let Some(wanted) = version
        && wanted > current
    {
        tracing::debug!(%session_id, wanted, current, "read cursor ahead of the session");
        return Err(Error::invalid(
            "version",
            "is ahead of the session's current version",
        ));
    }
    get(client, tenant, session_id, reader).await
}

/// Which sessions [`list`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateFilter {
    /// Everything except sessions that are read and whose last run ended more than
    /// [`DEFAULT_HIDES_READ_AFTER`] ago.
    #[default]
    Default,
    /// A run of the session has not ended.
    Running,
    /// Nothing active, changed since the reader's cursor.
    Unread,
    /// Nothing active, and the last run has ended (read or unread).
    Terminal,
    /// Nothing active, read.
    Idle,
    All,
}

impl StateFilter {
    /// The spelling the list SQL branches on.
    fn as_str(self) -> &'static str {
        match self {
            StateFilter::Default => "default",
            StateFilter::Running => "running",
            StateFilter::Unread => "unread",
            StateFilter::Terminal => "terminal",
            StateFilter::Idle => "idle",
            StateFilter::All => "all",
        }
    }
}

/// How long after its last run ended a read session still shows in the default list
/// (the `'7 days'` in the list SQL).
pub const DEFAULT_HIDES_READ_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// A position in list order: attention rank, then `updated_at` descending, then id
/// descending. The opaque page token is its encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageKey {
    pub attention: Attention,
    pub updated_at: SystemTime,
    pub id: SessionId,
}

impl PageKey {
    /// The page token: `<rank>.<updated_at micros>.<id>`, hex-encoded so callers treat it
    /// as opaque. Timestamps are stored with microsecond precision, so this is exact.
    pub fn encode(&self) -> String {
        let micros = self
            .updated_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let text = format!(
            "{}.{}.{}",
            self.attention.rank(),
            micros,
            self.id.0.simple()
        );
        text.bytes().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses a token made by [`Self::encode`]; `field` names the request field.
    pub fn decode(field: &str, token: &str) -> Result<Self, FieldError> {
        let bad = || FieldError::new(field, "is not a page token from this list");
        if !token.len().is_multiple_of(2) || token.len() > 256 {
            return Err(bad());
        }
        let bytes = (0..token.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(bad)?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let mut parts = text.split('.');
        let (Some(rank), Some(micros), Some(id), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let attention = rank
            .parse()
            .ok()
            .and_then(Attention::from_rank)
            .ok_or_else(bad)?;
        let micros: u64 = micros.parse().map_err(|_| bad())?;
        // Beyond any real timestamp (and PostgreSQL's range): refuse rather than overflow.
        if micros > 1 << 60 {
            return Err(bad());
        }
        let id = Uuid::try_parse(id).map_err(|_| bad())?;
        Ok(Self {
            attention,
            updated_at: UNIX_EPOCH + Duration::from_micros(micros),
            id: SessionId(id),
        })
    }
}

/// Filters and paging for [`list`]; empty options do not filter.
#[derive(Debug, Clone)]
pub struct SessionFilter {
    pub state: StateFilter,
    pub reader: String,
    pub backend_profile: Option<String>,
    pub project_id: Option<String>,
    /// Only sessions after this position (the page cursor).
    pub after: Option<PageKey>,
    pub limit: i64,
}

/// One page of [`list`]; `next` is set when more sessions follow.
#[derive(Debug, Clone)]
pub struct SessionPage {
    pub sessions: Vec<SessionView>,
    pub next: Option<PageKey>,
}

/// Sessions of the tenant as `filter.reader` sees them: active first, then unread, then
/// read, each most recently updated first (ties by id). Keyset paging on that order never
/// skips or repeats a session while the set is unchanged.
///
/// The attention rank depends on the reader, so the order cannot come from an index: the
/// tenant's sessions (narrowed by project and profile) are ranked on every page.
pub async fn list(
    client: &impl GenericClient,
    tenant: &Tenant,
    filter: &SessionFilter,
) -> Result<SessionPage> {
    let stmt = client
        .prepare_cached(concat!(
            "SELECT * FROM (",
            view_sql!(),
            "WHERE s.tenant_id = $1
               AND ($3::text IS NULL OR s.backend_profile = $3)
               AND ($4::text IS NULL OR s.project_id = $4)) v
             WHERE CASE $5::text
                     WHEN 'all' THEN true
                     WHEN 'running' THEN attention = 0
                     WHEN 'unread' THEN attention = 1
                     WHEN 'idle' THEN attention = 2
                     WHEN 'terminal' THEN attention > 0 AND last_run_status = ANY($6)
                     ELSE NOT (attention = 2 AND
                               coalesce(last_run_finished_at < now() - interval '7 days', false))
                   END
               AND ($7::int IS NULL OR attention > $7
                    OR (attention = $7 AND (updated_at < $8 OR (updated_at = $8 AND id < $9))))
             ORDER BY attention, updated_at DESC, id DESC
             LIMIT $10"
        ))
        .await?;
    let after = filter.after.as_ref();
    let rows = client
        .query(
            &stmt,
            &[
                &tenant.as_str(),
                &filter.reader,
                &filter.backend_profile,
                &filter.project_id,
                &filter.state.as_str(),
                &terminal_statuses(),
                &after.map(|k| k.attention.rank()),
                &after.map(|k| k.updated_at),
                &after.map(|k| k.id.0),
                // One more than asked: tells whether another page follows.
                &(filter.limit + 1),
            ],
        )
        .await?;
    let mut sessions = rows
        .iter()
        .map(SessionView::from_row)
        .collect::<Result<Vec<_>>>()?;
    let more = sessions.len() as i64 > filter.limit;
    sessions.truncate(filter.limit.max(0) as usize);
    let next = if more {
        sessions.last().map(SessionView::page_key)
    } else {
        None
    };
    Ok(SessionPage { sessions, next })
}

/// Event types that are output whatever their payload.
pub const OUTPUT_EVENT_TYPES: &[&str] = &["diff.updated", "runtime.error", "run.terminal"];
/// `content.delta` stream kinds that are output.
pub const OUTPUT_DELTA_KINDS: &[&str] = &["assistant_text", "command_output"];
/// `item.completed` item kinds that are output.
pub const OUTPUT_ITEM_KINDS: &[&str] = &["assistant_message"];

/// Whether an event is output (what `output_only` keeps): assistant text and command
/// output deltas, completed assistant messages, diffs, runtime errors and the run's end.
/// The same rule as the SQL of [`list_events`], for callers filtering live events.
pub fn is_output(event_type: &str, payload: &Value) -> bool {
    let kind = payload.get("kind").and_then(Value::as_str);
    match event_type {
        "content.delta" => kind.is_some_and(|k| OUTPUT_DELTA_KINDS.contains(&k)),
        "item.completed" => kind.is_some_and(|k| OUTPUT_ITEM_KINDS.contains(&k)),
        t => OUTPUT_EVENT_TYPES.contains(&t),
    }
}

/// Where [`list_events`] resumes: after event `seq` of run `run_id` (`None`: from the
/// start).
#[derive(Debug, Clone, Copy, Default)]
pub struct EventCursor {
    pub run_id: Option<RunId>,
    pub seq: i64,
}

/// Events of all runs of a session of the tenant after `after`, in run order (run ids
/// are time-ordered) then seq, at most `limit` and [`events::PAGE_BYTES`] of payload past
/// the first; with `output_only`, only [`is_output`]
/// events. One statement: a session that is not the tenant's is NOT_FOUND, not empty.
pub async fn list_events(
    client: &impl GenericClient,
    tenant: &Tenant,
    session_id: SessionId,
    output_only: bool,
    after: EventCursor,
    limit: i64,
) -> Result<Vec<EventRecord>> {
    // The session row is always returned (when it is the tenant's); a row without an
    // event means the page is empty.
    let stmt = client
        .prepare_cached(
            "SELECT * FROM (
             SELECT e.run_id, e.seq, e.type, e.payload, e.runner_id, e.epoch, e.runner_seq,
                    e.created_at,
                    sum(octet_length(e.payload::text)) OVER (ORDER BY e.run_id, e.seq)
                        - octet_length(e.payload::text) AS bytes_before
             FROM sessions s
             LEFT JOIN LATERAL (
                 SELECT e.* FROM runs r JOIN events e ON e.run_id = r.id
                 WHERE r.session_id = s.id AND r.tenant_id = s.tenant_id
                   AND r.id >= $3 AND (r.id, e.seq) > ($3, $4)
                   AND (NOT $5
                        OR e.type = ANY($6)
                        OR (e.type = 'content.delta' AND e.payload->>'kind' = ANY($7))
                        OR (e.type = 'item.completed' AND e.payload->>'kind' = ANY($8)))
                 ORDER BY r.id, e.seq
                 LIMIT $9
             ) e ON true
             WHERE s.id = $1 AND s.tenant_id = $2
             ) page
             WHERE bytes_before IS NULL OR bytes_before < $10
             ORDER BY run_id, seq",
        )
        .await?;
    // The nil UUID sorts before every run id: no cursor means from the first run.
    let after_run = after.run_id.map_or(Uuid::nil(), |r| r.0);
    let rows = client
        .query(
            &stmt,
            &[
                &session_id.0,
                &tenant.as_str(),
                &after_run,
                &after.seq,
                &output_only,
                &OUTPUT_EVENT_TYPES,
                &OUTPUT_DELTA_KINDS,
                &OUTPUT_ITEM_KINDS,
                &limit,
                &events::PAGE_BYTES,
            ],
        )
        .await?;
    if rows.is_empty() {
        return Err(Error::NotFound { what: "session" });
    }
    Ok(rows
        .iter()
        .filter(|row| row.get::<_, Option<Uuid>>("run_id").is_some())
        .map(EventRecord::from_row)
        .collect())
}

#[cfg(test)]
mod tests {
    use agentrun_shared::events::EventType;
    use serde_json::json;

    use super::*;

    #[test]
    fn page_tokens_round_trip_and_refuse_garbage() {
        let key = PageKey {
            attention: Attention::Unread,
            updated_at: UNIX_EPOCH + Duration::from_micros(1_712_345_678_901_234),
            id: SessionId::new(),
        };
        let token = key.encode();
        assert_eq!(PageKey::decode("page_token", &token).unwrap(), key);
        for bad in [
            "",
            "zz",
            "abc",
            "00",
            &token[..token.len() - 2],
            "312e322e33",
        ] {
            let err = PageKey::decode("page_token", bad).unwrap_err();
            assert_eq!(err.field, "page_token", "{bad:?}");
        }
    }

    #[test]
    fn output_rule_names_real_event_types() {
        for t in OUTPUT_EVENT_TYPES {
            assert!(EventType::parse("type", t).is_ok(), "{t}");
        }
        assert!(is_output(
            "content.delta",
            &json!({"kind": "command_output"})
        ));
        assert!(!is_output(
            "content.delta",
            &json!({"kind": "reasoning_text"})
        ));
        assert!(is_output(
            "item.completed",
            &json!({"kind": "assistant_message"})
        ));
        assert!(!is_output("item.completed", &json!({"kind": "tool_call"})));
        assert!(is_output("run.terminal", &json!({})));
        assert!(!is_output("turn.started", &json!({})));
    }
}
