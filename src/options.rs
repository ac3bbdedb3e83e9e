//! `-o key=value,...` option lists, read the way qemu-img reads them.
//!
//! Two layers, as in qemu: [`parse_lists`] splits the text (`,,` is a literal comma, a bare `key`
//! means `key=on`, a bare `nokey` means `key=off`, a bare `help` or `?` asks for the list of
//! options); [`check_types`] then checks every key against the options a format declares and
//! reads each value by its declared type (size, number, on/off). What the values mean is the
//! format's business (`vdisk_formats::CreateOptions::from_pairs`).

use anyhow::{anyhow, Result};
use vdisk_formats::image::OptionDesc;

use crate::numbers::{parse_size_arg, parse_u64, NumError};

/// The pairs of all `-o` arguments, in order, and whether help was asked for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OptionList {
    pub pairs: Vec<(String, String)>,
    pub help: bool,
}

/// Reads every `-o` argument (their pairs are concatenated, later keys win when applied).
///
/// Errors with qemu's `Invalid option list: TEXT` when an argument is empty or has an empty
/// element (a leading comma, or a trailing comma that is not an escaped one).
pub fn parse_lists(args: &[String]) -> Result<OptionList> {
    let mut list = OptionList::default();
    for arg in args {
        let elements = split_escaped(arg).ok_or_else(|| anyhow!("Invalid option list: {arg}"))?;
        for element in elements {
            if element == "help" || element == "?" {
                list.help = true;
            } else if let Some((key, value)) = element.split_once('=') {
                list.pairs.push((key.to_string(), value.to_string()));
            } else if let Some(key) = element.strip_prefix("no") {
                list.pairs.push((key.to_string(), "off".to_string()));
            } else {
                list.pairs.push((element, "on".to_string()));
            }
        }
    }
    Ok(list)
}

/// Splits at single commas, turning `,,` into `,`; `None` if any element is empty.
fn split_escaped(text: &str) -> Option<Vec<String>> {
    let mut elements = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            current.push(c);
        } else if chars.peek() == Some(&',') {
            chars.next();
            current.push(',');
        } else {
            elements.push(std::mem::take(&mut current));
        }
    }
    elements.push(current);
    (!elements.iter().any(String::is_empty)).then_some(elements)
}

/// An option value read according to its declared type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Typed {
    /// `str`: kept as written.
    Str,
    /// `bool (on/off)`: `on`/`yes`/`true`/`y` or `off`/`no`/`false`/`n`.
    Bool(bool),
    /// `size` or `num`.
    Number(u64),
}

/// One option after type checking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedOption {
    pub name: String,
    /// The value as the user wrote it.
    pub text: String,
    pub typed: Typed,
}

impl CheckedOption {
    /// The value in one canonical spelling (`on`/`off`, decimal numbers) for the format to read.
    pub fn canonical(&self) -> String {
        match self.typed {
            Typed::Str => self.text.clone(),
            Typed::Bool(b) => if b { "on" } else { "off" }.to_string(),
            Typed::Number(n) => n.to_string(),
        }
    }

    /// The value as qemu-img echoes it in its `Formatting ...` line: numbers as signed decimals,
    /// strings with commas doubled, booleans as written.
    pub fn echo(&self) -> String {
        match self.typed {
            Typed::Str => self.text.replace(',', ",,"),
            Typed::Bool(_) => self.text.clone(),
            Typed::Number(n) => (n as i64).to_string(),
        }
    }
}

/// Checks each pair against `known` and reads its value by type; a key given twice keeps its last
/// value. Errors carry qemu's messages (`Invalid parameter 'x'`, `Parameter 'x' expects ...`).
pub fn check_types(pairs: &[(String, String)], known: &[OptionDesc]) -> Result<Vec<CheckedOption>> {
    let mut checked: Vec<CheckedOption> = Vec::new();
    for (key, value) in pairs {
        let desc = known
            .iter()
            .find(|d| d.name == key)
            .ok_or_else(|| anyhow!("Invalid parameter '{key}'"))?;
        let typed = read_typed(key, value, desc.kind)?;
        checked.retain(|o| o.name != *key);
        checked.push(CheckedOption {
            name: key.clone(),
            text: value.clone(),
            typed,
        });
    }
    Ok(checked)
}

fn read_typed(key: &str, value: &str, kind: &str) -> Result<Typed> {
    match kind {
        "size" => match parse_size_arg(value) {
            Ok(n) => Ok(Typed::Number(n)),
            Err(NumError::Range) => Err(anyhow!(
                "Value '{value}' is out of range for parameter '{key}'"
            )),
            Err(NumError::Invalid) => Err(anyhow!(
                "Parameter '{key}' expects a non-negative number below 2^64\n\
                 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                 and exabytes, respectively."
            )),
        },
        "num" => match parse_u64(value) {
            Ok(n) => Ok(Typed::Number(n)),
            Err(NumError::Range) => Err(anyhow!(
                "Value '{value}' is too large for parameter '{key}'"
            )),
            Err(NumError::Invalid) => Err(anyhow!("Parameter '{key}' expects a number")),
        },
        k if k.starts_with("bool") => match value {
            "on" | "yes" | "true" | "y" => Ok(Typed::Bool(true)),
            "off" | "no" | "false" | "n" => Ok(Typed::Bool(false)),
            _ => Err(anyhow!("Parameter '{key}' expects 'on' or 'off'")),
        },
        _ => Ok(Typed::Str),
    }
}

