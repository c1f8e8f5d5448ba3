//! `agentrun webhooks`: create, list and delete the tenant's webhooks, and list a
//! webhook's deliveries with their last status (WebhookService). The JSON shape follows
//! [`crate::output`]: proto field names, enums by lowercase name, RFC 3339 times.

use std::time::SystemTime;

use agentrun_shared::proto::{self, DeliveryStatus, webhook_service_client::WebhookServiceClient};
use serde_json::{Value, json};

use crate::ClientFlags;
use crate::client::Manager;
use crate::commands::{write_list, write_one};
use crate::error::{CliError, EXIT_OK};
use crate::output::{self, OutputFormat};
use crate::render;

/// Most deliveries one ListDeliveries page may hold.
const MAX_PAGE: usize = 500;

/// Arguments of `agentrun webhooks`.
#[derive(Debug, clap::Args)]
pub struct WebhooksArgs {
    #[command(subcommand)]
    pub action: Option<WebhooksAction>,
    #[command(flatten)]
    pub flags: ClientFlags,
}

/// What `agentrun webhooks` does [default: list].
#[derive(Debug, clap::Subcommand)]
pub enum WebhooksAction {
    /// Create a webhook: POST each event of the named types to URL, signed. Prints the
    /// webhook and its signing secret (the only time the secret is shown).
    Create {
        /// Where deliveries are POSTed (http or https).
        #[arg(long)]
        url: String,
        /// An event type to deliver (repeat for several): run.created, run.claimed,
        /// run.started, run.requeued, run.terminal, turn.started, turn.completed,
        /// request.opened, request.resolved, runtime.error.
        #[arg(long = "event", value_name = "TYPE", required = true)]
        events: Vec<String>,
        /// Only runs of this project [default: every project].
        #[arg(long)]
        project: Option<String>,
        /// The signing secret, 16 to 256 bytes [default: the manager makes one].
        #[arg(long, env = "AGENTRUN_WEBHOOK_SECRET", hide_env_values = true)]
        secret: Option<String>,
    },
    /// List the webhooks, oldest first (without their secrets).
    List,
    /// Delete a webhook; its pending deliveries are dropped.
    Delete {
        /// The webhook's id (from `agentrun webhooks list`).
        #[arg(value_name = "WEBHOOK_ID")]
        webhook_id: String,
    },
    /// List a webhook's deliveries, newest first, with their last status.
    Deliveries {
        /// The webhook's id.
        #[arg(value_name = "WEBHOOK_ID")]
        webhook_id: String,
        /// Most deliveries to show.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
    },
}

/// A webhook as JSON.
pub fn webhook_json(w: &proto::Webhook) -> Value {
    json!({
        "webhook_id": w.webhook_id,
        "url": w.url,
        "event_types": w.event_types,
        "project_id": w.project_id,
        "created_at": output::timestamp(w.created_at.as_ref()),
    })
}

/// A delivery as JSON.
pub fn delivery_json(d: &proto::Delivery) -> Value {
    json!({
        "delivery_id": d.delivery_id,
        "webhook_id": d.webhook_id,
        "run_id": d.run_id,
        "seq": d.seq,
        "event_type": d.event_type,
        "status": delivery_status(d.status),
        "attempts": d.attempts,
        "last_status_code": d.last_status_code,
        "last_error": d.last_error,
        "created_at": output::timestamp(d.created_at.as_ref()),
        "next_attempt_at": output::timestamp(d.next_attempt_at.as_ref()),
        "delivered_at": output::timestamp(d.delivered_at.as_ref()),
    })
}

fn delivery_status(status: i32) -> Value {
    match DeliveryStatus::try_from(status) {
        Ok(known) => Value::String(output::enum_name(known.as_str_name(), "DELIVERY_STATUS_")),
        Err(_) => Value::from(status),
    }
}

fn status_text(status: i32) -> String {
    match delivery_status(status) {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.to_owned()
    }
}

