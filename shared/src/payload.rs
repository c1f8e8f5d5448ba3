//! JSON payload validation (must be an object, size-limited, no NUL characters) and secret
//! redaction.
//!
//! Everything a client or runner sends as `*_json` passes through [`parse_object`] at the
//! edge; everything stored in the event log passes through [`redact`] first, so a
//! provider echoing a key never lands it in the database.

use serde_json::{Map, Value};

use crate::error::FieldError;

/// Default limit for one JSON payload (event, command, run input).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// What replaces a secret.
pub const REDACTED: &str = "[REDACTED]";

/// How a payload over its size limit is described, by [`parse_object`] and
/// [`is_too_large`].
const TOO_LARGE: &str = "more than the limit of";

/// Whether `err` is [`parse_object`] refusing a payload over its size limit.
pub fn is_too_large(err: &FieldError) -> bool {
    err.field.ends_with("_json") && err.reason.contains(TOO_LARGE)
}

/// Parses `text` as a JSON object of at most `max_bytes`. Empty text is an empty object.
/// A NUL character (U+0000) in any string or key is refused, naming its path when it can
/// (`input_json.a.b[2]`).
pub fn parse_object(
    field: &str,
    text: &str,
    max_bytes: usize,
) -> Result<Map<String, Value>, FieldError> {
    if text.len() > max_bytes {
        return Err(FieldError::new(
            field,
            format!("is {} bytes, {TOO_LARGE} {max_bytes}", text.len()),
        ));
    }
    if text.trim().is_empty() {
        return Ok(Map::new());
    }
    let map = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(FieldError::new(field, "must be a JSON object")),
        Err(err) => {
            return Err(FieldError::new(field, format!("is not valid JSON ({err})")));
        }
    };
    // PostgreSQL stores no U+0000 in jsonb (nor in text): refuse it here, by path, rather
    // than fail the write later.
    if let Some(nul) = map.iter().find_map(|(k, v)| Nul::in_entry(k, v)) {
        return Err(FieldError::new(
            format!("{field}{}", nul.path),
            nul.reason(),
        ));
    }
    Ok(map)
}

/// What [`parse_object`] says about a NUL character.
pub const NUL_REASON: &str = "must not contain a NUL character (U+0000)";

/// Where a NUL character is in a JSON value: the path to it below the payload
/// (`.a.b[2]`), and whether it is in a key of the object the path names.
struct Nul {
    path: String,
    in_key: bool,
}

impl Nul {
    fn reason(&self) -> &'static str {
        if self.in_key {
            "must not have a key containing a NUL character (U+0000)"
        } else {
            NUL_REASON
        }
    }

    /// The first NUL in one object entry.
    fn in_entry(key: &str, value: &Value) -> Option<Nul> {
        if key.contains('\0') {
            return Some(Nul {
                path: String::new(),
                in_key: true,
            });
        }
        let mut nul = Nul::in_value(value)?;
        match path_segment(key) {
            Some(segment) => nul.path.insert_str(0, &segment),
            // A key too odd to name: the path stops at the object holding it.
            None => nul.path.clear(),
        }
        Some(nul)
    }

    /// The first NUL in `value`, at any depth (serde_json bounds the depth).
    fn in_value(value: &Value) -> Option<Nul> {
        match value {
            Value::String(s) => s.contains('\0').then(|| Nul {
                path: String::new(),
                in_key: false,
            }),
            Value::Array(items) => items.iter().enumerate().find_map(|(i, v)| {
                let mut nul = Nul::in_value(v)?;
                nul.path.insert_str(0, &format!("[{i}]"));
                Some(nul)
            }),
            Value::Object(map) => map.iter().find_map(|(k, v)| Nul::in_entry(k, v)),
            _ => None,
        }
    }
}

/// `.key` for a short key of word characters; `None` for any other, which would make a
/// long or ambiguous field name.
fn path_segment(key: &str) -> Option<String> {
    let plain = !key.is_empty()
        && key.len() <= 64
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    plain.then(|| format!(".{key}"))
}

