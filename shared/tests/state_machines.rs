//! Properties of what `agentrun-shared` decides at every edge: the run and command state
//! machines, id and enum parsing, the event payload rules, JSON payload parsing and secret
//! redaction. Everything here is pure, so each property runs hundreds of cases in
//! milliseconds; the same rules are checked end to end, through the gRPC API and the
//! database, in `tests/integration/properties.rs`.

use std::collections::{BTreeSet, VecDeque};

use agentrun_shared::events::{EventType, MAX_REQUEST_TIMEOUT_MS, REQUEST_KINDS, TURN_END_STATES};
use agentrun_shared::ids::{CommandId, RequestId, RunId, RunnerId, SessionId};
use agentrun_shared::payload::{DEFAULT_MAX_PAYLOAD_BYTES, REDACTED, parse_object, redact};
use agentrun_shared::proto;
use agentrun_shared::state::{CommandKind, CommandStatus, RunStatus, TurnDeliveryPolicy};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Map, Value, json};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------
// Run state machine
// ---------------------------------------------------------------------------------------
//
// The tables below are written out by hand from the model, edge by edge, and never from
// `RunStatus::sources` / `CommandStatus::sources`: each test checks the code against them,
// so a change to the code's transitions must be made here too, on purpose.

/// The run lifecycle as documented (DESIGN.md §2): `pending → claimed → running ⇄
/// waiting → completed | failed | cancelled | blocked | expired`, the terminal states
/// reached from `running` or `waiting`.
const RUN_MODEL: &[(RunStatus, RunStatus)] = {
    use RunStatus::*;
    &[
        (Pending, Claimed),
        (Claimed, Running),
        (Running, Waiting),
        (Waiting, Running),
        (Running, Completed),
        (Running, Failed),
        (Running, Cancelled),
        (Running, Blocked),
        (Running, Expired),
        (Waiting, Completed),
        (Waiting, Failed),
        (Waiting, Cancelled),
        (Waiting, Blocked),
        (Waiting, Expired),
    ]
};

/// Model edges the code refuses: `expired` is the queue timeout, so only a run never
/// claimed expires; a held run that runs out of time ends `failed` (`run_timeout`).
const RUN_MODEL_REFUSED: &[(RunStatus, RunStatus)] = {
    use RunStatus::*;
    &[(Running, Expired), (Waiting, Expired)]
};

/// Edges the code allows beyond the model, each for a reason.
const RUN_EXTRAS: &[(RunStatus, RunStatus)] = {
    use RunStatus::*;
    &[
        // A lease lost (expired) or given back (drain) puts a held run back in the queue.
        (Claimed, Pending),
        (Running, Pending),
        (Waiting, Pending),
        // The first events of a lease may already open a request: one stored step.
        (Claimed, Waiting),
        // A runner may finish before it writes any event; the sweeper may time out, or
        // end as cancelled, a run whose runner never started it.
        (Claimed, Completed),
        (Claimed, Failed),
        (Claimed, Cancelled),
        (Claimed, Blocked),
        // CancelRun on a queued run ends it at once; the queue timeout expires it.
        (Pending, Cancelled),
        (Pending, Expired),
    ]
};

const RUN_TERMINAL: &[RunStatus] = &[
    RunStatus::Completed,
    RunStatus::Failed,
    RunStatus::Cancelled,
    RunStatus::Blocked,
    RunStatus::Expired,
];

/// What a runner may report with FinishRun: `expired` is the sweeper's alone.
const RUNNER_OUTCOMES: &[RunStatus] = &[
    RunStatus::Completed,
    RunStatus::Failed,
    RunStatus::Cancelled,
    RunStatus::Blocked,
];

/// Whether the hand-written table allows `from → to`: a model edge the code keeps, or a
/// named extra.
fn run_table_allows(from: RunStatus, to: RunStatus) -> bool {
    (RUN_MODEL.contains(&(from, to)) && !RUN_MODEL_REFUSED.contains(&(from, to)))
        || RUN_EXTRAS.contains(&(from, to))
}

/// States reachable from `from` by legal transitions (including `from`).
fn reachable<S: Copy + Eq + Ord>(from: S, all: &[S], legal: impl Fn(S, S) -> bool) -> BTreeSet<S> {
    let mut seen = BTreeSet::from([from]);
    let mut queue = VecDeque::from([from]);
    while let Some(s) = queue.pop_front() {
        for &next in all {
            if legal(s, next) && seen.insert(next) {
                queue.push_back(next);
            }
        }
    }
    seen
}

/// A total order so the states can live in a `BTreeSet` (declaration order).
fn run_rank(s: RunStatus) -> usize {
    RunStatus::ALL.iter().position(|x| *x == s).expect("in ALL")
}

fn command_rank(s: CommandStatus) -> usize {
    CommandStatus::ALL
        .iter()
        .position(|x| *x == s)
        .expect("in ALL")
}

#[test]
fn run_tables_are_well_formed() {
    for edge in RUN_MODEL_REFUSED {
        assert!(
            RUN_MODEL.contains(edge),
            "{edge:?} refused but not a model edge"
        );
    }
    for edge in RUN_EXTRAS {
        assert!(
            !RUN_MODEL.contains(edge),
            "{edge:?} is a model edge, not an extra"
        );
    }
    let mut all: Vec<_> = RUN_MODEL.iter().chain(RUN_EXTRAS).collect();
    let n = all.len();
    all.sort_by_key(|(a, b)| (run_rank(*a), run_rank(*b)));
    all.dedup();
    assert_eq!(all.len(), n, "an edge is listed twice");
}

