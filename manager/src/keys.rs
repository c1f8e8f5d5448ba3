//! `agentrun-manager keys create|list|revoke`: API key management straight against the
//! database (`DATABASE_URL`), so the first admin key can be made before any exists.
//! AdminService offers the same once one does.
//!
//! A key may be made to expire: `--expires-in 30d` (a whole number of s, m, h or d) or
//! `--expires-at 2027-01-01T00:00:00Z` (RFC 3339), at most 10 years ahead. `keys list`
//! shows each key's expiry and when it was last used (to within a minute or so).

use std::time::{Duration, SystemTime};

use prost_types::Timestamp;

use crate::db::Database;
use crate::store::api_keys::{self, ApiKeyRecord, Role};
use crate::{db, notify};

/// What `keys` does.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Creates a key and prints it — once: only a hash of it is stored.
    Create {
        /// The tenant the key acts for.
        #[arg(long)]
        tenant: String,
        /// client (RunService, SessionService), runner (RunnerService) or admin
        /// (AdminService, cluster-wide).
        #[arg(long, value_parser = ["client", "runner", "admin"])]
        role: String,
        /// Limits a client key to a project (repeatable); default: all of the tenant's.
        #[arg(long = "project")]
        projects: Vec<String>,
        /// A label for people: where the key is used.
        #[arg(long, default_value = "")]
        name: String,
        /// The key stops working this long from now: a whole number with a unit, s, m,
        /// h or d (e.g. 90m, 30d). Default: it never expires.
        #[arg(long, value_parser = parse_expires_in, conflicts_with = "expires_at")]
        expires_in: Option<Duration>,
        /// The key stops working at this time, RFC 3339 (e.g. 2027-01-01T00:00:00Z; a
        /// date alone is its midnight, UTC).
        #[arg(long, value_parser = parse_expires_at)]
        expires_at: Option<SystemTime>,
    },
    /// Lists keys (never their secrets).
    List {
        /// Only this tenant's keys.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revokes a key by id. Managers refuse it, and end the streams it opened, as soon as
    /// they hear of it (NOTIFY); within 7 s at most should they miss that.
    Revoke {
        /// The key id (the hex after `ark_`, as `keys list` shows it).
        id: String,
    },
}

/// Runs a `keys` command against `database`.
/// Applies pending migrations first when `migrate` is set (the table may be new).
pub async fn run(database: &Database, migrate: bool, command: KeysCommand) -> anyhow::Result<()> {
    let pool = database.pool(1)?;
    if migrate {
        db::migrate(&pool).await?;
    }
    let client = pool.get().await?;
    match command {
        KeysCommand::Create {
            tenant,
            role,
            projects,
            name,
            expires_in,
            expires_at,
        } => {
            anyhow::ensure!(!tenant.is_empty(), "--tenant must not be empty");
            let role = Role::parse(&role).ok_or_else(|| anyhow::anyhow!("unknown role {role}"))?;
            let now = SystemTime::now();
            let (flag, expires_at) = match (expires_in, expires_at) {
                (Some(after), _) => ("--expires-in", Some(now + after)),
                (None, at) => ("--expires-at", at),
            };
            if let Some(at) = expires_at
                && let Some(problem) = api_keys::expiry_problem(at, now)
            {
                anyhow::bail!("{flag}: the expiry {problem}");
            }
            let created =
                api_keys::create(&client, &tenant, role, &projects, &name, expires_at).await?;
            eprintln!(
                "created {} key {} for tenant {tenant}; it is shown only once:",
                role.as_str(),
                created.record.id.simple()
            );
            println!("{}", created.key);
        }
        KeysCommand::List { tenant } => {
            let keys = api_keys::list(&client, tenant.as_deref()).await?;
            println!(
                "{:<32}  {:<16}  {:<6}  {:<20}  {:<8}  {:<20}  {:<20}  NAME",
                "ID", "TENANT", "ROLE", "PROJECTS", "STATE", "EXPIRES", "LAST USED"
            );
            for key in &keys {
                println!("{}", row(key));
            }
        }
        KeysCommand::Revoke { id } => {
            let id = uuid::Uuid::try_parse(&id)
                .map_err(|_| anyhow::anyhow!("{id:?} is not a key id"))?;
            let revoked = api_keys::revoke(&client, id)
                .await
                .map_err(|err| anyhow::anyhow!("cannot revoke key {}: {err}", id.simple()))?;
            // Running managers drop it at once; should this notice not reach them, their
            // key cache and stream re-checks still refuse it within seconds.
            if let Err(err) = notify::announce_key_revoked(&client, id).await {
                eprintln!(
                    "revoked, but could not notify running managers ({err}); they refuse the key within 7 s"
                );
            }
            println!("revoked key {}", revoked.id.simple());
        }
    }
    Ok(())
}

fn row(key: &ApiKeyRecord) -> String {
    let projects = if key.project_ids.is_empty() {
        "*".to_owned()
    } else {
        key.project_ids.join(",")
    };
    let state = match key.refusal(SystemTime::now()) {
        Some(api_keys::Refusal::Revoked) => "revoked",
        Some(api_keys::Refusal::Expired) => "expired",
        None => "active",
    };
    format!(
        "{:<32}  {:<16}  {:<6}  {:<20}  {:<8}  {:<20}  {:<20}  {}",
        key.id.simple(),
        key.tenant_id,
        key.role.as_str(),
        projects,
        state,
        time_or_never(key.expires_at),
        time_or_never(key.last_used_at),
        key.name
    )
}

/// RFC 3339 to the second, UTC; `never` for none.
fn time_or_never(at: Option<SystemTime>) -> String {
    match at {
        Some(at) => Timestamp {
            seconds: Timestamp::from(at).seconds,
            nanos: 0,
        }
        .to_string(),
        None => "never".to_owned(),
    }
}

/// `--expires-in`: a positive whole number and a unit (s, m, h or d).
fn parse_expires_in(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration like 90m, 12h or 30d (units: s, m, h, d)");
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    if number == 0 {
        return Err("must be more than zero".into());
    }
    let seconds = number
        .checked_mul(unit)
        .filter(|s| *s <= api_keys::MAX_LIFETIME.as_secs())
        .ok_or_else(|| "must be at most 10 years".to_owned())?;
    Ok(Duration::from_secs(seconds))
}

/// `--expires-at`: an RFC 3339 time.
fn parse_expires_at(text: &str) -> Result<SystemTime, String> {
    let bad = || format!("{text:?} is not an RFC 3339 time like 2027-01-01T00:00:00Z");
    let at: Timestamp = text.parse().map_err(|_| bad())?;
    SystemTime::try_from(at).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_durations_need_a_number_and_a_unit() {
        assert_eq!(parse_expires_in("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(
            parse_expires_in("30d"),
            Ok(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(parse_expires_in("1s"), Ok(Duration::from_secs(1)));
        for bad in [
            "",
            "30",
            "d",
            "30x",
            "-1d",
            "1.5h",
            "0d",
            "99999999999999999999d",
            "4000d",
        ] {
            assert!(parse_expires_in(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn expiry_times_are_rfc3339() {
        let at = parse_expires_at("2027-01-01T00:00:00Z").expect("a valid time");
        assert_eq!(time_or_never(Some(at)), "2027-01-01T00:00:00Z");
        assert!(parse_expires_at("tomorrow").is_err());
        // A date alone is its midnight, UTC.
        assert_eq!(parse_expires_at("2027-01-01"), Ok(at));
        assert!(parse_expires_at("2027-13-01").is_err());
        assert_eq!(time_or_never(None), "never");
    }
}
