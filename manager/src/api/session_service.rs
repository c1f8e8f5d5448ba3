//! `agentrun.v1.SessionService`: reading sessions (conversations that span runs) and
//! their per-reader attention state, and setting their titles. Sessions are created and
//! kept by CreateRun and run endings (`store::sessions`); these handlers only validate,
//! convert, call the store and map errors. WatchSession's following loop lives in `watch`.

use agentrun_shared::error::FieldError;
use agentrun_shared::ids::{RunId, SessionId};
use agentrun_shared::proto::{self, session_service_server::SessionService};
use tonic::{Request, Response, Status};

use super::{AppState, caller, convert, validate};
use crate::error::{Error, Result};
use crate::store::api_keys::Role;
use crate::store::sessions::{
    self, Attention, EventCursor, PageKey, SessionFilter, SessionView, StateFilter,
};

/// The reader whose cursor decides attention when a request names none.
const DEFAULT_READER: &str = "default";

pub struct SessionApi {
    state: AppState,
}

impl SessionApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

/// The (run, seq) position a session's event listing resumes after.
fn event_cursor(after_run_id: &str, after_seq: i64) -> Result<EventCursor, FieldError> {
    let after = EventCursor {
        run_id: RunId::parse_optional("after_run_id", after_run_id)?,
        seq: validate::cursor("after_seq", after_seq)?,
    };
    if after.run_id.is_none() && after.seq > 0 {
        return Err(FieldError::new("after_seq", "needs after_run_id"));
    }
    Ok(after)
}

fn reader(text: &str) -> Result<&str, FieldError> {
    validate::name_or("reader", text, DEFAULT_READER)
}

/// A title a client sets: trimmed, 1 to [`sessions::MAX_TITLE_CHARS`] characters, no
/// control characters.
fn title(text: &str) -> Result<&str, FieldError> {
    let title = text.trim();
    if title.is_empty() {
        return Err(FieldError::new("title", "is required"));
    }
    if title.chars().count() > sessions::MAX_TITLE_CHARS {
        return Err(FieldError::new(
            "title",
            format!("is longer than {} characters", sessions::MAX_TITLE_CHARS),
        ));
    }
    if title.chars().any(char::is_control) {
        return Err(FieldError::new(
            "title",
            "must not contain control characters",
        ));
    }
    Ok(title)
}

fn state_filter(value: i32) -> Result<StateFilter, FieldError> {
    use proto::SessionStateFilter as P;
    Ok(match P::try_from(value) {
        Ok(P::Default) => StateFilter::Default,
        Ok(P::Running) => StateFilter::Running,
        Ok(P::Unread) => StateFilter::Unread,
        Ok(P::Terminal) => StateFilter::Terminal,
        Ok(P::Idle) => StateFilter::Idle,
        Ok(P::All) => StateFilter::All,
        Err(_) => {
            return Err(FieldError::new("state", format!("unknown value {value}")));
        }
    })
}

fn view(v: &SessionView) -> proto::SessionView {
    let s = &v.session;
    let attention = match v.attention {
        Attention::Active => proto::SessionAttention::Active,
        Attention::Unread => proto::SessionAttention::Unread,
        Attention::Read => proto::SessionAttention::Read,
    };
    proto::SessionView {
        session: Some(proto::Session {
            session_id: s.id.to_string(),
            project_id: s.project_id.clone(),
            backend_profile: s.backend_profile.clone(),
            title: s.title.clone(),
            provider_thread_id: s.provider_thread_id.clone().unwrap_or_default(),
            last_run_id: s.last_run_id.map(|r| r.to_string()).unwrap_or_default(),
            version: s.version,
            created_at: convert::timestamp(Some(s.created_at)),
            updated_at: convert::timestamp(Some(s.updated_at)),
        }),
        attention: attention as i32,
        last_run_status: v.last_run_status.map_or(0, |st| st.to_proto() as i32),
    }
}

#[tonic::async_trait]
impl SessionService for SessionApi {
    async fn get_session(
        &self,
        request: Request<proto::GetSessionRequest>,
    ) -> Result<Response<proto::GetSessionResponse>, Status> {
        let tenant = caller(&self.state, &request, Role::Client).await?.tenant;
        let r = request.get_ref();
        let session_id = SessionId::parse("session_id", &r.session_id).map_err(Error::from)?;
        let reader = reader(&r.reader).map_err(Error::from)?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let found = sessions::get(&client, &tenant, session_id, reader).await?;
        Ok(Response::new(proto::GetSessionResponse {
            session: Some(view(&found)),
        }))
    }

