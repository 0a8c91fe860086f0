//! Rows of the self-check table, how a child process hands them to the
//! parent (one JSON line each, tagged), and the table printed last.

use serde::{Deserialize, Serialize};

/// Norm-wise relative error limits, `‖out−ref‖/‖ref‖`, per dtype.
pub const F32_TOL: f64 = 1e-5;
pub const BF16_TOL: f64 = 1e-2;
pub const LOGITS_TOL: f64 = 2e-2;
/// A GEMM of f32 rows through their two bf16 halves (the input is seen to
/// ~2^-17) against the f32 product.
pub const SPLIT_TOL: f64 = 5e-5;
/// f32 attention on bf16 keys and values (exp2f, another summation order).
pub const ATTN_TOL: f64 = 1e-4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Pass,
    Fail,
    /// Not run; a line says why. Counts as a failure for the exit code only
    /// when the check was required.
    NotRun,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub check: String,
    pub case: String,
    /// What `value` measures (`rel_err`, `mismatches`, `agreement`).
    pub metric: String,
    #[serde(with = "nan_as_null")]
    pub value: f64,
    /// The bound `value` is held to (`<=` for errors, `>=` for agreement).
    #[serde(with = "nan_as_null")]
    pub limit: f64,
    pub status: Status,
    pub note: String,
}

/// JSON has no NaN: it travels as `null`.
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// Tag of a row line on a child's stdout.
pub const ROW_TAG: &str = "@selfcheck-row ";

impl Row {
    /// A row that passes when `value <= limit` (NaN fails).
    pub fn at_most(
        check: &str,
        case: impl Into<String>,
        metric: &str,
        value: f64,
        limit: f64,
    ) -> Row {
        let status = if value <= limit {
            Status::Pass
        } else {
            Status::Fail
        };
        Row {
            check: check.into(),
            case: case.into(),
            metric: metric.into(),
            value,
            limit,
            status,
            note: String::new(),
        }
    }

    /// A row that passes when `value >= limit`.
    pub fn at_least(
        check: &str,
        case: impl Into<String>,
        metric: &str,
        value: f64,
        limit: f64,
    ) -> Row {
        let mut r = Row::at_most(check, case, metric, value, limit);
        r.status = if value >= limit {
            Status::Pass
        } else {
            Status::Fail
        };
        r
    }

    pub fn fail(check: &str, case: impl Into<String>, note: impl Into<String>) -> Row {
        Row {
            check: check.into(),
            case: case.into(),
            metric: "error".into(),
            value: f64::NAN,
            limit: f64::NAN,
            status: Status::Fail,
            note: note.into(),
        }
    }

    pub fn not_run(check: &str, case: impl Into<String>, note: impl Into<String>) -> Row {
        Row {
            status: Status::NotRun,
            ..Row::fail(check, case, note)
        }
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Row {
        self.note = note.into();
        self
    }

    /// Fails the row (keeping its numbers) with a reason.
    pub fn failing(mut self, why: impl Into<String>) -> Row {
        self.status = Status::Fail;
        let why = why.into();
        self.note = if self.note.is_empty() {
            why
        } else {
            format!("{}; {why}", self.note)
        };
        self
    }

    /// Prints the row for the parent (and, readable, for the log).
    pub fn emit(&self) {
        let json = serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        println!("{ROW_TAG}{json}");
        eprintln!("{}", self.line());
    }

    fn line(&self) -> String {
        let status = match self.status {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::NotRun => "NOT RUN",
        };
        let num = |v: f64| {
            if v.is_nan() {
                "-".to_string()
            } else if v == 0.0 || (1e-3..1e6).contains(&v.abs()) {
                format!("{v:.4}")
            } else {
                format!("{v:.2e}")
            }
        };
        format!(
            "{status:<8} {:<12} {:<44} {:<11} {:>10} {:>10}  {}",
            self.check,
            self.case,
            self.metric,
            num(self.value),
            num(self.limit),
            self.note
        )
    }
}

/// Parses the rows out of a child's stdout.
pub fn parse_rows(stdout: &str) -> Vec<Row> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix(ROW_TAG))
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect()
}