/// Endings that make an object key name a secret (compared case-insensitively, with `-`
/// read as `_`): `OPENAI_API_KEY`, `db_password`, `aws_secret_access_key`, `github_token`,
/// `X-Api-Key`, `client_secret`. A key must *end* with one, so usage counters and
/// descriptions of secrets are kept (`input_tokens`, `token_count`, `secret_name`).
const SECRET_KEY_ENDINGS: &[&str] = &[
    "apikey",
    "api_key",
    "access_key",
    "secret_key",
    "private_key",
    "authorization",
    "password",
    "passwd",
    "secret",
    "token",
    "cookie",
];

/// Prefixes of well-known credential formats found inside free text (case-sensitive).
const SECRET_PREFIXES: &[&str] = &[
    "sk-",
    "sk_live_",
    "sk_test_",
    "rk_live_",
    "rk_test_",
    "ghp_",
    "gho_",
    "github_pat_",
    "glpat-",
    "xoxb-",
    "xoxp-",
    "AKIA",
];

/// Prefixes matched in any case (`Bearer`, `bearer`, `BEARER`).
const CASELESS_SECRET_PREFIXES: &[&str] = &["bearer "];

/// Prefix of agentrun's own API keys (`ark_<id: 32 hex>_<secret>`, see
/// `manager/src/store/api_keys.rs`).
const API_KEY_PREFIX: &str = "ark_";

/// How a JWT starts (`{"` in base64url).
const JWT_PREFIX: &str = "eyJ";
/// How a PEM block starts.
const PEM_BEGIN: &str = "-----BEGIN ";
/// What precedes a URL's `user:password@`.
const URL_AUTHORITY: &str = "://";

/// Replaces secrets in place: values under secret-named keys, and credential-shaped
/// tokens inside strings. Returns whether anything was redacted.
pub fn redact(value: &mut Value) -> bool {
    match value {
        Value::Object(map) => {
            let mut changed = false;
            for (key, v) in map.iter_mut() {
                if is_secret_key(key) && !v.is_null() && v.as_str() != Some(REDACTED) {
                    *v = Value::String(REDACTED.to_owned());
                    changed = true;
                } else {
                    changed |= redact(v);
                }
            }
            changed
        }
        Value::Array(items) => items.iter_mut().fold(false, |acc, v| redact(v) | acc),
        Value::String(text) => match redact_text(text) {
            Some(clean) => {
                *text = clean;
                true
            }
            None => false,
        },
        _ => false,
    }
}

/// `value` as JSON text, by serde's writer into one buffer. `Value`'s `Display`
/// (`to_string`) writes through a formatter piece by piece: it was a sixth of the
/// runner's time when streaming.
pub fn to_text(value: &Value) -> String {
    serde_json::to_string(value).expect("a JSON value always serializes")
}

/// Whether [`redact`] would change a string holding `text`: it has a credential.
pub fn has_credential(text: &str) -> bool {
    redact_text(text).is_some()
}

fn is_secret_key(key: &str) -> bool {
    // Compared in place: this runs for every key of every stored event.
    let key = key.as_bytes();
    SECRET_KEY_ENDINGS.iter().any(|ending| {
        key.len() >= ending.len()
            && key[key.len() - ending.len()..]
                .iter()
                .zip(ending.bytes())
                .all(|(&k, e)| {
                    if k == b'-' {
                        e == b'_'
                    } else {
                        k.eq_ignore_ascii_case(&e)
                    }
                })
    })
}

/// Minimum length of the token after a prefix for it to count as a credential; short
/// matches ("sk-1", "Bearer of bad news") are ordinary prose.
const MIN_SECRET_BODY: usize = 16;

/// Returns `text` with credentials replaced, or `None` if it has none.
///
/// Every character position is tried, so a credential starting inside a short match is
/// still found ("Bearer Bearer <token>", "sk-1Bearer <token>"); a redacted credential is
/// skipped whole. Linear in the text: a failed match reads at most a short token or one
/// line, and a PEM block is read once, as the span it redacts.
fn redact_text(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = String::new();
    // `text[..copied]` is in `out`, or was replaced there.
    let mut copied = 0;
    let mut at = 0;
    let mut changed = false;
    while at < bytes.len() {
        // Most positions cannot start a credential: skip them without trying each rule.
        // Only an ASCII byte can, so `at` is then on a character boundary.
        if !may_start_credential(&bytes[at..]) {
            at += 1;
            continue;
        }
        let after = text[..at].chars().next_back();
        match credential_span(&text[at..], after) {
            Some((skip, len)) => {
                out.push_str(&text[copied..at + skip]);
                out.push_str(REDACTED);
                at += skip + len;
                copied = at;
                changed = true;
            }
            None => at += 1,
        }
    }
    if !changed {
        return None;
    }
    out.push_str(&text[copied..]);
    Some(out)
}