#[test]
fn run_transitions_are_exactly_the_table() {
    for &from in RunStatus::ALL {
        for &to in RunStatus::ALL {
            let legal = run_table_allows(from, to);
            assert_eq!(
                RunStatus::can_transition(from, to),
                legal,
                "{from:?} -> {to:?}"
            );
            // `sources` is what the SQL guards use (`WHERE status = ANY(sources)`).
            assert_eq!(to.sources().contains(&from), legal, "{from:?} -> {to:?}");
        }
    }
    for &to in RunStatus::ALL {
        let sources = to.sources();
        let unique: BTreeSet<usize> = sources.iter().map(|s| run_rank(*s)).collect();
        assert_eq!(unique.len(), sources.len(), "{to:?} lists a source twice");
    }
}

#[test]
fn run_state_sets_partition_the_lifecycle() {
    assert_eq!(
        RunStatus::ACTIVE,
        &[RunStatus::Claimed, RunStatus::Running, RunStatus::Waiting]
    );
    for &s in RunStatus::ALL {
        assert_eq!(s.is_terminal(), RUN_TERMINAL.contains(&s), "{s:?}");
        assert_eq!(s.is_runner_outcome(), RUNNER_OUTCOMES.contains(&s), "{s:?}");
        // Every state is exactly one of: queued, held under a lease, terminal.
        let kinds = [
            s == RunStatus::Pending,
            RunStatus::ACTIVE.contains(&s),
            RUN_TERMINAL.contains(&s),
        ];
        assert_eq!(kinds.iter().filter(|k| **k).count(), 1, "{s:?}");
    }
    // A runner can report each outcome from every state it holds a run in.
    for &outcome in RUNNER_OUTCOMES {
        for &held in RunStatus::ACTIVE {
            assert!(run_table_allows(held, outcome), "{held:?} -> {outcome:?}");
            assert!(
                RunStatus::can_transition(held, outcome),
                "{held:?} -> {outcome:?}"
            );
        }
    }
}

#[test]
fn run_lifecycle_is_well_formed() {
    let all: Vec<usize> = (0..RunStatus::ALL.len()).collect();
    let by_table = |a: usize, b: usize| run_table_allows(RunStatus::ALL[a], RunStatus::ALL[b]);
    let by_code =
        |a: usize, b: usize| RunStatus::can_transition(RunStatus::ALL[a], RunStatus::ALL[b]);
    for &s in RunStatus::ALL {
        assert!(!run_table_allows(s, s), "{s:?} -> itself");
        let terminal = RUN_TERMINAL.contains(&s);
        for legal in [&by_table as &dyn Fn(usize, usize) -> bool, &by_code] {
            let from_here = reachable(run_rank(s), &all, legal);
            if terminal {
                assert_eq!(from_here.len(), 1, "terminal {s:?} has an exit");
            } else {
                assert!(
                    from_here
                        .iter()
                        .any(|i| RUN_TERMINAL.contains(&RunStatus::ALL[*i])),
                    "{s:?} can never end"
                );
            }
            let from_pending = reachable(run_rank(RunStatus::Pending), &all, legal);
            assert_eq!(from_pending.len(), all.len(), "a state no run can reach");
        }
    }
}

fn any_run_status() -> impl Strategy<Value = RunStatus> {
    select(RunStatus::ALL)
}

fn any_command_status() -> impl Strategy<Value = CommandStatus> {
    select(CommandStatus::ALL)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A run row under random attempted updates. The hand-written table decides which
    /// apply; at every step the code (`can_transition`, and the `sources` list the SQL
    /// guards with) must decide the same, and the path must keep the lifecycle's
    /// promises: nothing after a terminal state, claimed and expired only from the queue.
    #[test]
    fn random_run_walks_follow_the_table(
        attempts in vec(any_run_status(), 0..64),
    ) {
        let mut status = RunStatus::Pending;
        let mut ended = false;
        for to in attempts {
            let legal = run_table_allows(status, to);
            prop_assert_eq!(RunStatus::can_transition(status, to), legal, "{:?} -> {:?}", status, to);
            prop_assert_eq!(to.sources().contains(&status), legal, "{:?} -> {:?}", status, to);
            if !legal {
                continue;
            }
            prop_assert!(!ended, "{:?} -> {:?} after the end", status, to);
            if matches!(to, RunStatus::Claimed | RunStatus::Expired) {
                prop_assert_eq!(status, RunStatus::Pending);
            }
            status = to;
            ended = RUN_TERMINAL.contains(&to);
        }
        prop_assert_eq!(ended, status.is_terminal());
    }
}

// ---------------------------------------------------------------------------------------
// Command state machine
// ---------------------------------------------------------------------------------------

