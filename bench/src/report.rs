//! Figures, percentiles and their two renderings: a Markdown table and JSON.

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
    /// The database-limit figure this one is compared with, by name.
    pub limit: Option<&'static str>,
}

impl Figure {
    pub fn new(scenario: &'static str, name: &'static str, value: f64, unit: &'static str) -> Self {
        Self {
            scenario,
            name,
            value,
            unit,
            limit: None,
        }
    }

    /// Compares this figure with the database-limit figure named `limit`.
    pub fn against(mut self, limit: &'static str) -> Self {
        self.limit = Some(limit);
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

/// Ratio of `figure` to the limit it names, when that limit was measured.
fn ratio(figure: &Figure, all: &[Figure]) -> Option<f64> {
    let limit = figure.limit?;
    let base = all.iter().find(|f| f.name == limit)?;
    (base.value > 0.0).then(|| figure.value / base.value)
}

/// The figures as a Markdown table.
pub fn markdown(figures: &[Figure]) -> String {
    let mut out = String::from(
        "| scenario | figure | value | unit | ratio to database limit |\n|---|---|---:|---|---:|\n",
    );
    for f in figures {
        let ratio = ratio(f, figures).map_or_else(String::new, |r| format!("{r:.2}×"));
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            f.scenario,
            f.name,
            format_value(f.value),
            f.unit,
            ratio
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

/// Writes every figure, with its ratio, as JSON to `path` (parent dirs created).
pub fn write_json(
    path: &Path,
    figures: &[Figure],
    params: serde_json::Value,
) -> anyhow::Result<()> {
    let rows: Vec<_> = figures
        .iter()
        .map(|f| {
            json!({
                "scenario": f.scenario,
                "figure": f.name,
                "value": f.value,
                "unit": f.unit,
                "limit": f.limit,
                "ratio_to_limit": ratio(f, figures),
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
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 1.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
