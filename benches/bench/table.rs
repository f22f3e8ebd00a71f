//! Rows: samples, ratio of medians, verdict against the target, the printed table.

#[derive(Clone, Copy, PartialEq)]
pub enum Unit {
    Secs,
    MibS,
    Iops,
    Mib,
    Factor,
}

impl Unit {
    pub fn higher_better(self) -> bool {
        matches!(self, Unit::MibS | Unit::Iops)
    }
    pub fn fmt(self, v: f64) -> String {
        match self {
            Unit::Secs if v < 1.0 => format!("{:.1} ms", v * 1e3),
            Unit::Secs => format!("{v:.2} s"),
            Unit::MibS => format!("{v:.0} MiB/s"),
            Unit::Iops => format!("{v:.0} IOPS"),
            Unit::Mib => format!("{v:.1} MiB"),
            Unit::Factor => format!("{v:.2}x"),
        }
    }
}

pub enum Target {
    /// Ratio of medians (ckptfs better by this factor) at least x.
    Ratio(f64),
    /// ckptfs median at most x (in the row's unit).
    AtMost(f64),
    /// ckptfs median at least x (in the row's unit).
    AtLeast(f64),
    /// A yes/no check with its explanation.
    Check(bool, String),
    Info,
}

pub struct Row {
    pub name: String,
    pub unit: Unit,
    pub ck: Vec<f64>,
    pub anchor_name: String,
    pub anchor: Vec<f64>,
    pub target: Target,
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

impl Row {
    pub fn new(name: &str, unit: Unit, anchor_name: &str, target: Target) -> Row {
        Row {
            name: name.into(),
            unit,
            ck: Vec::new(),
            anchor_name: anchor_name.into(),
            anchor: Vec::new(),
            target,
        }
    }

    pub fn ratio(&self) -> Option<f64> {
        if self.anchor.is_empty() || self.ck.is_empty() {
            return None;
        }
        let (c, a) = (median(&self.ck), median(&self.anchor));
        Some(if self.unit.higher_better() {
            c / a
        } else {
            a / c
        })
    }

    pub fn verdict(&self) -> (&'static str, String) {
        match &self.target {
            Target::Ratio(x) => match self.ratio() {
                Some(r) => (if r >= *x { "PASS" } else { "MISS" }, format!(">= {x}x")),
                None => ("-", format!(">= {x}x")),
            },
            Target::AtMost(x) => {
                let m = median(&self.ck);
                (
                    if m <= *x { "PASS" } else { "MISS" },
                    format!("<= {}", self.unit.fmt(*x)),
                )
            }
            Target::AtLeast(x) => {
                let m = median(&self.ck);
                (
                    if m >= *x { "PASS" } else { "MISS" },
                    format!(">= {}", self.unit.fmt(*x)),
                )
            }
            Target::Check(ok, what) => (if *ok { "PASS" } else { "MISS" }, what.clone()),
            Target::Info => ("info", String::new()),
        }
    }

    pub fn print_progress(&self) {
        let (v, t) = self.verdict();
        println!(
            "  {:<44} ckptfs {:>12} | {} {:>12} | ratio {} | {t} {v}",
            self.name,
            self.unit.fmt(median(&self.ck)),
            if self.anchor_name.is_empty() {
                "-"
            } else {
                &self.anchor_name
            },
            if self.anchor.is_empty() {
                "-".into()
            } else {
                self.unit.fmt(median(&self.anchor))
            },
            self.ratio().map_or("-".into(), |r| format!("{r:.2}x")),
        );
    }
}

pub fn print_table(rows: &[Row]) {
    println!();
    println!(
        "| row | ckptfs min / median | anchor | anchor min / median | ratio | target | result |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let (v, t) = r.verdict();
        let pair = |s: &[f64]| {
            if s.is_empty() {
                "-".to_string()
            } else {
                format!("{} / {}", r.unit.fmt(min(s)), r.unit.fmt(median(s)))
            }
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            pair(&r.ck),
            if r.anchor_name.is_empty() {
                "-"
            } else {
                &r.anchor_name
            },
            pair(&r.anchor),
            r.ratio().map_or("-".into(), |x| format!("{x:.2}x")),
            t,
            v
        );
    }
}