/// The command lifecycle as documented: `pending → delivered → acknowledged → completed |
/// failed | cancelled`.
const COMMAND_MODEL: &[(CommandStatus, CommandStatus)] = {
    use CommandStatus::*;
    &[
        (Pending, Delivered),
        (Delivered, Acknowledged),
        (Acknowledged, Completed),
        (Acknowledged, Failed),
        (Acknowledged, Cancelled),
    ]
};

/// Edges the code allows beyond the model, each for a reason. (Not a transition: the
/// `cancel` command of a run cancelled while queued is stored `completed` at once, the
/// manager carrying it out itself.)
const COMMAND_EXTRAS: &[(CommandStatus, CommandStatus)] = {
    use CommandStatus::*;
    &[
        // Redelivery: a command held by a runner that lost its lease is owed again to
        // the next one, acknowledged or not.
        (Delivered, Pending),
        (Acknowledged, Pending),
        // A runner may finish a command without acknowledging it first.
        (Delivered, Completed),
        (Delivered, Failed),
        (Delivered, Cancelled),
        // The run ended before the command was delivered (`commands::cancel_open`).
        (Pending, Cancelled),
    ]
};

const COMMAND_FINAL: &[CommandStatus] = &[
    CommandStatus::Completed,
    CommandStatus::Failed,
    CommandStatus::Cancelled,
];

fn command_table_allows(from: CommandStatus, to: CommandStatus) -> bool {
    COMMAND_MODEL.contains(&(from, to)) || COMMAND_EXTRAS.contains(&(from, to))
}