/// Whether a credential [`credential_span`] finds can start where `rest` does: its first
/// two bytes begin one of the rules' prefixes (a caseless one in any case). Common
/// letters start a prefix, but few pairs do, so the rules are tried at few positions.
fn may_start_credential(rest: &[u8]) -> bool {
    // Every prefix has at least two bytes, all ASCII.
    match rest {
        [first, second, ..] if first.is_ascii() && second.is_ascii() => {
            CREDENTIAL_PAIRS[usize::from(*first)] & (1 << second) != 0
        }
        _ => false,
    }
}

/// For each ASCII first byte, the set of second bytes that may follow it in a prefix of
/// [`credential_span`]'s rules. Built at compile time: this is read at every byte of
/// every streamed delta.
static CREDENTIAL_PAIRS: [u128; 128] = credential_pairs();

const fn credential_pairs() -> [u128; 128] {
    const fn allow(pairs: &mut [u128; 128], first: u8, second: u8) {
        pairs[first as usize] |= 1 << second;
    }
    let mut pairs = [0; 128];
    let exact: [&[&str]; 2] = [
        SECRET_PREFIXES,
        &[API_KEY_PREFIX, JWT_PREFIX, PEM_BEGIN, URL_AUTHORITY],
    ];
    let mut list = 0;
    while list < exact.len() {
        let mut i = 0;
        while i < exact[list].len() {
            let p = exact[list][i].as_bytes();
            allow(&mut pairs, p[0], p[1]);
            i += 1;
        }
        list += 1;
    }
    let mut i = 0;
    while i < CASELESS_SECRET_PREFIXES.len() {
        let p = CASELESS_SECRET_PREFIXES[i].as_bytes();
        let (lower, upper) = (p[0].to_ascii_lowercase(), p[0].to_ascii_uppercase());
        let (lower2, upper2) = (p[1].to_ascii_lowercase(), p[1].to_ascii_uppercase());
        allow(&mut pairs, lower, lower2);
        allow(&mut pairs, lower, upper2);
        allow(&mut pairs, upper, lower2);
        allow(&mut pairs, upper, upper2);
        i += 1;
    }
    pairs
}

/// The secret in the credential `text` starts with, as (offset, length): usually the
/// whole credential, but only the password of a URL's `user:password@`. `after` is the
/// character before `text`, if any.
fn credential_span(text: &str, after: Option<char>) -> Option<(usize, usize)> {
    prefixed_len(text)
        .or_else(|| api_key_len(text))
        .or_else(|| jwt_len(text, after))
        .or_else(|| pem_len(text))
        .map(|len| (0, len))
        .or_else(|| url_password(text))
}

/// Characters of a token after a credential prefix.
fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | '+' | '=')
}

/// The length of the run of token characters `text` starts with.
fn token_len(text: &str) -> usize {
    text.find(|c: char| !is_token_char(c)).unwrap_or(text.len())
}

/// A known prefix followed by at least [`MIN_SECRET_BODY`] token characters.
fn prefixed_len(text: &str) -> Option<usize> {
    let caseless = CASELESS_SECRET_PREFIXES.iter().filter(|prefix| {
        text.get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
    });
    SECRET_PREFIXES
        .iter()
        .filter(|prefix| text.starts_with(*prefix))
        .chain(caseless)
        .find_map(|prefix| {
            let len = token_len(&text[prefix.len()..]);
            (len >= MIN_SECRET_BODY).then_some(prefix.len() + len)
        })
}

/// An agentrun API key: `ark_`, a 32-hex-digit id, `_`, and a secret of at least
/// [`MIN_SECRET_BODY`] base64url characters.
fn api_key_len(text: &str) -> Option<usize> {
    let rest = text.strip_prefix(API_KEY_PREFIX)?;
    let id = rest.get(..32)?;
    let secret = rest[32..].strip_prefix('_')?;
    if !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    // The secret is hex: a `.` after it ends a sentence, not the key.
    let len = base64url_len(secret);
    (len >= MIN_SECRET_BODY).then_some(API_KEY_PREFIX.len() + 33 + len)
}

