//! Building the providers a runner has from its settings.

use std::sync::Arc;
use std::time::Duration;

use crate::config::ProviderSettings;
use crate::provider::Providers;
use crate::provider::command::{CommandConfig, CommandProvider};
use crate::provider::openai::{OpenAiConfig, OpenAiProvider};
use crate::provider::scripted::{ScriptedConfig, ScriptedProvider};

/// Default OpenAI-compatible endpoint when only a key is given.
const OPENAI_DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// The providers, and the backend profiles they serve by default: `scripted` always,
/// `openai` when a key or base URL is configured, `command` when a command is.
pub fn providers(settings: &ProviderSettings) -> anyhow::Result<(Providers, Vec<String>)> {
    let mut providers: Providers = Vec::new();
    let mut profiles = Vec::new();
    let scripted = ScriptedProvider::new(ScriptedConfig {
        token_delay: Duration::from_millis(settings.scripted_token_delay_ms),
    });
    providers.push(("scripted".into(), Arc::new(scripted)));
    profiles.push("scripted".to_owned());

    let openai_configured = settings
        .openai_api_key
        .as_deref()
        .is_some_and(|k| !k.is_empty())
        || settings
            .openai_base_url
            .as_deref()
            .is_some_and(|u| !u.is_empty());
    let openai = OpenAiProvider::new(OpenAiConfig {
        base_url: settings
            .openai_base_url
            .clone()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| OPENAI_DEFAULT_BASE_URL.into()),
        api_key: settings.openai_api_key.clone().filter(|k| !k.is_empty()),
        default_model: settings.openai_model.clone(),
        request_timeout: Duration::from_millis(settings.openai_timeout_ms),
        max_retries: settings.openai_max_retries,
        retry_base_delay: Duration::from_millis(settings.openai_retry_base_ms),
    })?;
    providers.push(("openai".into(), Arc::new(openai)));
    if openai_configured {
        profiles.push("openai".to_owned());
    }

    if let Some(command) = settings.command.as_deref().filter(|c| !c.is_empty()) {
        let provider = CommandProvider::new(CommandConfig {
            program: "sh".into(),
            args: vec!["-c".into(), command.to_owned()],
            grace: Duration::from_millis(settings.command_grace_ms),
        });
        providers.push(("command".into(), Arc::new(provider)));
        profiles.push("command".to_owned());
    }
    Ok((providers, profiles))
}