#[test]
fn command_transitions_are_exactly_the_table() {
    for edge in COMMAND_EXTRAS {
        assert!(
            !COMMAND_MODEL.contains(edge),
            "{edge:?} is a model edge, not an extra"
        );
    }
    for &from in CommandStatus::ALL {
        for &to in CommandStatus::ALL {
            let legal = command_table_allows(from, to);
            assert_eq!(
                CommandStatus::can_transition(from, to),
                legal,
                "{from:?} -> {to:?}"
            );
            assert_eq!(to.sources().contains(&from), legal, "{from:?} -> {to:?}");
        }
    }
    assert_eq!(
        CommandStatus::OPEN,
        &[
            CommandStatus::Pending,
            CommandStatus::Delivered,
            CommandStatus::Acknowledged
        ]
    );
    let all: Vec<usize> = (0..CommandStatus::ALL.len()).collect();
    let by_table =
        |a: usize, b: usize| command_table_allows(CommandStatus::ALL[a], CommandStatus::ALL[b]);
    let by_code = |a: usize, b: usize| {
        CommandStatus::can_transition(CommandStatus::ALL[a], CommandStatus::ALL[b])
    };
    for &s in CommandStatus::ALL {
        assert!(!command_table_allows(s, s), "{s:?} -> itself");
        let final_ = COMMAND_FINAL.contains(&s);
        assert_eq!(s.is_final(), final_, "{s:?}");
        assert_eq!(CommandStatus::OPEN.contains(&s), !final_, "{s:?}");
        for legal in [&by_table as &dyn Fn(usize, usize) -> bool, &by_code] {
            let from_here = reachable(command_rank(s), &all, legal);
            if final_ {
                assert_eq!(from_here.len(), 1, "final {s:?} has an exit");
            } else {
                assert!(
                    from_here
                        .iter()
                        .any(|i| COMMAND_FINAL.contains(&CommandStatus::ALL[*i])),
                    "{s:?} can never finish"
                );
            }
            let from_pending = reachable(command_rank(CommandStatus::Pending), &all, legal);
            assert_eq!(
                from_pending.len(),
                all.len(),
                "a state no command can reach"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A command row under random attempted updates, decided by the hand-written table;
    /// the code must agree at every step, and nothing applies after a final state.
    #[test]
    fn random_command_walks_follow_the_table(
        attempts in vec(any_command_status(), 0..64),
    ) {
        let mut status = CommandStatus::Pending;
        let mut finished = false;
        for to in attempts {
            let legal = command_table_allows(status, to);
            prop_assert_eq!(CommandStatus::can_transition(status, to), legal, "{:?} -> {:?}", status, to);
            prop_assert_eq!(to.sources().contains(&status), legal, "{:?} -> {:?}", status, to);
            if !legal {
                continue;
            }
            prop_assert!(!finished, "{:?} -> {:?} after finishing", status, to);
            status = to;
            finished = COMMAND_FINAL.contains(&to);
        }
        prop_assert_eq!(finished, status.is_final());
    }
}

// ---------------------------------------------------------------------------------------
// Enums on the wire and in the database
// ---------------------------------------------------------------------------------------

/// Wire values that are neither a known variant nor the `*_UNSPECIFIED` zero.
fn known_wire_values(max: i32) -> impl Fn(i32) -> bool {
    move |v| (1..=max).contains(&v)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any i32 from the wire: a known value maps to its variant and back; zero
    /// (unspecified) and unknown values are an error naming the field.
    #[test]
    fn wire_enums_accept_known_values_only(value in prop_oneof![any::<i32>(), -2..12i32]) {
        let field = "some_field";
        let check = |known: bool, result: Result<i32, agentrun_shared::error::FieldError>| {
            match result {
                Ok(back) => {
                    prop_assert!(known, "unknown value {} accepted", value);
                    prop_assert_eq!(back, value);
                }
                Err(err) => {
                    prop_assert!(!known, "known value {} refused", value);
                    prop_assert_eq!(&err.field, field);
                    prop_assert!(err.to_string().starts_with("invalid some_field: "), "{}", err);
                    prop_assert!(err.reason.contains(&value.to_string()), "{}", err);
                }
            }
            Ok(())
        };
        check(known_wire_values(9)(value),
              RunStatus::from_proto(field, value).map(|s| s.to_proto() as i32))?;
        check(known_wire_values(6)(value),
              CommandStatus::from_proto(field, value).map(|s| s.to_proto() as i32))?;
        check(known_wire_values(6)(value),
              CommandKind::from_proto(field, value).map(|s| s.to_proto() as i32))?;
        check(known_wire_values(4)(value),
              TurnDeliveryPolicy::from_proto(field, value).map(|s| s.to_proto() as i32))?;
        // Unspecified means `queue` for a delivery policy, and nothing else does.
        match TurnDeliveryPolicy::from_proto_or_default(field, value) {
            Ok(p) if value == 0 => prop_assert_eq!(p, TurnDeliveryPolicy::Queue),
            Ok(p) => prop_assert_eq!(p.to_proto() as i32, value),
            Err(err) => {
                prop_assert!(!(0..=4).contains(&value));
                prop_assert_eq!(err.field, field);
            }
        }
        prop_assert_eq!(
            proto::RunStatus::try_from(value).is_ok() && value != 0,
            RunStatus::from_proto(field, value).is_ok()
        );
    }

    /// Any text from the database: exactly the declared spellings parse, and round-trip.
    #[test]
    fn database_spellings_parse_exactly(text in prop_oneof![
        ".{0,16}",
        select(RunStatus::ALL).prop_map(|s| s.as_str().to_owned()),
        select(CommandStatus::ALL).prop_map(|s| s.as_str().to_owned()),
        select(CommandKind::ALL).prop_map(|s| s.as_str().to_owned()),
        select(TurnDeliveryPolicy::ALL).prop_map(|s| s.as_str().to_owned()),
        // Near misses: case, padding.
        select(RunStatus::ALL).prop_map(|s| s.as_str().to_uppercase()),
        select(RunStatus::ALL).prop_map(|s| format!(" {}", s.as_str())),
    ]) {
        let spelled = |all: &[&str]| all.contains(&text.as_str());
        let runs: Vec<&str> = RunStatus::ALL.iter().map(|s| s.as_str()).collect();
        prop_assert_eq!(RunStatus::from_db(&text).is_some(), spelled(&runs));
        if let Some(s) = RunStatus::from_db(&text) {
            prop_assert_eq!(s.as_str(), text.as_str());
        }
        let commands: Vec<&str> = CommandStatus::ALL.iter().map(|s| s.as_str()).collect();
        prop_assert_eq!(CommandStatus::from_db(&text).is_some(), spelled(&commands));
        if let Some(s) = CommandStatus::from_db(&text) {
            prop_assert_eq!(s.as_str(), text.as_str());
        }
        let kinds: Vec<&str> = CommandKind::ALL.iter().map(|s| s.as_str()).collect();
        prop_assert_eq!(CommandKind::from_db(&text).is_some(), spelled(&kinds));
        let policies: Vec<&str> = TurnDeliveryPolicy::ALL.iter().map(|s| s.as_str()).collect();
        prop_assert_eq!(TurnDeliveryPolicy::from_db(&text).is_some(), spelled(&policies));
    }
}

// ---------------------------------------------------------------------------------------
// Ids
// ---------------------------------------------------------------------------------------

/// Strings near and far from a UUID.
fn id_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".*",
        "[0-9a-fA-F-]{0,40}",
        any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string()),
        any::<u128>().prop_map(|n| Uuid::from_u128(n).simple().to_string()),
        any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string().to_uppercase()),
        // One character of a valid id replaced.
        (any::<u128>(), 0..36usize, any::<char>()).prop_map(|(n, at, c)| {
            let mut chars: Vec<char> = Uuid::from_u128(n).to_string().chars().collect();
            chars[at] = c;
            chars.into_iter().collect()
        }),
        // Padded or truncated.
        any::<u128>().prop_map(|n| format!(" {}", Uuid::from_u128(n))),
        (any::<u128>(), 0..36usize)
            .prop_map(|(n, len)| Uuid::from_u128(n).to_string()[..len].to_owned()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Parsing any text never panics; it accepts exactly what a UUID parser accepts, names
    /// the field when it refuses, and an accepted id prints in canonical form.
    #[test]
    fn id_parsing_never_panics_and_names_the_field(text in id_text()) {
        let expected = Uuid::try_parse(&text).ok();
        let parsed = RunId::parse("run_id", &text);
        match (&parsed, expected) {
            (Ok(id), Some(uuid)) => {
                prop_assert_eq!(id.0, uuid);
                prop_assert_eq!(id.to_string(), uuid.hyphenated().to_string());
                prop_assert_eq!(RunId::parse("run_id", &id.to_string()).ok(), Some(*id));
            }
            (Err(err), None) => {
                prop_assert_eq!(&err.field, "run_id");
                let reason = if text.is_empty() { "is required" } else { "is not a valid UUID" };
                prop_assert_eq!(&err.reason, reason);
            }
            (parsed, expected) => prop_assert!(false, "{:?} parsed as {:?}, uuid says {:?}", text, parsed, expected),
        }
        // Every id type follows the same rule, and the optional form only adds "".
        prop_assert_eq!(CommandId::parse("f", &text).is_ok(), expected.is_some());
        prop_assert_eq!(SessionId::parse("f", &text).is_ok(), expected.is_some());
        prop_assert_eq!(RunnerId::parse("f", &text).is_ok(), expected.is_some());
        prop_assert_eq!(RequestId::parse("f", &text).is_ok(), expected.is_some());
        match SessionId::parse_optional("session_id", &text) {
            Ok(None) => prop_assert!(text.is_empty()),
            Ok(Some(id)) => prop_assert_eq!(Some(id.0), expected),
            Err(err) => {
                prop_assert!(expected.is_none() && !text.is_empty());
                prop_assert_eq!(err.field, "session_id");
            }
        }
    }

    #[test]
    fn ids_round_trip(n in any::<u128>()) {
        let id = RequestId(Uuid::from_u128(n));
        prop_assert_eq!(RequestId::parse("request_id", &id.to_string()).unwrap(), id);
        let id = RunId(Uuid::from_u128(n));
        prop_assert_eq!(RunId::parse_optional("run_id", &id.to_string()).unwrap(), Some(id));
    }
}

#[test]
fn fresh_ids_are_distinct_and_parse() {
    let ids: BTreeSet<RunId> = (0..1000).map(|_| RunId::new()).collect();
    assert_eq!(ids.len(), 1000);
    for id in ids.iter().take(10) {
        assert_eq!(RunId::parse("run_id", &id.to_string()).unwrap(), *id);
    }
    // Run ids are time-ordered (v7), request ids random (v4).
    assert_eq!(RunId::new().0.get_version_num(), 7);
    assert_eq!(RequestId::new().0.get_version_num(), 4);
}

// ---------------------------------------------------------------------------------------
// JSON values for payload and redaction properties
// ---------------------------------------------------------------------------------------

/// Secret keys to generate (case and `-` for `_` are varied).
const SECRET_KEYS: &[&str] = &[
    "api_key",
    "apikey",
    "authorization",
    "password",
    "passwd",
    "secret",
    "client_secret",
    "access_token",
    "refresh_token",
    "id_token",
    "token",
    "private_key",
    "x_api_key",
    "cookie",
    "set_cookie",
    "openai_api_key",
    "db_password",
    "aws_secret_access_key",
    "github_token",
];

/// The documented secret key endings (`shared/src/payload.rs`), compared
/// case-insensitively with `-` read as `_`. A key is secret when it ends with one of these (`OPENAI_API_KEY`, `db_password`), so
/// `input_tokens` and `secret_name` are not.
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

/// The documented credential prefixes, and how long the token after one must be.
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
    "Bearer ",
    "bearer ",
];
/// Prefixes matched in any case.
const CASELESS_PREFIXES: &[&str] = &["bearer "];
const MIN_SECRET_BODY: usize = 16;

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase().replace('-', "_");
    SECRET_KEY_ENDINGS
        .iter()
        .any(|ending| key.ends_with(ending))
}

