//! Numbers on the command line, read the way qemu-img reads them, so the same arguments are
//! accepted and the same two kinds of failure (not a number / out of range) are reported.

use vdisk_formats::units::parse_size;

/// Why a numeric argument was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumError {
    /// Not a number at all (`abc`, `1X`, `5x`).
    Invalid,
    /// A number, but negative or too large.
    Range,
}

/// Parses an integer as C's `strtoll(text, .., 0)` does with the whole string required: leading
/// blanks, an optional sign, then decimal, `0x` hexadecimal or `0` octal digits (`-c 0x10` is 16).
pub fn parse_int(text: &str) -> Result<i64, NumError> {
    let (negative, magnitude) = parse_c_integer(text)?;
    let value = if negative {
        0i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    };
    value.ok_or(NumError::Range)
}

/// Parses an unsigned integer as C's `strtoull(text, .., 0)` does: like [`parse_int`], and a
/// leading `-` negates modulo 2^64 (`-1` is `u64::MAX`).
pub fn parse_u64(text: &str) -> Result<u64, NumError> {
    let (negative, magnitude) = parse_c_integer(text)?;
    Ok(if negative {
        magnitude.wrapping_neg()
    } else {
        magnitude
    })
}

/// Sign and magnitude of a C integer literal with optional blanks and sign before it.
fn parse_c_integer(text: &str) -> Result<(bool, u64), NumError> {
    let t = text.trim_start();
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(hex) = t.strip_prefix("0x").or(t.strip_prefix("0X")) {
        (16, hex)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(NumError::Invalid);
    }
    let magnitude = u64::from_str_radix(digits, radix).map_err(|_| NumError::Range)?;
    Ok((negative, magnitude))
}

/// Parses an integer argument that must lie in `min..=i32::MAX`, as qemu-img's `-c`, `-d`,
/// `--flush-interval` and `--pattern` are.
pub fn parse_int_in(text: &str, min: i64, max: i64) -> Result<i64, NumError> {
    let v = parse_int(text)?;
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(NumError::Range)
    }
}

/// Parses a size with an optional `k`/`M`/`G`/`T`/`P`/`E` suffix (`1.5k`, `10G`); negative
/// numbers and numbers that do not fit 64 bits are `Range` errors, anything else unparsable is
/// `Invalid`.
pub fn parse_size_arg(text: &str) -> Result<u64, NumError> {
    let t = text.trim_start();
    if t.starts_with('-') {
        return Err(NumError::Range);
    }
    parse_size(t).map_err(|_| {
        if looks_like_size(t) {
            NumError::Range
        } else {
            NumError::Invalid
        }
    })
}

/// Reads a size argument as qemu-img's `cvtnum` does, for values that must fit a signed 64-bit
/// number; `what` names the argument in the messages (`Invalid image size specified: '1X'.`,
/// `Invalid start offset specified. Must be between 0 and 9223372036854775807.`).
pub fn cvtnum(what: &str, text: &str) -> anyhow::Result<u64> {
    cvtnum_in(what, text, 0, i64::MAX as u64)
}

/// [`cvtnum`] with the bounds of the argument.
pub fn cvtnum_in(what: &str, text: &str, min: u64, max: u64) -> anyhow::Result<u64> {
    match parse_size_arg(text) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(_) | Err(NumError::Range) => Err(anyhow::anyhow!(
            "Invalid {what} specified. Must be between {min} and {max}."
        )),
        Err(NumError::Invalid) => Err(anyhow::anyhow!("Invalid {what} specified: '{text}'.")),
    }
}

/// Whether `t` has the shape of a size (digits, an optional fraction, an optional known suffix;
/// a fraction only with a suffix), so that a failure to parse it can only mean overflow.
fn looks_like_size(t: &str) -> bool {
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(end);
    let mut parts = number.split('.');
    let int = parts.next().unwrap_or("");
    let frac = parts.next();
    let known_suffix = matches!(
        suffix,
        "k" | "K" | "m" | "M" | "g" | "G" | "t" | "T" | "p" | "P" | "e" | "E"
    );
    let plain = matches!(suffix, "" | "b" | "B");
    !int.is_empty()
        && parts.next().is_none()
        && (known_suffix || plain && frac.is_none_or(|f| f.chars().all(|c| c == '0')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_follow_strtol_base_zero() {
        assert_eq!(parse_int("10"), Ok(10));
        assert_eq!(parse_int(" 5"), Ok(5));
        assert_eq!(parse_int("0x10"), Ok(16));
        assert_eq!(parse_int("010"), Ok(8));
        assert_eq!(parse_int("0"), Ok(0));
        assert_eq!(parse_int("-1"), Ok(-1));
        assert_eq!(parse_int("1k"), Err(NumError::Invalid));
        assert_eq!(parse_int("5x"), Err(NumError::Invalid));
        assert_eq!(parse_int("abc"), Err(NumError::Invalid));
        assert_eq!(parse_int(""), Err(NumError::Invalid));
        assert_eq!(parse_int("99999999999999999999999"), Err(NumError::Range));
    }

    #[test]
    fn unsigned_integers_wrap_negative_values_like_strtoull() {
        assert_eq!(parse_u64("-1"), Ok(u64::MAX));
        assert_eq!(parse_u64("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_u64("18446744073709551616"), Err(NumError::Range));
        assert_eq!(parse_u64("0x10"), Ok(16));
    }

    #[test]
    fn bounded_integers() {
        assert_eq!(
            parse_int_in("2147483647", 1, i32::MAX.into()),
            Ok(i32::MAX.into())
        );
        assert_eq!(
            parse_int_in("2147483648", 1, i32::MAX.into()),
            Err(NumError::Range)
        );
        assert_eq!(parse_int_in("0", 1, 10), Err(NumError::Range));
    }

    #[test]
    fn sizes_distinguish_garbage_from_overflow() {
        assert_eq!(parse_size_arg("1.5k"), Ok(1536));
        assert_eq!(parse_size_arg(" 1G"), Ok(1 << 30));
        assert_eq!(parse_size_arg("1.0"), Ok(1));
        assert_eq!(parse_size_arg("1X"), Err(NumError::Invalid));
        assert_eq!(parse_size_arg("1.5"), Err(NumError::Invalid));
        assert_eq!(parse_size_arg("1kB"), Err(NumError::Invalid));
        assert_eq!(parse_size_arg("-1"), Err(NumError::Range));
        assert_eq!(parse_size_arg("99999999999E"), Err(NumError::Range));
        assert_eq!(parse_size_arg("99999999999999999999"), Err(NumError::Range));
    }
}
