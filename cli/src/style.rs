//! Terminal styling: colours only when stdout is a terminal (and NO_COLOR is unset).

use std::io::IsTerminal;

pub struct Style {
    colour: bool,
}

impl Style {
    pub fn detect() -> Self {
        Self {
            colour: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    pub fn bold(&self, text: &str) -> String {
        self.paint("1", text)
    }
    pub fn green(&self, text: &str) -> String {
        self.paint("32", text)
    }
    pub fn red(&self, text: &str) -> String {
        self.paint("31", text)
    }
    pub fn yellow(&self, text: &str) -> String {
        self.paint("33", text)
    }
    pub fn dim(&self, text: &str) -> String {
        self.paint("2", text)
    }

    /// A phase in its colour.
    pub fn phase(&self, phase: &str) -> String {
        match phase {
            "Succeeded" | "Compensated" => self.green(phase),
            "Failed" => self.red(phase),
            _ => self.yellow(phase),
        }
    }
}

/// Renders rows as an aligned table (first row is the header), like `kubectl get`.
pub fn table(rows: &[Vec<String>]) -> String {
    let width = |s: &str| s.chars().filter(|c| !c.is_control()).count() - escape_len(s);
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| width(s))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                let pad = widths[i].saturating_sub(width(cell));
                if i + 1 == row.len() {
                    cell.clone()
                } else {
                    format!("{cell}{}", " ".repeat(pad))
                }
            })
            .collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// Printable characters taken by ANSI colour codes (`\x1b[..m` minus the ESC itself).
fn escape_len(s: &str) -> usize {
    let mut len = 0;
    let mut in_escape = false;
    for c in s.chars() {
        if c == '\x1b' {
            in_escape = true;
        } else if in_escape {
            len += 1;
            if c == 'm' {
                in_escape = false;
            }
        }
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_with_and_without_colour() {
        let style = Style { colour: true };
        let rows = vec![
            vec!["NAME".to_string(), "PHASE".to_string(), "AGE".to_string()],
            vec![
                "order-1".to_string(),
                style.green("Succeeded"),
                "3s".to_string(),
            ],
            vec!["o2".to_string(), "Running".to_string(), "10s".to_string()],
        ];
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "NAME      PHASE       AGE");
        assert_eq!(lines[2], "o2        Running     10s");
        assert!(lines[1].starts_with("order-1   \x1b[32mSucceeded\x1b[0m   3s"));
    }
}