fn is_body_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | '+' | '=')
}

/// Credential-shaped tokens left in `text`: a prefix followed by at least
/// [`MIN_SECRET_BODY`] token characters, wherever it starts.
fn credential_tokens(text: &str) -> Vec<String> {
    // ASCII lower-casing keeps every byte offset.
    let lower = text.to_ascii_lowercase();
    let matches = SECRET_PREFIXES
        .iter()
        .flat_map(|prefix| text.match_indices(prefix))
        .chain(
            CASELESS_PREFIXES
                .iter()
                .flat_map(|prefix| lower.match_indices(prefix)),
        );
    let mut found = Vec::new();
    for (at, prefix) in matches {
        let body = &text[at + prefix.len()..];
        let len = body.find(|c| !is_body_char(c)).unwrap_or(body.len());
        if len >= MIN_SECRET_BODY {
            found.push(text[at..at + prefix.len() + len].to_owned());
        }
    }
    found
}

/// Secrets left in a value: values under secret keys (other than null or the marker), and
/// credential tokens in any string. Returns their paths.
fn surviving_secrets(value: &Value, path: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let here = format!("{path}.{k}");
                if is_secret_key(k) && !v.is_null() && v.as_str() != Some(REDACTED) {
                    out.push(here.clone());
                }
                surviving_secrets(v, &here, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                surviving_secrets(v, &format!("{path}[{i}]"), out);
            }
        }
        Value::String(s) => {
            for token in credential_tokens(s) {
                out.push(format!("{path}: {token}"));
            }
        }
        _ => {}
    }
}

/// Same keys and array lengths everywhere: redaction replaces values, never structure.
fn same_shape(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter().all(|(k, v)| {
                    y.get(k).is_some_and(|w| {
                        // A secret key's value may become the marker, whatever it was.
                        (is_secret_key(k) && w.as_str() == Some(REDACTED)) || same_shape(v, w)
                    })
                })
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same_shape(v, w))
        }
        (Value::String(_), Value::String(_)) => true,
        (x, y) => x == y,
    }
}

