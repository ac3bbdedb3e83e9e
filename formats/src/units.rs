//! Sizes as qemu-img writes them: a number with an optional binary suffix
//! (`b`, `k`/`K`, `M`, `G`, `T`, `P`, `E`), fractions allowed (`1.5G`, `.5k`), hexadecimal
//! without a suffix (`0x100`).

use crate::error::{Error, Result};

/// Parses a size such as `10G`, `64k`, `1.5M` or `512`.
pub fn parse_size(text: &str) -> Result<u64> {
    let bad = || {
        Error::argument(format!(
            "Invalid size '{text}': use a number with an optional k, M, G, T, P or E suffix"
        ))
    };
    let t = text.trim();
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|_| bad());
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() || num == "." {
        return Err(bad());
    }
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(bad()),
    };
    if let Some((int, frac)) = num.split_once('.') {
        if frac.contains('.') || shift == 0 && !frac.chars().all(|c| c == '0') {
            return Err(bad());
        }
        let int: u64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| bad())?
        };
        let frac_value: f64 = format!("0.{frac}").parse().map_err(|_| bad())?;
        let whole = int
            .checked_shl(shift)
            .filter(|v| v >> shift == int)
            .ok_or_else(bad)?;
        let part = (frac_value * (1u64 << shift) as f64) as u64;
        return whole.checked_add(part).ok_or_else(bad);
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn suffixes_and_fractions() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_size(".5k").unwrap(), 512);
        assert_eq!(parse_size("0x100").unwrap(), 256);
        assert!(parse_size("-1").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999E").is_err());
    }
}