/// The length of the run of base64url characters `text` starts with.
fn base64url_len(text: &str) -> usize {
    text.find(|c: char| !is_base64url_char(c))
        .unwrap_or(text.len())
}

fn is_base64url_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_')
}

/// A JSON Web Token: three base64url segments joined by `.`, the first (a JSON header)
/// starting `eyJ` and at least [`MIN_SECRET_BODY`] long, the second not empty (the
/// signature is empty for `alg: none`).
///
/// It must start a word (`after` is not base64url, nor the `]` ending [`REDACTED`]): so
/// each run is read once, not from every `eyJ` inside it, and a second pass over
/// `...[REDACTED]eyJ...` finds what the first pass found.
fn jwt_len(text: &str, after: Option<char>) -> Option<usize> {
    if !text.starts_with(JWT_PREFIX) || after.is_some_and(|c| is_base64url_char(c) || c == ']') {
        return None;
    }
    let header = base64url_len(text);
    let rest = text[header..].strip_prefix('.')?;
    let claims = base64url_len(rest);
    let signature = base64url_len(rest[claims..].strip_prefix('.')?);
    (header >= MIN_SECRET_BODY && claims > 0).then_some(header + 1 + claims + 1 + signature)
}

/// A PEM private key: `-----BEGIN <label>PRIVATE KEY-----`, its body, and the matching
/// `-----END ...PRIVATE KEY-----` line. A block cut off before its end line (a truncated
/// message) is redacted up to where its body stops.
fn pem_len(text: &str) -> Option<usize> {
    const BEGIN: &str = PEM_BEGIN;
    const END: &str = "-----END ";
    let header = pem_label_len(text.strip_prefix(BEGIN)?)?;
    let mut at = BEGIN.len() + header;
    // Base64 lines, and the `Proc-Type: 4,ENCRYPTED` / `DEK-Info: AES-128-CBC,...`
    // headers of legacy encrypted keys.
    while let Some(c) = text[at..].chars().next() {
        if text[at..].starts_with(END) {
            let end = &text[at + END.len()..];
            return Some(match pem_label_len(end) {
                Some(label) => at + END.len() + label,
                None => at,
            });
        }
        if !(c.is_ascii_alphanumeric() || c.is_ascii_whitespace() || "+/=:,-".contains(c)) {
            break;
        }
        at += c.len_utf8();
    }
    Some(at)
}

/// The length of `<label>PRIVATE KEY-----` at the start of `text`, where the label is
/// upper-case words (`RSA `, `ENCRYPTED `, or none).
fn pem_label_len(text: &str) -> Option<usize> {
    let label = text
        .find(|c: char| !(c.is_ascii_uppercase() || c == ' '))
        .unwrap_or(text.len());
    (text[..label].ends_with("PRIVATE KEY") && text[label..].starts_with("-----"))
        .then_some(label + "-----".len())
}

/// The password of a URL's user information: `://user:password@host` gives the offset
/// and length of `password` (the scheme, user and host are kept). The user may be empty
/// (`redis://:password@host`); the password may not. Brackets end a password, so a
/// password already redacted, or holding a redacted credential, is not matched again.
fn url_password(text: &str) -> Option<(usize, usize)> {
    let rest = text.strip_prefix(URL_AUTHORITY)?;
    let user = rest
        .find(|c: char| !is_userinfo_char(c) || c == ':')
        .unwrap_or(rest.len());
    // A credential inside the user part is redacted where it stands, by the scan that
    // reaches it; skipping past it here would keep it.
    if redact_text(&rest[..user]).is_some() {
        return None;
    }
    let password = rest[user..].strip_prefix(':')?;
    let len = password
        .find(|c: char| !is_userinfo_char(c))
        .unwrap_or(password.len());
    let host = password[len..].strip_prefix('@')?;
    // A host that another rule redacted is no host: a second pass over
    // `user:pw@[REDACTED]` must find what the first found over `user:pw@<secret>`.
    let host_starts = !host.starts_with(REDACTED)
        && host
            .chars()
            .next()
            .is_some_and(|c| c.is_alphanumeric() || c == '[');
    (len > 0 && host_starts).then_some((3 + user + 1, len))
}