fn secret_key() -> impl Strategy<Value = String> {
    (select(SECRET_KEYS), any::<u32>()).prop_map(|(key, mask)| {
        // Random case per letter, and `_` written as `-` at random.
        key.chars()
            .enumerate()
            .map(|(i, c)| match c {
                '_' if mask & (1 << (i % 32)) != 0 => '-',
                c if mask & (1 << ((i + 7) % 32)) != 0 => c.to_ascii_uppercase(),
                c => c,
            })
            .collect()
    })
}

/// Keys that look like secrets but are not (usage counters, plurals, prefixes).
fn near_miss_key() -> impl Strategy<Value = String> {
    select(
        &[
            "input_tokens",
            "output_tokens",
            "tokens",
            "token_count",
            "api_keys",
            "token_type",
            "max_tokens",
            "passwords",
            "secret_name",
            "api key",
            "cookies",
            "authorized",
            "key",
            "kind",
            "delta",
        ][..],
    )
    .prop_map(str::to_owned)
}

fn plain_key() -> impl Strategy<Value = String> {
    prop_oneof![near_miss_key(), "[a-z_]{1,12}", ".{0,8}"]
        .prop_filter("not a secret key", |k| !is_secret_key(k))
}

fn any_key() -> impl Strategy<Value = String> {
    prop_oneof![3 => plain_key(), 1 => secret_key()]
}

/// A credential token: a documented prefix and a body of token characters.
fn credential() -> impl Strategy<Value = String> {
    (select(SECRET_PREFIXES), "[A-Za-z0-9_./+=-]{16,40}")
        .prop_map(|(prefix, body)| format!("{prefix}{body}"))
}

/// Free text around credentials: words separated from them by a space or punctuation.
fn text_with_credentials() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            3 => "[a-zA-Z0-9 ,.:;!?()éü]{0,12}",
            1 => credential(),
        ],
        0..6,
    )
    .prop_map(|parts| parts.join(" "))
}

/// Text that holds no credential-shaped token (no documented prefix or shape at all).
fn plain_text() -> impl Strategy<Value = String> {
    ".{0,24}".prop_filter("no credential prefix", |s: &String| {
        let lower = s.to_ascii_lowercase();
        SECRET_PREFIXES
            .iter()
            .all(|p| !lower.contains(&p.to_ascii_lowercase()))
            && ["ark_", "eyJ", "-----BEGIN", "://"]
                .iter()
                .all(|p| !s.contains(p))
    })
}

fn leaf(text: BoxedStrategy<String>) -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        // Quarters print and parse back exactly.
        any::<i32>().prop_map(|n| Value::from(f64::from(n) / 4.0)),
        text.prop_map(Value::String),
    ]
}

fn json_with(
    key: BoxedStrategy<String>,
    text: BoxedStrategy<String>,
) -> impl Strategy<Value = Value> {
    leaf(text).prop_recursive(3, 32, 5, move |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Any JSON value, with secret keys and credential tokens mixed in.
fn any_json() -> impl Strategy<Value = Value> {
    json_with(
        any_key().boxed(),
        prop_oneof![text_with_credentials(), ".{0,16}"].boxed(),
    )
}

/// JSON with no secret in it anywhere.
fn clean_json() -> impl Strategy<Value = Value> {
    json_with(plain_key().boxed(), plain_text().boxed())
}

fn json_object(value: impl Strategy<Value = Value>) -> impl Strategy<Value = Map<String, Value>> {
    (btree_map(any_key(), value, 0..6)).prop_map(|m| m.into_iter().collect())
}

// ---------------------------------------------------------------------------------------
// Payload parsing
// ---------------------------------------------------------------------------------------

/// Text a client or runner might send as `*_json`.
fn payload_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,64}",
        any_json().prop_map(|v| v.to_string()),
        json_object(any_json()).prop_map(|m| Value::Object(m).to_string()),
        // Truncated JSON.
        (json_object(any_json()), any::<prop::sample::Index>()).prop_map(|(m, i)| {
            let text = Value::Object(m).to_string();
            let mut cut = i.index(text.len() + 1);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text[..cut].to_owned()
        }),
        // Whitespace, and JSON with whitespace around it.
        "[ \t\r\n]{0,4}",
        json_object(any_json()).prop_map(|m| format!(" \n{}\t ", Value::Object(m))),
        // Deep nesting, well within the size limit.
        (1..2000usize).prop_map(|depth| format!("{}{}", "[".repeat(depth), "]".repeat(depth))),
        (1..2000usize).prop_map(|depth| format!(
            "{}1{}",
            "{\"a\":".repeat(depth),
            "}".repeat(depth)
        )),
    ]
}

/// Whether a NUL character (which PostgreSQL cannot store) is in any string or key.
fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

