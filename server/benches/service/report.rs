//! One printed line per figure: value, baseline, ratio, target and verdict.

#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// value / baseline must be at least this.
    RatioAtLeast(f64),
    /// value / baseline must be at most this.
    RatioAtMost(f64),
    /// value must be at most this (in the figure's unit).
    AtMost(f64),
}

#[derive(Debug, Clone)]
pub struct Figure {
    name: String,
    unit: &'static str,
    value: f64,
    baseline: Option<f64>,
    target: Option<Target>,
}

impl Figure {
    pub fn new(name: &str, unit: &'static str, value: f64) -> Self {
        Self {
            name: name.to_owned(),
            unit,
            value,
            baseline: None,
            target: None,
        }
    }

    pub fn baseline(mut self, b: f64) -> Self {
        self.baseline = Some(b);
        self
    }

    pub fn target(mut self, t: Target) -> Self {
        self.target = Some(t);
        self
    }

    fn ratio(&self) -> Option<f64> {
        self.baseline.map(|b| self.value / b)
    }

    /// `None` for an informational figure.
    pub fn ok(&self) -> Option<bool> {
        Some(match self.target? {
            Target::RatioAtLeast(t) => self.ratio()? >= t,
            Target::RatioAtMost(t) => self.ratio()? <= t,
            Target::AtMost(t) => self.value <= t,
        })
    }

    pub fn print(&self) {
        let num = |v: f64| {
            if v.abs() >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        };
        let baseline = self
            .baseline
            .map(|b| format!("baseline {:>9} {}", num(b), self.unit))
            .unwrap_or_default();
        let ratio = self
            .ratio()
            .map(|r| format!("ratio {r:.3}"))
            .unwrap_or_default();
        let target = match self.target {
            Some(Target::RatioAtLeast(t)) => format!("target ratio ≥ {t}"),
            Some(Target::RatioAtMost(t)) => format!("target ratio ≤ {t}"),
            Some(Target::AtMost(t)) => format!("target ≤ {t} {}", self.unit),
            None => String::new(),
        };
        let verdict = match self.ok() {
            Some(true) => "ok",
            Some(false) => "OVER TARGET",
            None => "",
        };
        println!(
            "{:<44} {:>9} {:<8} {:<26} {:<12} {:<22} {verdict}",
            self.name,
            num(self.value),
            self.unit,
            baseline,
            ratio,
            target
        );
    }
}
