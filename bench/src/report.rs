//! Figures, percentiles and their two renderings: a Markdown table and JSON.
//!
//! A figure may name other figures it is compared with (the database limit, peers): the
//! table shows each ratio that could be computed, the JSON carries every one (null when
//! its baseline was not measured in this run). A figure may also carry a target, shown
//! with whether it was met.

use std::path::Path;

use anyhow::Context;
use serde_json::json;

/// One measured number.
#[derive(Debug, Clone)]
pub struct Figure {
    pub scenario: &'static str,
    pub name: &'static str,
    pub value: f64,
    pub unit: &'static str,
    /// The figures this one is compared with, by name: the database limit first, then
    /// peers.
    pub baselines: Vec<&'static str>,
    pub target: Option<Target>,
}

/// A bound the figure should respect, in the figure's unit.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    AtMost(f64),
    AtLeast(f64),
}

impl Target {
    pub fn met(self, value: f64) -> bool {
        match self {
            Target::AtMost(bound) => value <= bound,
            Target::AtLeast(bound) => value >= bound,
        }
    }

    fn text(self, unit: &str) -> String {
        match self {
            Target::AtMost(bound) => format!("≤ {} {unit}", format_value(bound)),
            Target::AtLeast(bound) => format!("≥ {} {unit}", format_value(bound)),
        }
    }
}

impl Figure {
    pub fn new(scenario: &'static str, name: &'static str, value: f64, unit: &'static str) -> Self {
        Self {
            scenario,
            name,
            value,
            unit,
            baselines: Vec::new(),
            target: None,
        }
    }

    /// Compares this figure with the database-limit figure named `limit`.
    pub fn against(mut self, limit: &'static str) -> Self {
        self.baselines.insert(0, limit);
        self
    }

    /// Compares this figure with each of the peer figures named in `peers`.
    pub fn peers(mut self, peers: &[&'static str]) -> Self {
        self.baselines.extend_from_slice(peers);
        self
    }

    /// The figure should be at most `bound` (in its unit).
    pub fn at_most(mut self, bound: f64) -> Self {
        self.target = Some(Target::AtMost(bound));
        self
    }

    /// The figure should be at least `bound` (in its unit).
    pub fn at_least(mut self, bound: f64) -> Self {
        self.target = Some(Target::AtLeast(bound));
        self
    }
}

/// The `p`-th percentile (0..=100, nearest rank) of `sorted`, which must be sorted.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Ratio of `figure` to the figure named `baseline`, when that one was measured.
fn ratio(figure: &Figure, baseline: &str, all: &[Figure]) -> Option<f64> {
    let base = all.iter().find(|f| f.name == baseline)?;
    (base.value > 0.0 && figure.value.is_finite()).then(|| figure.value / base.value)
}

/// How a baseline is called in the table: `limit.*` is the database limit
/// (`limit.batched_*` the same SQL ×100 per statement, `limit.model_*` agentrun's own
/// data model's), `peer.graphile_worker.*` is graphile-worker.
fn baseline_label(name: &str) -> String {
    if name.starts_with("limit.batched_") {
        "batched database limit".to_owned()
    } else if name.starts_with("limit.model_") {
        "data-model limit".to_owned()
    } else if name.starts_with("limit.") {
        "database limit".to_owned()
    } else if let Some(rest) = name.strip_prefix("peer.") {
        rest.split('.').next().unwrap_or(rest).replace('_', "-")
    } else {
        name.to_owned()
    }
}

/// The figures as a Markdown table.
pub fn markdown(figures: &[Figure]) -> String {
    let mut out = String::from(
        "| scenario | figure | value | unit | target | compared with |\n|---|---|---:|---|---|---|\n",
    );
    for f in figures {
        let compared: Vec<String> = f
            .baselines
            .iter()
            .filter_map(|b| ratio(f, b, figures).map(|r| format!("{r:.2}× {}", baseline_label(b))))
            .collect();
        let target = f.target.map_or_else(String::new, |t| {
            let mark = if t.met(f.value) { "met" } else { "missed" };
            format!("{} ({mark})", t.text(f.unit))
        });
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            f.scenario,
            f.name,
            format_value(f.value),
            f.unit,
            target,
            compared.join(", ")
        ));
    }
    out
}

fn format_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Writes every figure, with its ratios and target, as JSON to `path` (parent dirs
/// created).
pub fn write_json(
    path: &Path,
    figures: &[Figure],
    params: serde_json::Value,
) -> anyhow::Result<()> {
    let rows: Vec<_> = figures
        .iter()
        .map(|f| {
            let limit = f.baselines.iter().find(|b| b.starts_with("limit."));
            let compared: Vec<_> = f
                .baselines
                .iter()
                .map(|b| json!({ "figure": b, "ratio": ratio(f, b, figures) }))
                .collect();
            let target = f.target.map(|t| {
                let (op, bound) = match t {
                    Target::AtMost(b) => ("<=", b),
                    Target::AtLeast(b) => (">=", b),
                };
                json!({ "op": op, "value": bound, "met": t.met(f.value) })
            });
            json!({
                "scenario": f.scenario,
                "figure": f.name,
                // NaN (nothing measured) has no JSON form: it becomes null.
                "value": f.value.is_finite().then_some(f.value),
                "unit": f.unit,
                "limit": limit,
                "ratio_to_limit": limit.and_then(|l| ratio(f, l, figures)),
                "compared_with": compared,
                "target": target,
            })
        })
        .collect();
    let doc = json!({ "params": params, "figures": rows });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::{Figure, markdown, percentile};

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 1.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn the_table_compares_with_every_measured_baseline_and_marks_targets() {
        let figures = vec![
            Figure::new("d", "dispatch.runs_per_s", 500.0, "runs/s")
                .against("limit.dispatches_per_s")
                .peers(&[
                    "peer.graphile_worker.jobs_per_s",
                    "peer.pgqueuer.jobs_per_s",
                ]),
            Figure::new("d", "dispatch.p50", 7.0, "ms").at_most(5.0),
            Figure::new("l", "limit.dispatches_per_s", 1000.0, "dispatches/s"),
            Figure::new("p", "peer.graphile_worker.jobs_per_s", 250.0, "jobs/s"),
        ];
        let table = markdown(&figures);
        assert!(
            table.contains("| 0.50× database limit, 2.00× graphile-worker |"),
            "{table}"
        );
        assert!(table.contains("| ≤ 5.00 ms (missed) |"), "{table}");
    }
}