/// The table, then one summary line.
pub fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<8} {:<12} {:<44} {:<11} {:>10} {:>10}  note",
        "status", "check", "case", "metric", "value", "limit"
    );
    println!("{}", "-".repeat(110));
    for r in rows {
        println!("{}", r.line());
    }
    let count = |s| rows.iter().filter(|r| r.status == s).count();
    println!("{}", "-".repeat(110));
    println!(
        "selfcheck: {} passed, {} failed, {} not run",
        count(Status::Pass),
        count(Status::Fail),
        count(Status::NotRun)
    );
}

/// `‖out − ref‖ / ‖ref‖` over the elements both have finite, with the
/// count of elements the output left NaN where the reference is finite
/// (unwritten, since outputs are poisoned) and of any other NaN mismatch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Diff {
    pub rel: f64,
    pub unwritten: usize,
    pub nan_mismatch: usize,
}

pub fn diff(out: &[f32], reference: &[f32]) -> Diff {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    let (mut unwritten, mut nan_mismatch) = (0, 0);
    if out.len() != reference.len() {
        return Diff {
            rel: f64::NAN,
            unwritten: 0,
            nan_mismatch: out.len().abs_diff(reference.len()),
        };
    }
    for (&o, &r) in out.iter().zip(reference) {
        match (o.is_nan(), r.is_nan()) {
            (true, false) => unwritten += 1,
            (false, true) => nan_mismatch += 1,
            (true, true) => {}
            (false, false) => {
                if o.is_infinite() || r.is_infinite() {
                    if o != r {
                        nan_mismatch += 1;
                    }
                    continue;
                }
                let d = o as f64 - r as f64;
                num += d * d;
                den += r as f64 * r as f64;
            }
        }
    }
    let rel = if den > 0.0 {
        (num / den).sqrt()
    } else if num > 0.0 {
        f64::INFINITY
    } else {
        0.0
    };
    Diff {
        rel,
        unwritten,
        nan_mismatch,
    }
}

/// A row for `diff(out, reference) <= tol`, failing on any unwritten
/// element or NaN mismatch.
pub fn compare_row(
    check: &str,
    case: impl Into<String>,
    out: &[f32],
    reference: &[f32],
    tol: f64,
) -> Row {
    let d = diff(out, reference);
    let row = Row::at_most(check, case, "rel_err", d.rel, tol);
    if d.unwritten > 0 || d.nan_mismatch > 0 {
        row.failing(format!(
            "{} unwritten, {} NaN/inf mismatches",
            d.unwritten, d.nan_mismatch
        ))
    } else {
        row
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_counts_unwritten_and_measures_error() {
        let d = diff(&[1.0, f32::NAN, 3.0], &[1.0, 2.0, 3.0]);
        assert_eq!(d.unwritten, 1);
        assert_eq!(d.rel, 0.0);
        let d = diff(&[1.1, 2.0], &[1.0, 2.0]);
        assert!((d.rel - 0.1 / 5f64.sqrt()).abs() < 1e-6);
        assert_eq!(
            compare_row("c", "x", &[f32::NAN], &[1.0], 1.0).status,
            Status::Fail
        );
    }

    #[test]
    fn rows_round_trip_through_the_child_protocol() {
        let r = Row::at_most("gemm", "m=1", "rel_err", 1e-7, F32_TOL);
        let line = format!("noise\n{ROW_TAG}{}\n", serde_json::to_string(&r).unwrap());
        assert_eq!(parse_rows(&line), vec![r]);
        let f = Row::fail("attention", "d=128", "fault");
        let back = parse_rows(&format!("{ROW_TAG}{}", serde_json::to_string(&f).unwrap()));
        assert_eq!(back.len(), 1);
        assert!(back[0].value.is_nan() && back[0].status == Status::Fail);
    }
}