/// Characters of a URL's user or password: not a delimiter, space, quote or bracket.
fn is_userinfo_char(c: char) -> bool {
    !(c.is_whitespace()
        || c.is_control()
        || matches!(
            c,
            '@' | '/' | '?' | '#' | '[' | ']' | '"' | '\'' | '<' | '>' | '`'
        ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn parse_object_names_the_field_and_the_problem() {
        assert!(parse_object("input_json", "", 10).unwrap().is_empty());
        let err = parse_object("input_json", "[1]", 100).unwrap_err();
        assert_eq!(err.to_string(), "invalid input_json: must be a JSON object");
        let err = parse_object("input_json", "{nope", 100).unwrap_err();
        assert!(err.reason.starts_with("is not valid JSON"), "{err}");
        let err = parse_object(
            "payload_json",
            &format!("{{\"a\":\"{}\"}}", "x".repeat(100)),
            50,
        )
        .unwrap_err();
        assert!(err.reason.contains("limit of 50"), "{err}");
        assert!(is_too_large(&err));
        assert!(!is_too_large(
            &parse_object("input_json", "[1]", 100).unwrap_err()
        ));
    }

    #[test]
    fn parse_object_refuses_nul_by_path() {
        let field = |text: &str| parse_object("input_json", text, 1000).unwrap_err().field;
        assert_eq!(field(r#"{"prompt": "a\u0000b"}"#), "input_json.prompt");
        assert_eq!(field(r#"{"a": {"b": [1, "\u0000"]}}"#), "input_json.a.b[1]");
        assert_eq!(field(r#"{"a": {"k\u0000": 1}}"#), "input_json.a");
        assert_eq!(field(r#"{"odd key": ["\u0000"]}"#), "input_json");
        let err = parse_object("p", r#"{"a": "\u0000"}"#, 100).unwrap_err();
        assert_eq!(err.reason, NUL_REASON);
        assert!(parse_object("p", r#"{"a": "\\u0000"}"#, 100).is_ok());
    }

    #[test]
    fn the_position_filter_lets_every_rule_through_and_little_else() {
        let exact =
            SECRET_PREFIXES
                .iter()
                .chain(&[API_KEY_PREFIX, JWT_PREFIX, PEM_BEGIN, URL_AUTHORITY]);
        for prefix in exact.chain(&["bearer ", "Bearer ", "BEARER ", "bEaReR "]) {
            assert!(may_start_credential(prefix.as_bytes()), "{prefix}");
        }
        for word in ["sea", "about", "error", "baby", "a", "s", "-", ":x", "é"] {
            assert!(!may_start_credential(word.as_bytes()), "{word}");
        }
    }

    #[test]
    fn credentials_starting_inside_a_short_match_are_redacted() {
        let token = "abcdefghijklmnopqrstuvwxyz";
        for (text, want) in [
            (
                format!("Authorization: Bearer Bearer {token}"),
                format!("Authorization: Bearer {REDACTED}"),
            ),
            (format!("sk-1Bearer {token}"), format!("sk-1{REDACTED}")),
            (format!("AKIAKIA{token}"), REDACTED.to_owned()),
            (format!("é sk-{token} é"), format!("é {REDACTED} é")),
        ] {
            assert_eq!(redact_text(&text).as_deref(), Some(want.as_str()), "{text}");
        }
        assert_eq!(redact_text("Bearer Bearer of bad news, sk-1"), None);
    }

    /// Each credential shape, and near misses that must come through untouched (`None`).
    #[test]
    fn redaction_table() {
        let id = "0123456789abcdef0123456789ABCDEF";
        let secret = "f".repeat(64);
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJlX2hlcmU";
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA0Z3VS5JJcds3xfn\n/ygWyF8PbnGy0AHB7MhgwMb==\n-----END RSA PRIVATE KEY-----";
        let texts: &[(String, Option<String>)] = &[
            // agentrun API keys.
            (format!("key ark_{id}_{secret}."), Some(format!("key {REDACTED}."))),
            (format!("ark_{id}_short"), None),
            ("dark_mode_enabled_for_every_user".into(), None),
            // Bearer tokens, in any case.
            ("bearer abcdefghijklmnopqrstuvwxyz".into(), Some(REDACTED.into())),
            (
                "Authorization: BEARER abcdefghijklmnopqrstuvwxyz".into(),
                Some(format!("Authorization: {REDACTED}")),
            ),
            ("the bearer of bad news".into(), None),
            // Stripe, GitLab.
            ("sk_live_4eC39HqLyjWDarjtT1zdp7dc".into(), Some(REDACTED.into())),
            ("(sk_test_4eC39HqLyjWDarjtT1zdp7dc)".into(), Some(format!("({REDACTED})"))),
            ("rk_live_4eC39HqLyjWDarjtT1zdp7dc".into(), Some(REDACTED.into())),
            ("glpat-xxxxxxxxxxxxxxxxxxxx".into(), Some(REDACTED.into())),
            ("sk_live_ is a prefix".into(), None),
            // JWTs, also with an empty signature (`alg: none`).
            (format!("token={jwt}&x=1"), Some(format!("token={REDACTED}&x=1"))),
            (
                "eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.".into(),
                Some(REDACTED.into()),
            ),
            ("eyJhbGciOiJIUzI1NiJ9 has no dots".into(), None),
            ("eyJ.a.b".into(), None),
            // PEM private keys; a public key is not a secret.
            (format!("key:\n{pem}\nend"), Some(format!("key:\n{REDACTED}\nend"))),
            (
                "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC".into(),
                Some(REDACTED.into()),
            ),
            (
                "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A\n-----END PUBLIC KEY-----"
                    .into(),
                None,
            ),
            // Passwords in URLs: scheme, user and host are kept.
            (
                "postgres://app:s3cr3t@db:5432/agentrun".into(),
                Some(format!("postgres://app:{REDACTED}@db:5432/agentrun")),
            ),
            (
                "redis://:hunter2@cache".into(),
                Some(format!("redis://:{REDACTED}@cache")),
            ),
            ("postgres://app@db/agentrun".into(), None),
            // Found by fuzzing: a credential in the user part is not skipped over.
            (
                "x://ghp_0123456789abcdefXYZ:pw@host".into(),
                Some(format!("x://{REDACTED}:pw@host")),
            ),
            // Found by fuzzing: a "host" that is itself a redacted secret.
            (
                "x://user:pass@-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----"
                    .into(),
                Some(format!("x://user:pass@{REDACTED}")),
            ),
            ("https://example.com:8443/path".into(), None),
            ("ssh://git@github.com/o/r".into(), None),
            // Prose and usage.
            ("used 1200 input tokens; see docs at https://x.io".into(), None),
        ];
        for (text, want) in texts {
            assert_eq!(redact_text(text).as_deref(), want.as_deref(), "{text:?}");
            if let Some(want) = want {
                assert_eq!(redact_text(want), None, "second pass over {want:?}");
            }
        }

        let keys = [
            ("OPENAI_API_KEY", true),
            ("db_password", true),
            ("aws_secret_access_key", true),
            ("github_token", true),
            ("x-api-key", true),
            ("client_secret", true),
            ("apiKey", true),
            ("Set-Cookie", true),
            ("input_tokens", false),
            ("output_tokens", false),
            ("max_tokens", false),
            ("token_count", false),
            ("total_tokens", false),
            ("secret_name", false),
            ("api_keys", false),
            ("passwords", false),
            ("key", false),
            ("kind", false),
        ];
        for (key, secret) in keys {
            let mut value = json!({ key: "v" });
            assert_eq!(redact(&mut value), secret, "{key}");
        }
    }

    #[test]
    fn redacts_secret_keys_and_tokens_but_not_usage() {
        let mut v = json!({
            "api_key": "abc",
            "headers": {"Authorization": "Bearer xyz", "X-Api-Key": "k"},
            "text": "my key is sk-abcdefghijklmnopqrstuvwxyz, ok",
            "usage": {"input_tokens": 12, "output_tokens": 3},
            "note": "sk-1 is short",
        });
        assert!(redact(&mut v));
        assert_eq!(v["api_key"], REDACTED);
        assert_eq!(v["headers"]["Authorization"], REDACTED);
        assert_eq!(v["headers"]["X-Api-Key"], REDACTED);
        assert_eq!(v["text"], "my key is [REDACTED], ok");
        assert_eq!(v["usage"]["input_tokens"], 12);
        assert_eq!(v["note"], "sk-1 is short");
        assert!(!redact(&mut v), "redaction is idempotent");
    }
}
