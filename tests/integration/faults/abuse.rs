//! The abuse section: a hostile or careless caller, against real manager and runner
//! processes with authentication on, must not exhaust the manager, starve another
//! tenant, stop the service or learn what another tenant has. Sizes are cut so CI stays
//! fast; the README's "Limits and quotas" section gives the full-size run.
//!
//! | test | abuse |
//! |---|---|