/// `named` is `field` or a path below it (`input_json.a[2]`).
fn is_under(named: &str, field: &str) -> bool {
    named
        .strip_prefix(field)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any text: never a panic; an error names the field (or a path below it); an
    /// accepted payload is the object the text holds (and empty text is the empty
    /// object), with no NUL character anywhere.
    #[test]
    fn parse_object_accepts_only_bounded_objects(text in payload_text(), max in prop_oneof![Just(DEFAULT_MAX_PAYLOAD_BYTES), 0..256usize]) {
        match parse_object("input_json", &text, max) {
            Ok(map) => {
                prop_assert!(text.len() <= max);
                if text.trim().is_empty() {
                    prop_assert!(map.is_empty());
                } else {
                    let value: Value = serde_json::from_str(&text).expect("accepted text is JSON");
                    prop_assert!(!holds_nul(&value));
                    prop_assert_eq!(value, Value::Object(map));
                }
            }
            Err(err) => {
                prop_assert!(is_under(&err.field, "input_json"), "{}", err);
                prop_assert!(err.to_string().starts_with("invalid input_json"));
                let parsed = serde_json::from_str::<Value>(&text).ok();
                let is_object = parsed.as_ref().is_some_and(Value::is_object);
                if text.len() > max {
                    prop_assert_eq!(&err.field, "input_json");
                    prop_assert!(err.reason.contains(&format!("limit of {max}")), "{}", err);
                } else if is_object {
                    prop_assert!(parsed.as_ref().is_some_and(holds_nul), "{:?} refused: {}", text, err);
                    prop_assert!(err.reason.contains("NUL"), "{}", err);
                } else {
                    prop_assert_eq!(&err.field, "input_json");
                    prop_assert!(!text.trim().is_empty(), "{:?} refused: {}", text, err);
                }
            }
        }
    }

    /// A serialized object within the limit is accepted as itself, unless it holds a NUL
    /// character; one byte over the limit is refused by size, whatever it holds.
    #[test]
    fn parse_object_limit_is_exact(map in json_object(any_json())) {
        let text = Value::Object(map.clone()).to_string();
        match parse_object("payload_json", &text, text.len()) {
            Ok(parsed) => prop_assert_eq!(parsed, map),
            Err(err) => {
                prop_assert!(holds_nul(&Value::Object(map)), "{}", err);
                prop_assert!(is_under(&err.field, "payload_json"), "{}", err);
                prop_assert!(err.reason.contains("NUL"), "{}", err);
            }
        }
        if !text.is_empty() {
            let err = parse_object("payload_json", &text, text.len() - 1).unwrap_err();
            prop_assert_eq!(err.field, "payload_json");
        }
    }
}

