//! What the client verbs print: borderless aligned tables with upper-case headers, as
//! Dispatch's CLI drew them, times in the format it used (`Mon Jan  2 15:04:05 UTC 2006`,
//! here always UTC), and pretty JSON for `-o json`.

use serde_json::Value;

/// A table: a header row and rows of cells, printed with every column left-aligned to its
/// widest cell.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

/// Spaces between two columns.
const GAP: usize = 3;

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_uppercase()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                line.push_str(cell);
                if i + 1 < row.len() {
                    line.extend(std::iter::repeat_n(' ', w - width(cell) + GAP));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A unix time as Dispatch's CLI showed it (Go's `time.UnixDate`), in UTC; `-` for none.
pub fn time(unix: i64) -> String {
    if unix <= 0 {
        return "-".into();
    }
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (year, month, day) = crate::model::civil_from_days(days);
    format!(
        "{} {} {:>2} {:02}:{:02}:{:02} UTC {year}",
        DAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize],
        day,
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// `value[key]` as text for a cell: strings as they are, lists joined with commas,
/// nothing as empty.
pub fn cell(value: &Value, key: &str) -> String {
    match &value[key] {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

pub fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).expect("a JSON value serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_on_the_widest_cell() {
        let mut t = Table::new(&["Name", "Status", "Created Date"]);
        t.row(vec!["hello-py".into(), "READY".into(), "x".into()]);
        t.row(vec!["a".into(), "CREATING".into(), "y".into()]);
        t.row(vec!["héllo".into(), "".into(), "".into()]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "NAME       STATUS     CREATED DATE");
        assert_eq!(lines[1], "hello-py   READY      x");
        assert_eq!(lines[2], "a          CREATING   y");
        // Width counts characters, not bytes; trailing blanks are trimmed.
        assert_eq!(lines[3], "héllo");
        let status_at = lines[0].find("STATUS").unwrap();
        assert_eq!(lines[1].find("READY"), Some(status_at));
        assert_eq!(lines[2].find("CREATING"), Some(status_at));
    }

    #[test]
    fn times_print_as_go_unix_date_in_utc() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1_136_214_245), "Mon Jan  2 15:04:05 UTC 2006");
        assert_eq!(time(1_709_210_096), "Thu Feb 29 12:34:56 UTC 2024");
        assert_eq!(time(951_782_400), "Tue Feb 29 00:00:00 UTC 2000");
    }

    #[test]
    fn cells_show_strings_lists_and_absence() {
        let v = serde_json::json!({"a": "x", "b": ["GET", "POST"], "c": 3});
        assert_eq!(cell(&v, "a"), "x");
        assert_eq!(cell(&v, "b"), "GET,POST");
        assert_eq!(cell(&v, "c"), "3");
        assert_eq!(cell(&v, "d"), "");
    }
}
