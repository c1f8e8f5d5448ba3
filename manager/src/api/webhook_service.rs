//! `agentrun.v1.WebhookService`: the caller's webhooks and their deliveries. Deliveries
//! themselves are written by the event append and sent by `crate::webhooks`.

use agentrun_shared::error::FieldError;
use agentrun_shared::events::EventType;
use agentrun_shared::proto::{self, webhook_service_server::WebhookService};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::auth::Caller;
use super::{AppState, caller, convert, validate};
use crate::error::Error;
use crate::store::api_keys::Role;
use crate::store::webhooks::{
    self, DeliveryRecord, DeliveryStatus, NewWebhook, WebhookId, WebhookRecord,
};
use crate::webhooks::targets;

/// Most webhooks one tenant may have.
pub const MAX_WEBHOOKS_PER_TENANT: i64 = 100;
/// Longest webhook URL.
pub const MAX_URL_BYTES: usize = 2048;
/// Bounds of a caller's signing secret.
pub const MIN_SECRET_BYTES: usize = 16;
pub const MAX_SECRET_BYTES: usize = 256;

pub struct WebhookApi {
    state: AppState,
}

impl WebhookApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

fn webhook(w: &WebhookRecord) -> proto::Webhook {
    proto::Webhook {
        webhook_id: w.id.to_string(),
        url: w.url.clone(),
        event_types: w.event_types.clone(),
        project_id: w.project_id.clone(),
        created_at: convert::timestamp(Some(w.created_at)),
    }
}

fn delivery(d: &DeliveryRecord) -> proto::Delivery {
    let status = match d.status {
        DeliveryStatus::Pending => proto::DeliveryStatus::Pending,
        DeliveryStatus::Delivered => proto::DeliveryStatus::Delivered,
        DeliveryStatus::Failed => proto::DeliveryStatus::Failed,
    };
    proto::Delivery {
        delivery_id: d.id.to_string(),
        webhook_id: d.webhook_id.to_string(),
        run_id: d.run_id.to_string(),
        seq: d.seq,
        event_type: d.event_type.clone(),
        status: status as i32,
        attempts: d.attempts,
        last_status_code: d.last_status_code.unwrap_or_default(),
        last_error: d.last_error.clone().unwrap_or_default(),
        created_at: convert::timestamp(Some(d.created_at)),
        next_attempt_at: convert::timestamp(d.next_attempt_at),
        delivered_at: convert::timestamp(d.delivered_at),
    }
}

/// An absolute http or https URL with a host, at most [`MAX_URL_BYTES`]; a public one
/// unless `private_targets` ([`crate::webhooks::targets`]).
fn url(field: &str, text: &str, private_targets: bool) -> Result<String, FieldError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    if text.len() > MAX_URL_BYTES {
        return Err(FieldError::new(
            field,
            format!("is longer than {MAX_URL_BYTES} bytes"),
        ));
    }
    let parsed = reqwest::Url::parse(text)
        .map_err(|err| FieldError::new(field, format!("is not a valid URL: {err}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(FieldError::new(field, "must be an http or https URL"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(FieldError::new(field, "must name a host"));
    }
    if !private_targets {
        targets::check_url(&parsed).map_err(|refused| FieldError::new(field, refused))?;
    }
    Ok(parsed.to_string())
}

/// At least one type, each deliverable, duplicates removed (first kept).
fn event_types(field: &str, types: &[String]) -> Result<Vec<String>, FieldError> {
    if types.is_empty() {
        return Err(FieldError::new(field, "must name at least one event type"));
    }
    validate::list_len(field, types.len())?;
    let mut out: Vec<String> = Vec::with_capacity(types.len());
    for (i, text) in types.iter().enumerate() {
        let item = format!("{field}[{i}]");
        let parsed = EventType::parse(&item, text)?;
        if !webhooks::deliverable(parsed) {
            let allowed: Vec<&str> = webhooks::DELIVERABLE.iter().map(|t| t.as_str()).collect();
            return Err(FieldError::new(
                item,
                format!(
                    "{text:?} is not delivered to webhooks (one of: {})",
                    allowed.join(", ")
                ),
            ));
        }
        if !out.iter().any(|t| t == text) {
            out.push(text.clone());
        }
    }
    Ok(out)
}

/// The caller's secret ([`MIN_SECRET_BYTES`]..=[`MAX_SECRET_BYTES`]), or a fresh one of
/// 256 bits from the operating system's CSPRNG (two v4 UUIDs' random bits, as API keys).
fn secret(field: &str, text: &str) -> Result<String, FieldError> {
    if text.is_empty() {
        return Ok(format!(
            "whsec_{}{}",
            Uuid::new_v4().simple(),
            Uuid::new_v4().simple()
        ));
    }
    if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&text.len()) {
        return Err(FieldError::new(
            field,
            format!("must be {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, or empty"),
        ));
    }
    Ok(validate::text(field, text)?.to_owned())
}