/// The option list of `-o help`, sorted by name, one `  name=<type>  - help` line each with the
/// name column 22 wide, as qemu-img prints it.
pub fn help_lines(known: &[OptionDesc]) -> Vec<String> {
    let mut sorted: Vec<&OptionDesc> = known.iter().collect();
    sorted.sort_by_key(|d| d.name);
    sorted
        .iter()
        .map(|d| {
            let head = format!("{}=<{}>", d.name, d.kind);
            format!("  {head:<22} - {}", d.help)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn lists_split_on_single_commas_and_unescape_double_ones() {
        let l = parse_lists(&["backing_file=a,,b,cluster_size=4k".into()]).unwrap();
        assert_eq!(
            l.pairs,
            pairs(&[("backing_file", "a,b"), ("cluster_size", "4k")])
        );
        let l = parse_lists(&["backing_file=a,,,cluster_size=4k".into()]).unwrap();
        assert_eq!(
            l.pairs,
            pairs(&[("backing_file", "a,"), ("cluster_size", "4k")])
        );
        let l = parse_lists(&["cluster_size=4k,,".into()]).unwrap();
        assert_eq!(l.pairs, pairs(&[("cluster_size", "4k,")]));
    }

    #[test]
    fn bare_keys_mean_on_or_off_and_help_is_recognised() {
        let l = parse_lists(&["lazy_refcounts,nofoo".into(), "?".into()]).unwrap();
        assert_eq!(l.pairs, pairs(&[("lazy_refcounts", "on"), ("foo", "off")]));
        assert!(l.help);
        assert!(!parse_lists(&["help=1".into()]).unwrap().help);
    }

    #[test]
    fn empty_elements_make_an_invalid_list() {
        for bad in ["", ",a=1", "a=1,", "a=1,,,"] {
            let err = parse_lists(&[bad.into()]).unwrap_err();
            assert_eq!(err.to_string(), format!("Invalid option list: {bad}"));
        }
    }

    const KNOWN: &[OptionDesc] = &[
        OptionDesc {
            name: "cluster_size",
            kind: "size",
            help: "qcow2 cluster size",
        },
        OptionDesc {
            name: "refcount_bits",
            kind: "num",
            help: "Width of a reference count entry in bits",
        },
        OptionDesc {
            name: "lazy_refcounts",
            kind: "bool (on/off)",
            help: "Postpone refcount updates",
        },
        OptionDesc {
            name: "backing_file",
            kind: "str",
            help: "File name of a base image",
        },
    ];

    #[test]
    fn values_are_read_by_type() {
        let c = check_types(
            &pairs(&[
                ("cluster_size", "4k"),
                ("refcount_bits", "010"),
                ("lazy_refcounts", "y"),
                ("backing_file", "a,b"),
            ]),
            KNOWN,
        )
        .unwrap();
        let canon: Vec<_> = c.iter().map(CheckedOption::canonical).collect();
        assert_eq!(canon, ["4096", "8", "on", "a,b"]);
        let echo: Vec<_> = c.iter().map(CheckedOption::echo).collect();
        assert_eq!(echo, ["4096", "8", "y", "a,,b"]);
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value() {
        let c = check_types(
            &pairs(&[("cluster_size", "4k"), ("cluster_size", "8k")]),
            KNOWN,
        )
        .unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].typed, Typed::Number(8192));
    }

    #[test]
    fn bad_values_get_qemus_messages() {
        let err = |k: &str, v: &str| {
            check_types(&pairs(&[(k, v)]), KNOWN)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(err("foo", "1"), "Invalid parameter 'foo'");
        assert_eq!(
            err("refcount_bits", "abc"),
            "Parameter 'refcount_bits' expects a number"
        );
        assert_eq!(
            err("refcount_bits", "99999999999999999999"),
            "Value '99999999999999999999' is too large for parameter 'refcount_bits'"
        );
        assert_eq!(
            err("cluster_size", "-5"),
            "Value '-5' is out of range for parameter 'cluster_size'"
        );
        assert!(err("cluster_size", "abc")
            .starts_with("Parameter 'cluster_size' expects a non-negative number below 2^64\n"));
        assert_eq!(
            err("lazy_refcounts", "ON"),
            "Parameter 'lazy_refcounts' expects 'on' or 'off'"
        );
    }

    #[test]
    fn help_lines_are_sorted_and_aligned() {
        let lines = help_lines(KNOWN);
        assert_eq!(
            lines[0],
            "  backing_file=<str>     - File name of a base image"
        );
        assert_eq!(
            lines[2],
            "  lazy_refcounts=<bool (on/off)> - Postpone refcount updates"
        );
    }
}