fn webhooks_table(hooks: &[proto::Webhook], now: SystemTime) -> String {
    let rows = hooks
        .iter()
        .map(|w| {
            vec![
                w.webhook_id.clone(),
                w.url.clone(),
                w.event_types.join(","),
                if w.project_id.is_empty() {
                    "*".into()
                } else {
                    w.project_id.clone()
                },
                render::ago(w.created_at.as_ref(), now),
            ]
        })
        .collect();
    render::table(&["WEBHOOK", "URL", "EVENTS", "PROJECT", "CREATED"], rows)
}

fn deliveries_table(deliveries: &[proto::Delivery], now: SystemTime) -> String {
    let rows = deliveries
        .iter()
        .map(|d| {
            let code = match d.last_status_code {
                0 => "-".to_owned(),
                code => code.to_string(),
            };
            vec![
                d.delivery_id.clone(),
                d.event_type.clone(),
                format!("{}#{}", d.run_id, d.seq),
                status_text(d.status),
                d.attempts.to_string(),
                code,
                render::ago(d.created_at.as_ref(), now),
                dash(&d.last_error),
            ]
        })
        .collect();
    render::table(
        &[
            "DELIVERY", "EVENT", "RUN#SEQ", "STATUS", "ATTEMPTS", "CODE", "CREATED", "ERROR",
        ],
        rows,
    )
}

/// `agentrun webhooks …`.
pub async fn webhooks(
    manager: &mut Manager,
    args: WebhooksArgs,
    out: OutputFormat,
) -> Result<u8, CliError> {
    let mut client = WebhookServiceClient::new(manager.channel());
    match args.action.unwrap_or(WebhooksAction::List) {
        WebhooksAction::Create {
            url,
            events,
            project,
            secret,
        } => {
            let created = client
                .create_webhook(manager.request(proto::CreateWebhookRequest {
                    url,
                    event_types: events,
                    secret: secret.unwrap_or_default(),
                    project_id: project.unwrap_or_default(),
                }))
                .await?
                .into_inner();
            let hook = created.webhook.unwrap_or_default();
            let value = json!({ "webhook": webhook_json(&hook), "secret": created.secret });
            write_one(out, &value, || {
                format!(
                    "webhook {}\nsecret  {}\n(the secret is shown only now: keep it to check \
                     the agentrun-signature header)\n",
                    hook.webhook_id, created.secret
                )
            })?;
        }
        WebhooksAction::List => {
            let hooks = client
                .list_webhooks(manager.request(proto::ListWebhooksRequest {}))
                .await?
                .into_inner()
                .webhooks;
            let values = hooks.iter().map(webhook_json).collect();
            write_list(out, values, || webhooks_table(&hooks, SystemTime::now()))?;
        }
        WebhooksAction::Delete { webhook_id } => {
            client
                .delete_webhook(manager.request(proto::DeleteWebhookRequest {
                    webhook_id: webhook_id.clone(),
                }))
                .await?;
            let value = json!({ "webhook_id": webhook_id, "deleted": true });
            write_one(out, &value, || format!("webhook {webhook_id} deleted\n"))?;
        }
        WebhooksAction::Deliveries { webhook_id, limit } => {
            let limit = limit as usize;
            let mut shown: Vec<proto::Delivery> = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_deliveries(manager.request(proto::ListDeliveriesRequest {
                        webhook_id: webhook_id.clone(),
                        page_size: (limit - shown.len()).min(MAX_PAGE) as i32,
                        page_token,
                    }))
                    .await?
                    .into_inner();
                shown.extend(page.deliveries);
                page_token = page.next_page_token;
                if page_token.is_empty() || shown.len() >= limit {
                    break;
                }
            }
            shown.truncate(limit);
            let values = shown.iter().map(delivery_json).collect();
            write_list(out, values, || deliveries_table(&shown, SystemTime::now()))?;
            if !page_token.is_empty() {
                eprintln!("(more deliveries exist: raise --limit)");
            }
        }
    }
    Ok(EXIT_OK)
}
