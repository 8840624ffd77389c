//! The human-readable form of a [`Plan`].

use std::fmt::Write;

use super::{Plan, Strategy};
use crate::catalog::KeyKind;
use crate::sql::display_ident;

/// `1234567` → `1,234,567`.
pub fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// `304087040` → `290 MB`.
pub fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} bytes")
    } else if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

fn estimate(seconds: Option<f64>) -> String {
    match seconds {
        Some(s) if s < 0.1 => ", well under a second".into(),
        Some(s) => {
            format!(", about {}", humantime::format_duration(std::time::Duration::from_millis((s * 1000.0) as u64)))
        }
        None => String::new(),
    }
}

/// Renders the plan for a terminal.
pub fn render(plan: &Plan) -> String {
    let mut out = String::new();
    let def = &plan.table_def;
    let _ = writeln!(out, "Plan for: {}", plan.statement);
    let _ = writeln!(
        out,
        "Table:    {}, about {} rows; {} table + {} indexes = {} in all",
        plan.table,
        thousands(plan.estimated_rows),
        bytes(plan.table_bytes),
        bytes(plan.index_bytes),
        bytes(plan.total_bytes)
    );
    let _ = writeln!(out, "Strategy: {} — {}", plan.strategy.as_str(), plan.summary);
    if let Some(key) = &plan.key {
        let kind = match key.kind {
            KeyKind::PrimaryKey => "primary key",
            KeyKind::UniqueIndex => "unique index",
        };
        let cols: Vec<String> = key.columns.iter().map(|c| display_ident(c)).collect();
        let _ = writeln!(out, "Key:      {kind} {} ({})", display_ident(&key.index_name), cols.join(", "));
    }
    let _ = writeln!(out);
    for (i, step) in plan.steps.iter().enumerate() {
        let _ = writeln!(out, "{}. {}", i + 1, step.subcommand);
        let _ = writeln!(out, "   strategy   {}: {}", step.strategy.as_str(), step.reason);
        let _ = writeln!(
            out,
            "   plain      {} ({}) for {}{}",
            step.naive.mode.as_str(),
            step.naive.mode.blocks(),
            step.naive.held_for,
            estimate(step.naive.estimated_seconds)
        );
        let gw = if plan.strategy == Strategy::Copy && step.strategy != Strategy::Copy {
            "part of the shadow-table copy: ACCESS EXCLUSIVE for the swap only (milliseconds)".to_owned()
        } else {
            format!(
                "{} for {}{}",
                step.ghostwire.mode.as_str(),
                step.ghostwire.held_for,
                estimate(step.ghostwire.estimated_seconds)
            )
        };
        let _ = writeln!(out, "   ghostwire  {gw}");
        let _ =
            writeln!(out, "   revert     {}: {}", if step.revert.revertible { "yes" } else { "no" }, step.revert.note);
    }
    let _ = writeln!(out);
    if plan.disk_needed_bytes > 0 {
        let _ = writeln!(
            out,
            "Disk:       about {} free while it runs (the shadow table and its indexes), plus WAL for the copy",
            bytes(plan.disk_needed_bytes)
        );
    }
    if !plan.carried_over.is_empty() {
        let names: Vec<String> = plan.carried_over.iter().map(|c| format!("{} {}", c.kind, c.name)).collect();
        let _ = writeln!(out, "Carried over by the swap ({}): {}", names.len(), names.join("; "));
    }
    let _ = writeln!(
        out,
        "Revertible: {}",
        if plan.revertible && plan.revert_notes.is_empty() {
            "yes".to_owned()
        } else if plan.revertible {
            format!("yes, but {}", plan.revert_notes.join("; "))
        } else {
            format!("no — {}", plan.revert_notes.join("; "))
        }
    );
    for c in &plan.capture {
        let flag = if c.mode == "trigger" { " (the default)" } else { " (--capture logical)" };
        let can = if c.available { "available".to_owned() } else { format!("not available: {}", c.why_not.join("; ")) };
        let _ = writeln!(out, "Capture:    {}{flag}: {can}", c.mode);
    }
    for w in &plan.warnings {
        let _ = writeln!(out, "Warning:    {w}");
    }
    for p in &plan.privileges {
        let label = if p.blocks { "Missing:  " } else { "Note:     " };
        let _ = writeln!(out, "{label} {}: {}; {}", p.missing, p.consequence, p.fix);
    }
    if plan.privileges.iter().any(|p| p.blocks) {
        let _ = writeln!(out, "ghostwire migrate refuses this until the role has what is missing above.");
    }
    if def.estimated_rows > 0 && plan.strategy == Strategy::Instant {
        let _ = writeln!(out, "Nothing is copied: the table keeps its data and only its catalog entries change.");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_numbers_and_sizes() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(-1000), "-1,000");
        assert_eq!(bytes(512), "512 bytes");
        assert_eq!(bytes(8192), "8.0 kB");
        assert_eq!(bytes(304_087_040), "290 MB");
    }
}
