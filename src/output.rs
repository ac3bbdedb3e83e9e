//! Text as qemu-img prints it: human-readable sizes (`10 GiB`, `1.25 MiB`) and its pretty-printed
//! JSON (4-space indent, empty containers split over two lines, non-ASCII as `\uXXXX`).

use std::fmt::Write as _;

use serde_json::Value;

/// Formats a byte count the way qemu's `size_to_str` does: the largest binary unit that keeps the
/// integer part below 1000, then three significant digits as C's `%0.3g` writes them.
///
/// `0` is `0 B`, `197120` is `192 KiB`, `1376256` is `1.31 MiB`, `1023590` is `1e+03 KiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // Switch to the next unit once the value reaches 1000 of the current one, i.e. pick
    // floor(log2(bytes * 1024 / 1000)) / 10.
    let scaled = bytes as f64 / (1000.0 / 1024.0);
    let unit = if bytes == 0 {
        0
    } else {
        (binary_exponent(scaled) / 10).clamp(0, 6) as usize
    };
    let value = bytes as f64 / (1u64 << (10 * unit)) as f64;
    format!("{} {}B", format_g3(value), UNITS[unit])
}

/// floor(log2(x)) of a positive, finite, normal `x`, read exactly from its exponent bits.
fn binary_exponent(x: f64) -> i32 {
    ((x.to_bits() >> 52) & 0x7ff) as i32 - 1023
}

/// C's `printf("%0.3g", v)` for a non-negative finite `v`.
fn format_g3(v: f64) -> String {
    const PRECISION: i32 = 3;
    if v == 0.0 {
        return "0".to_string();
    }
    // The decimal exponent after rounding to PRECISION significant digits.
    let sci = format!("{:.*e}", (PRECISION - 1) as usize, v);
    let (mantissa, exp) = sci
        .split_once('e')
        .expect("`{:e}` always writes an exponent");
    let exp: i32 = exp.parse().expect("`{:e}` writes a decimal exponent");
    if !(-4..PRECISION).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", strip_fraction_zeros(mantissa), exp.abs())
    } else {
        let decimals = (PRECISION - 1 - exp) as usize;
        strip_fraction_zeros(&format!("{v:.decimals$}")).to_string()
    }
}

/// `1.50` -> `1.5`, `2.00` -> `2`, `100` -> `100`.
fn strip_fraction_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// Serializes `value` exactly as qemu's pretty JSON writer does (no trailing newline).
pub fn qemu_json(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0);
    out
}

fn write_value(out: &mut String, value: &Value, depth: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            write_container(out, '[', ']', depth, items.iter().map(|v| (None, v)));
        }
        Value::Object(map) => write_container(
            out,
            '{',
            '}',
            depth,
            map.iter().map(|(k, v)| (Some(k.as_str()), v)),
        ),
    }
}

/// Every member on its own line one level deeper; the closing bracket on a line of its own, even
/// when there are no members (`[` newline `]`), as qemu writes it.
fn write_container<'a>(
    out: &mut String,
    open: char,
    close: char,
    depth: usize,
    members: impl Iterator<Item = (Option<&'a str>, &'a Value)>,
) {
    out.push(open);
    let mut first = true;
    for (key, value) in members {
        out.push_str(if first { "\n" } else { ",\n" });
        first = false;
        indent(out, depth + 1);
        if let Some(key) = key {
            write_string(out, key);
            out.push_str(": ");
        }
        write_value(out, value, depth + 1);
    }
    out.push('\n');
    indent(out, depth);
    out.push(close);
}

fn indent(out: &mut String, depth: usize) {
    out.push_str(&"    ".repeat(depth));
}

/// A JSON string with qemu's escapes: the short forms for `"`, `\` and common control characters,
/// `\uXXXX` (upper-case hex, surrogate pairs beyond the BMP) for every other character outside
/// printable ASCII.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04X}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn human_sizes_match_qemu_size_to_str() {
        // Values taken from qemu-img 10.0 output.
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(4096), "4 KiB");
        assert_eq!(human_size(197120), "192 KiB");
        assert_eq!(human_size(200704), "196 KiB");
        assert_eq!(human_size(1314816), "1.25 MiB");
        assert_eq!(human_size(1376256), "1.31 MiB");
        assert_eq!(human_size(2297856), "2.19 MiB");
        assert_eq!(human_size(10 << 20), "10 MiB");
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(1 << 50), "1 PiB");
    }

    #[test]
    fn human_sizes_switch_unit_at_one_thousand() {
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(1000), "0.977 KiB");
        assert_eq!(human_size(1023), "0.999 KiB");
        // 999.6 KiB rounds to 1000 with three digits: %g then uses an exponent.
        assert_eq!(human_size(1_023_590), "1e+03 KiB");
        assert_eq!(human_size(u64::MAX), "16 EiB");
    }

    #[test]
    fn g3_rounds_half_to_even_like_printf() {
        assert_eq!(format_g3(192.5), "192");
        assert_eq!(format_g3(193.5), "194");
        assert_eq!(format_g3(1.5), "1.5");
        assert_eq!(format_g3(0.0001), "0.0001");
        assert_eq!(format_g3(0.00001234), "1.23e-05");
    }

    #[test]
    fn json_layout_matches_qemu() {
        let v = json!({"children": [], "a": {"type": "file", "data": {}}, "n": 5, "b": false});
        let expected = "{\n    \"children\": [\n    ],\n    \"a\": {\n        \"type\": \"file\",\n        \"data\": {\n        }\n    },\n    \"n\": 5,\n    \"b\": false\n}";
        assert_eq!(qemu_json(&v), expected);
    }

    #[test]
    fn json_strings_escape_like_qemu() {
        let v = json!("é\"q\\x\t/\u{7f}\u{1F600}");
        assert_eq!(qemu_json(&v), r#""\u00E9\"q\\x\t/\u007F\uD83D\uDE00""#);
    }
}
