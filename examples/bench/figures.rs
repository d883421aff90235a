//! The bench's figures: samples per measurement, their medians, and the printed table.

use std::collections::BTreeMap;

/// Every sample of every measurement, in seconds, by name.
#[derive(Debug, Default)]
pub struct Samples(BTreeMap<String, Vec<f64>>);

impl Samples {
    pub fn add(&mut self, name: &str, seconds: f64) {
        self.0.entry(name.to_string()).or_default().push(seconds);
    }

    pub fn median(&self, name: &str) -> Option<f64> {
        median(self.0.get(name)?)
    }

    /// `min–max` of the samples, for the table's spread column.
    pub fn range(&self, name: &str) -> Option<(f64, f64)> {
        let values = self.0.get(name)?;
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (!values.is_empty()).then_some((min, max))
    }
}

/// The median (the mean of the two middle values for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// One row of the table: a figure for hyperjob and for the baseline.
#[derive(Debug)]
pub struct Row {
    pub label: String,
    pub unit: &'static str,
    pub hyperjob: Option<f64>,
    pub hyperjob_range: Option<(f64, f64)>,
    pub baseline: Option<f64>,
    pub baseline_range: Option<(f64, f64)>,
}

impl Row {
    /// A row of medians of the sample `name` of both sides.
    pub fn of(label: &str, unit: &'static str, name: &str, hj: &Samples, base: &Samples) -> Self {
        Self {
            label: label.to_string(),
            unit,
            hyperjob: hj.median(name),
            hyperjob_range: hj.range(name),
            baseline: base.median(name),
            baseline_range: base.range(name),
        }
    }
}

fn cell(value: Option<f64>, range: Option<(f64, f64)>, unit: &str) -> String {
    match (value, range) {
        (Some(v), Some((lo, hi))) => format!("{v:.3} {unit} ({lo:.2}-{hi:.2})"),
        (Some(v), None) => format!("{v:.3} {unit}"),
        _ => "n/a".to_string(),
    }
}

/// Prints the table: median (min-max) per side and hyperjob/baseline.
pub fn print_table(rows: &[Row]) {
    println!(
        "{:<36} {:>26} {:>26} {:>10}",
        "figure (median, min-max)", "hyperjob", "baseline", "hj/base"
    );
    for row in rows {
        let ratio = match (row.hyperjob, row.baseline) {
            (Some(h), Some(b)) if b > 0.0 => format!("{:.2}", h / b),
            _ => "n/a".to_string(),
        };
        println!(
            "{:<36} {:>26} {:>26} {:>10}",
            row.label,
            cell(row.hyperjob, row.hyperjob_range, row.unit),
            cell(row.baseline, row.baseline_range, row.unit),
            ratio
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
