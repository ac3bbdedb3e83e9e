//! `-p`: progress of long operations.
//!
//! On a terminal (stderr) a one-line bar with bytes done, rate and time left, redrawn at most ten
//! times a second. When stderr is not a terminal, qemu-img's own output: `    (x.xx/100%)` lines
//! ended by a carriage return on stdout, one per percent, then a newline when the work ends.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Reports the progress of one operation; `update` may be called from any thread.
pub struct Progress {
    style: Style,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Off,
    /// The bar on stderr.
    Bar,
    /// qemu-img's percentages on stdout.
    Percent,
}

struct State {
    start: Instant,
    last_draw: Option<Instant>,
    /// Percentage last printed, in hundredths.
    last_percent: Option<u64>,
    done: u64,
    total: u64,
}

impl Progress {
    /// A reporter that prints when `enabled` (`-p` given and not `-q`).
    pub fn new(enabled: bool) -> Progress {
        let style = if !enabled {
            Style::Off
        } else if std::io::stderr().is_terminal() {
            Style::Bar
        } else {
            Style::Percent
        };
        let p = Progress {
            style,
            state: Mutex::new(State {
                start: Instant::now(),
                last_draw: None,
                last_percent: None,
                done: 0,
                total: 0,
            }),
        };
        p.update(0, 0);
        p
    }

    /// Records that `done` of `total` bytes are finished.
    pub fn update(&self, done: u64, total: u64) {
        if self.style == Style::Off {
            return;
        }
        let mut s = self.state.lock().unwrap();
        s.done = done.min(total);
        s.total = total;
        match self.style {
            Style::Off => {}
            Style::Percent => {
                let percent = percent_of(s.done, total);
                if s.last_percent.is_none_or(|last| percent >= last + 100) {
                    s.last_percent = Some(percent);
                    print_percent(percent);
                }
            }
            Style::Bar => {
                let now = Instant::now();
                if s.last_draw
                    .is_none_or(|t| now - t >= Duration::from_millis(100))
                {
                    s.last_draw = Some(now);
                    draw_bar(&s, now);
                }
            }
        }
    }

    /// Prints the final state (100 % when `complete`) and ends the line.
    pub fn finish(&self, complete: bool) {
        let mut s = self.state.lock().unwrap();
        match self.style {
            Style::Off => {}
            Style::Percent => {
                if complete && s.last_percent != Some(10_000) {
                    print_percent(10_000);
                }
                println!();
            }
            Style::Bar => {
                if complete {
                    s.done = s.total;
                }
                draw_bar(&s, Instant::now());
                eprintln!();
            }
        }
        s.last_percent = Some(10_000);
    }
}

/// Hundredths of a percent, 0 for an empty job.
fn percent_of(done: u64, total: u64) -> u64 {
    if total == 0 {
        0
    } else {
        (done as u128 * 10_000 / total as u128) as u64
    }
}

fn print_percent(hundredths: u64) {
    let mut out = std::io::stdout().lock();
    let _ = write!(
        out,
        "    ({}.{:02}/100%)\r",
        hundredths / 100,
        hundredths % 100
    );
    let _ = out.flush();
}

/// `[#####.....]  42%  1.2 GiB / 2.8 GiB  310 MiB/s  ETA 0:05`.
fn draw_bar(s: &State, now: Instant) {
    const WIDTH: u64 = 30;
    let elapsed = (now - s.start).as_secs_f64();
    let filled = (s.done * WIDTH).checked_div(s.total).unwrap_or(0);
    let rate = if elapsed > 0.0 {
        s.done as f64 / elapsed
    } else {
        0.0
    };
    let eta = if rate > 0.0 && s.total > s.done {
        let secs = ((s.total - s.done) as f64 / rate) as u64;
        format!("ETA {}:{:02}", secs / 60, secs % 60)
    } else {
        String::new()
    };
    let bar: String = (0..WIDTH)
        .map(|i| if i < filled { '#' } else { '.' })
        .collect();
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r[{bar}] {:>3}%  {} / {}  {}/s  {eta}\x1b[K",
        percent_of(s.done, s.total) / 100,
        crate::output::human_size(s.done),
        crate::output::human_size(s.total),
        crate::output::human_size(rate as u64),
    );
    let _ = err.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_are_exact_hundredths() {
        assert_eq!(percent_of(1, 3), 3333);
        assert_eq!(percent_of(5, 5), 10_000);
        assert_eq!(percent_of(0, 0), 0);
        assert_eq!(percent_of(u64::MAX, u64::MAX), 10_000);
    }
}