/// The project a new webhook is limited to: the one named (which a project-limited key
/// must hold), or for such a key with a single project, that one. '' is every project.
fn project(caller: &Caller, text: &str) -> Result<String, Error> {
    if !text.is_empty() {
        let name = validate::name("project_id", text)?;
        caller.check_project("project_id", name)?;
        return Ok(name.to_owned());
    }
    match caller.projects.as_slice() {
        [] => Ok(String::new()),
        [only] => Ok(only.clone()),
        _ => Err(Error::PermissionDenied(
            "this API key is limited to projects: name one in project_id".into(),
        )),
    }
}

#[tonic::async_trait]
impl WebhookService for WebhookApi {
    async fn create_webhook(
        &self,
        request: Request<proto::CreateWebhookRequest>,
    ) -> Result<Response<proto::CreateWebhookResponse>, Status> {
        let caller = caller(&self.state, &request, Role::Client).await?;
        let r = request.get_ref();
        let new = NewWebhook {
            url: url("url", &r.url, self.state.settings.webhook_private_targets)
                .map_err(Error::from)?,
            event_types: event_types("event_types", &r.event_types).map_err(Error::from)?,
            secret: secret("secret", &r.secret).map_err(Error::from)?,
            project_id: project(&caller, &r.project_id)?,
        };
        let created = webhooks::create(
            &self.state.pool,
            &caller.tenant,
            &new,
            MAX_WEBHOOKS_PER_TENANT,
        )
        .await?;
        tracing::info!(webhook = %created.id, "webhook created");
        Ok(Response::new(proto::CreateWebhookResponse {
            webhook: Some(webhook(&created)),
            secret: new.secret,
        }))
    }

    async fn list_webhooks(
        &self,
        request: Request<proto::ListWebhooksRequest>,
    ) -> Result<Response<proto::ListWebhooksResponse>, Status> {
        let caller = caller(&self.state, &request, Role::Client).await?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        // At most MAX_WEBHOOKS_PER_TENANT: one page holds them all.
        let listed = webhooks::list(&client, &caller.tenant, &caller.projects).await?;
        Ok(Response::new(proto::ListWebhooksResponse {
            webhooks: listed.iter().map(webhook).collect(),
        }))
    }

    async fn delete_webhook(
        &self,
        request: Request<proto::DeleteWebhookRequest>,
    ) -> Result<Response<proto::DeleteWebhookResponse>, Status> {
        let caller = caller(&self.state, &request, Role::Client).await?;
        let id =
            WebhookId::parse("webhook_id", &request.get_ref().webhook_id).map_err(Error::from)?;
        webhooks::delete(&self.state.pool, &caller.tenant, &caller.projects, id).await?;
        tracing::info!(webhook = %id, "webhook deleted");
        Ok(Response::new(proto::DeleteWebhookResponse {}))
    }

    async fn list_deliveries(
        &self,
        request: Request<proto::ListDeliveriesRequest>,
    ) -> Result<Response<proto::ListDeliveriesResponse>, Status> {
        let caller = caller(&self.state, &request, Role::Client).await?;
        let r = request.get_ref();
        let id = WebhookId::parse("webhook_id", &r.webhook_id).map_err(Error::from)?;
        let limit =
            validate::bounded("page_size", r.page_size.into(), 50, 1, 500).map_err(Error::from)?;
        let before = match r.page_token.as_str() {
            "" => None,
            token => match token.parse::<i64>() {
                Ok(position) if position > 0 => Some(position),
                _ => {
                    return Err(
                        Error::invalid("page_token", "is not a token this call returned").into(),
                    );
                }
            },
        };
        let client = self.state.pool.get().await.map_err(Error::from)?;
        webhooks::get(&client, &caller.tenant, &caller.projects, id).await?;
        let page = webhooks::list_deliveries(&client, id, before, limit).await?;
        let next_page_token = match page.last() {
            Some(last) if page.len() as i64 == limit => last.position.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListDeliveriesResponse {
            deliveries: page.iter().map(delivery).collect(),
            next_page_token,
        }))
    }
}