#[test]
fn deep_nesting_is_refused_not_a_stack_overflow() {
    for depth in [200, 10_000, 100_000] {
        let text = format!("{{\"a\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
        let err = parse_object("payload_json", &text, usize::MAX).unwrap_err();
        assert_eq!(err.field, "payload_json");
    }
}

// ---------------------------------------------------------------------------------------
// Event payload rules
// ---------------------------------------------------------------------------------------

/// Payload objects for event validation: well-formed ones for each type, with fields
/// dropped, retyped or replaced at random.
fn event_payload() -> impl Strategy<Value = Map<String, Value>> {
    let field_value = prop_oneof![
        any_json(),
        select(TURN_END_STATES).prop_map(Value::from),
        select(REQUEST_KINDS).prop_map(Value::from),
        any::<u128>().prop_map(|n| Value::from(Uuid::from_u128(n).to_string())),
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(MAX_REQUEST_TIMEOUT_MS),
            Just(MAX_REQUEST_TIMEOUT_MS + 1),
            any::<i64>()
        ]
        .prop_map(Value::from),
        vec(".{0,4}", 0..3).prop_map(|v| json!(v)),
    ];
    let key = prop_oneof![
        select(
            &[
                "turn_id",
                "state",
                "kind",
                "delta",
                "item_id",
                "request_id",
                "detail",
                "options",
                "timeout_ms",
                "message"
            ][..]
        )
        .prop_map(str::to_owned),
        any_key(),
    ];
    btree_map(key, field_value, 0..8).prop_map(|m| m.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any type text: exactly the closed set parses; refusals name the field.
    #[test]
    fn event_types_are_a_closed_set(text in prop_oneof![
        ".{0,24}",
        select(EventType::ALL).prop_map(|t| t.as_str().to_owned()),
        select(EventType::ALL).prop_map(|t| t.as_str().to_uppercase()),
        select(EventType::ALL).prop_map(|t| format!("{}.", t.as_str())),
    ]) {
        match EventType::parse("events[0].type", &text) {
            Ok(t) => prop_assert_eq!(t.as_str(), text.as_str()),
            Err(err) => {
                prop_assert_eq!(err.field, "events[0].type");
                prop_assert!(EventType::ALL.iter().all(|t| t.as_str() != text));
            }
        }
    }

    /// Any payload for any type: never a panic, the same answer every time, and an error
    /// names a field under the payload's own name.
    #[test]
    fn event_payload_rules_name_the_field(
        event_type in select(EventType::ALL),
        payload in event_payload(),
    ) {
        let first = event_type.validate_payload("events[3].payload_json", &payload);
        let again = event_type.validate_payload("events[3].payload_json", &payload);
        prop_assert_eq!(&first, &again);
        if let Err(err) = first {
            prop_assert!(err.field.starts_with("events[3].payload_json."), "{}", err);
            let key = err.field.trim_start_matches("events[3].payload_json.");
            prop_assert!(!key.is_empty());
        }
        // Types without rules accept any object.
        let has_rules = matches!(event_type,
            EventType::TurnStarted | EventType::TurnCompleted | EventType::ContentDelta
            | EventType::ItemStarted | EventType::ItemUpdated | EventType::ItemCompleted
            | EventType::RequestOpened | EventType::RuntimeWarning | EventType::RuntimeError);
        if !has_rules {
            prop_assert!(event_type.validate_payload("p", &payload).is_ok());
        }
    }

    /// `request.opened` accepts exactly: a UUID request id, a known kind, an object
    /// detail, string options and a timeout in range.
    #[test]
    fn request_opened_rules(payload in event_payload()) {
        let ok = EventType::RequestOpened.validate_payload("p", &payload).is_ok();
        let expected = payload.get("request_id").and_then(Value::as_str).is_some_and(|s| Uuid::try_parse(s).is_ok())
            && payload.get("kind").and_then(Value::as_str).is_some_and(|k| REQUEST_KINDS.contains(&k))
            && payload.get("detail").is_none_or(Value::is_object)
            && payload.get("options").is_none_or(|o| o.as_array().is_some_and(|a| a.iter().all(Value::is_string)))
            && payload.get("timeout_ms").is_none_or(|t| t.as_i64().is_some_and(|t| (1..=MAX_REQUEST_TIMEOUT_MS).contains(&t)));
        prop_assert_eq!(ok, expected, "{:?}", payload);
    }
}

#[test]
fn runners_write_only_their_own_event_types() {
    let manager_only = [
        "run.created",
        "run.claimed",
        "run.started",
        "run.requeued",
        "run.terminal",
        "command.created",
        "command.delivered",
        "command.completed",
        "request.resolved",
    ];
    for t in EventType::ALL {
        assert_eq!(
            t.runner_may_write(),
            !manager_only.contains(&t.as_str()),
            "{t:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Redaction
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// After `redact`, no value under a secret key and no credential token is left; the
    /// structure is unchanged; `redact` says whether it changed anything; a second pass
    /// changes nothing.
    #[test]
    fn redaction_removes_every_secret(value in any_json()) {
        let mut redacted = value.clone();
        let changed = redact(&mut redacted);
        prop_assert_eq!(changed, redacted != value, "redact's answer is wrong");
        let mut left = Vec::new();
        surviving_secrets(&redacted, "$", &mut left);
        prop_assert!(left.is_empty(), "secrets left at {:?} in {}", left, redacted);
        prop_assert!(same_shape(&value, &redacted), "{} became {}", value, redacted);
        let mut twice = redacted.clone();
        prop_assert!(!redact(&mut twice), "second pass changed {}", redacted);
        prop_assert_eq!(twice, redacted);
    }

    /// Data without secrets comes through untouched.
    #[test]
    fn redaction_leaves_clean_data_alone(value in clean_json()) {
        let mut redacted = value.clone();
        prop_assert!(!redact(&mut redacted));
        prop_assert_eq!(redacted, value);
    }

    /// A secret under a secret key is replaced whatever its type, at any depth; the
    /// siblings are kept.
    #[test]
    fn secret_keys_are_redacted_at_any_depth(
        key in secret_key(),
        secret in any_json().prop_filter("not null", |v| !v.is_null()),
        sibling in clean_json(),
        depth in 0..6usize,
    ) {
        let mut value = json!({ key.clone(): secret, "sibling": sibling.clone() });
        for i in 0..depth {
            value = if i % 2 == 0 { json!({ "nested": value }) } else { json!([value]) };
        }
        redact(&mut value);
        let mut inner = &value;
        for i in 0..depth {
            inner = if (depth - 1 - i) % 2 == 0 { &inner["nested"] } else { &inner[0] };
        }
        prop_assert_eq!(&inner[key.as_str()], &Value::from(REDACTED));
        prop_assert_eq!(&inner["sibling"], &sibling);
    }

    /// A credential inside free text is replaced and the words around it are kept.
    #[test]
    fn credentials_in_text_are_redacted(
        before in "[a-z ,:]{0,12}",
        token in credential(),
        after in "[a-z ,:]{0,12}",
    ) {
        let mut value = Value::from(format!("{before} {token} {after}"));
        prop_assert!(redact(&mut value));
        prop_assert_eq!(value, Value::from(format!("{before} {REDACTED} {after}")));
    }

    /// Short prefix matches are prose, not credentials.
    #[test]
    fn short_prefix_matches_are_kept(prefix in select(SECRET_PREFIXES), body in "[a-z0-9]{0,15}") {
        let text = format!("see {prefix}{body} here");
        let mut value = Value::from(text.clone());
        prop_assert!(!redact(&mut value));
        prop_assert_eq!(value, Value::from(text));
    }
}

/// A credential right after a short prefix match whose body runs into the next prefix:
/// the scanner must not resume after that body, past the start of the next prefix.
#[test]
fn credentials_after_a_short_prefix_match_are_redacted() {
    for text in [
        "Authorization: Bearer Bearer abcdefghijklmnopqrstuvwxyz",
        "sk-1Bearer abcdefghijklmnopqrstuvwxyz",
    ] {
        let mut value = Value::from(text);
        redact(&mut value);
        let left = credential_tokens(value.as_str().unwrap());
        assert!(left.is_empty(), "{text:?} kept {left:?}");
    }
}