    async fn list_sessions(
        &self,
        request: Request<proto::ListSessionsRequest>,
    ) -> Result<Response<proto::ListSessionsResponse>, Status> {
        let tenant = caller(&self.state, &request, Role::Client).await?.tenant;
        let r = request.get_ref();
        let filter = SessionFilter {
            state: state_filter(r.state).map_err(Error::from)?,
            reader: reader(&r.reader).map_err(Error::from)?.to_owned(),
            backend_profile: validate::optional_name("backend_profile", &r.backend_profile)
                .map_err(Error::from)?,
            project_id: validate::optional_name("project_id", &r.project_id)
                .map_err(Error::from)?,
            after: if r.page_token.is_empty() {
                None
            } else {
                Some(PageKey::decode("page_token", &r.page_token).map_err(Error::from)?)
            },
            limit: validate::bounded("page_size", r.page_size.into(), 50, 1, 200)
                .map_err(Error::from)?,
        };
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let page = sessions::list(&client, &tenant, &filter).await?;
        Ok(Response::new(proto::ListSessionsResponse {
            sessions: page.sessions.iter().map(view).collect(),
            next_page_token: page.next.map(|k| k.encode()).unwrap_or_default(),
        }))
    }

    async fn mark_session_read(
        &self,
        request: Request<proto::MarkSessionReadRequest>,
    ) -> Result<Response<proto::MarkSessionReadResponse>, Status> {
        let tenant = caller(&self.state, &request, Role::Client).await?.tenant;
        let r = request.get_ref();
        let session_id = SessionId::parse("session_id", &r.session_id).map_err(Error::from)?;
        let reader = reader(&r.reader).map_err(Error::from)?;
        let version = match validate::cursor("version", r.version).map_err(Error::from)? {
            0 => None,
            v => Some(v),
        };
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let marked = sessions::mark_read(&client, &tenant, session_id, reader, version).await?;
        Ok(Response::new(proto::MarkSessionReadResponse {
            session: Some(view(&marked)),
        }))
    }

    async fn list_session_events(
        &self,
        request: Request<proto::ListSessionEventsRequest>,
    ) -> Result<Response<proto::ListSessionEventsResponse>, Status> {
        let tenant = caller(&self.state, &request, Role::Client).await?.tenant;
        let r = request.get_ref();
        let session_id = SessionId::parse("session_id", &r.session_id).map_err(Error::from)?;
        let after = event_cursor(&r.after_run_id, r.after_seq).map_err(Error::from)?;
        let limit =
            validate::bounded("limit", r.limit.into(), 200, 1, 1000).map_err(Error::from)?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let found =
            sessions::list_events(&client, &tenant, session_id, r.output_only, after, limit)
                .await?;
        Ok(Response::new(proto::ListSessionEventsResponse {
            events: convert::events(found),
        }))
    }

    async fn set_session_title(
        &self,
        request: Request<proto::SetSessionTitleRequest>,
    ) -> Result<Response<proto::SetSessionTitleResponse>, Status> {
        let tenant = caller(&self.state, &request, Role::Client).await?.tenant;
        let r = request.get_ref();
        let session_id = SessionId::parse("session_id", &r.session_id).map_err(Error::from)?;
        let title = title(&r.title).map_err(Error::from)?;
        let reader = reader(&r.reader).map_err(Error::from)?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let updated = sessions::set_title(&client, &tenant, session_id, title, reader).await?;
        Ok(Response::new(proto::SetSessionTitleResponse {
            session: Some(view(&updated)),
        }))
    }

    type WatchSessionStream = super::watch::SessionEventStream;

    async fn watch_session(
        &self,
        request: Request<proto::WatchSessionRequest>,
    ) -> Result<Response<Self::WatchSessionStream>, Status> {
        let caller = caller(&self.state, &request, Role::Client).await?;
        let r = request.get_ref();
        let session_id = SessionId::parse("session_id", &r.session_id).map_err(Error::from)?;
        let after = event_cursor(&r.after_run_id, r.after_seq).map_err(Error::from)?;
        let stream = super::watch::watch_session(
            &self.state,
            &caller.tenant,
            caller.key_id,
            session_id,
            r.output_only,
            after,
        )
        .await?;
        Ok(Response::new(stream))
    }
}
